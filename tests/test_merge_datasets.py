"""tools/merge_datasets.py: merging shards equals preprocessing their concatenation, byte for byte."""
import numpy as np
import pytest

from megatron_ext.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder
from tokenizer_helpers import generated_docs, train_sentencepiece, write_jsonl
from tools import merge_datasets, preprocess_data


def read(prefix):
    with open(f"{prefix}.bin", "rb") as b, open(f"{prefix}.idx", "rb") as i:
        return b.read(), i.read()


def preprocess(path, prefix, model):
    assert preprocess_data.main(["--input", path, "--output-prefix", str(prefix), "--append-eod",
                                 "--tokenizer-type", "GPTSentencePieceTokenizer",
                                 "--tokenizer-model", model]) == 0
    return f"{prefix}_text_document"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two preprocessed shards (the first with an empty document) and the whole corpus at once."""
    tmp = tmp_path_factory.mktemp("merge")
    model = train_sentencepiece(tmp / "sp.model", generated_docs(200), 150)
    docs = generated_docs(300, seed=9)
    docs[3] = ""
    def shard(name, part, prefix):
        return preprocess(write_jsonl(tmp / f"{name}.jsonl", [{"text": d} for d in part]), prefix, model)

    a = shard("a", docs[:120], tmp / "parts" / "a")
    b = shard("b", docs[120:], tmp / "parts" / "b")
    whole = shard("all", docs, tmp / "all")
    return a, b, whole


def test_merge_equals_preprocessing_the_concatenation(tmp_path, shards, capsys):
    a, b, whole = shards
    assert merge_datasets.main(["--input", a, b, "--output-prefix", str(tmp_path / "merged")]) == 0
    assert read(tmp_path / "merged") == read(whole)
    assert "299 documents" in capsys.readouterr().out
    merged = MMapIndexedDataset(str(tmp_path / "merged"))
    assert merged.doc_idx.tolist() == list(range(300))


def test_directory_input_merges_every_pair_in_name_order(tmp_path, shards):
    a, b, whole = shards
    parts = a.rsplit("/", 1)[0]
    assert merge_datasets.main(["--input", parts, "--output-prefix", str(tmp_path / "m")]) == 0
    assert read(tmp_path / "m") == read(whole)
    assert merge_datasets.expand_inputs([parts], a) == [b]  # the output itself is never an input


def test_dtype_mismatch_is_refused(tmp_path, shards, capsys):
    a, _, _ = shards
    builder = MMapIndexedDatasetBuilder(str(tmp_path / "wide.bin"), dtype=np.int32)
    builder.add_item(np.array([1, 2, 3]))
    builder.end_document()
    builder.finalize(str(tmp_path / "wide.idx"))
    out = tmp_path / "out"
    assert merge_datasets.main(["--input", a, str(tmp_path / "wide"), "--output-prefix", str(out / "m")]) == 2
    err = capsys.readouterr().err
    assert "different token dtypes" in err and f"{a} (uint16)" in err and "wide (int32)" in err
    assert not out.exists() or list(out.iterdir()) == []


def test_missing_input_is_named(tmp_path, capsys):
    assert merge_datasets.main(["--input", str(tmp_path / "nope"), "--output-prefix",
                                str(tmp_path / "m")]) == 2
    assert f"--input {tmp_path / 'nope'}: neither a directory nor a dataset prefix" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert merge_datasets.main(["--input", str(tmp_path / "empty"), "--output-prefix",
                                str(tmp_path / "m")]) == 2
    assert "holds no .bin/.idx pair" in capsys.readouterr().err
    assert not (tmp_path / "m.bin").exists() and not (tmp_path / "m.idx").exists()
