"""tools/preprocess_data.py: Megatron's output, in input order whatever --workers, and every bad input
is a clear error that leaves nothing under the output names."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zstandard

from ascendspeed.arguments import TokenizerConfig
from ascendspeed.data.tokenizer import build_tokenizer
from megatron_ext.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder
from tokenizer_helpers import REPO_ROOT, generated_docs, train_hf_tokenizer, train_sentencepiece, write_jsonl
from tools import preprocess_data


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return train_hf_tokenizer(tmp_path_factory.mktemp("hf") / "tok", generated_docs(300), 400)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~1500 documents (several batches), two of them empty."""
    docs = generated_docs(1500, seed=3)
    docs[5] = docs[700] = ""
    records = [{"text": d, "id": i} for i, d in enumerate(docs)]
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", records), docs


def run(input_path, prefix, hf_dir, *extra):
    argv = ["--input", *([input_path] if isinstance(input_path, str) else input_path),
            "--output-prefix", str(prefix), "--tokenizer-type", "PretrainedFromHF",
            "--tokenizer-name-or-path", hf_dir, "--log-interval", "500", *extra]
    return preprocess_data.main(argv)


def files(prefix, key="text"):
    base = f"{prefix}_{key}_document"
    with open(base + ".bin", "rb") as b, open(base + ".idx", "rb") as i:
        return b.read(), i.read()


def reference_dataset(path, docs, tokenizer, append_eod, dtype):
    """What a straightforward per-document loop writes (Megatron's preprocess, one process)."""
    builder = MMapIndexedDatasetBuilder(str(path) + ".bin", dtype=dtype)
    for text in docs:
        ids = tokenizer.tokenize(text)
        if ids:
            builder.add_item(np.array(ids + ([tokenizer.eod] if append_eod else [])))
            builder.end_document()
    builder.finalize(str(path) + ".idx")
    return files(str(path)[:-len("_text_document")])


def test_workers_1_and_2_and_reference_are_byte_identical(tmp_path, hf_dir, corpus, capsys):
    path, docs = corpus
    assert run(path, tmp_path / "w1", hf_dir, "--append-eod", "--workers", "1") == 0
    out = capsys.readouterr()
    assert "processed 1024 documents" in out.err and "docs/s" in out.err and "MB/s" in out.err
    assert "1498 documents written, 2 empty dropped" in out.out
    assert run(path, tmp_path / "w2", hf_dir, "--append-eod", "--workers", "2") == 0
    tokenizer = build_tokenizer(TokenizerConfig("PretrainedFromHF", tokenizer_name_or_path=hf_dir))
    reference = reference_dataset(tmp_path / "ref_text_document", docs, tokenizer, True, np.uint16)
    assert files(tmp_path / "w1") == files(tmp_path / "w2") == reference

    data = MMapIndexedDataset(str(tmp_path / "w2_text_document"))
    assert len(data) == 1498 and data.doc_idx.tolist() == list(range(1499))
    assert data.dtype == np.uint16
    kept = [d for d in docs if d]
    for i in (0, 4, 5, 697, 698, 1497):  # around and after the dropped empty documents
        assert data[i].tolist() == tokenizer.tokenize(kept[i]) + [tokenizer.eod]


def test_without_append_eod_and_several_keys(tmp_path, hf_dir):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "the king", "title": "Hamlet"},
                                                {"text": "the queen", "title": ""}])
    summary = preprocess_data.preprocess(preprocess_data.get_args(
        ["--input", path, "--output-prefix", str(tmp_path / "out"), "--json-keys", "text", "title",
         "--tokenizer-type", "PretrainedFromHF", "--tokenizer-name-or-path", hf_dir]))
    tokenizer = build_tokenizer(TokenizerConfig("PretrainedFromHF", tokenizer_name_or_path=hf_dir))
    text = MMapIndexedDataset(str(tmp_path / "out_text_document"))
    title = MMapIndexedDataset(str(tmp_path / "out_title_document"))
    assert [text[0].tolist(), text[1].tolist()] == [tokenizer.tokenize("the king"),
                                                    tokenizer.tokenize("the queen")]
    assert len(title) == 1 and title[0].tolist() == tokenizer.tokenize("Hamlet")
    assert summary["written"] == {"text": 2, "title": 1} and summary["empty"] == {"text": 0, "title": 1}


class _VocabSize:
    """A tokenizer reporting another vocab size (proxies everything else)."""

    def __init__(self, inner, vocab_size):
        self._inner, self.vocab_size = inner, vocab_size

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_dtype_is_uint16_below_65500_else_int32(tmp_path, hf_dir, corpus, monkeypatch):
    path, _ = corpus
    assert run(path, tmp_path / "small", hf_dir, "--append-eod") == 0
    real = preprocess_data.build_tokenizer
    monkeypatch.setattr(preprocess_data, "build_tokenizer", lambda config: _VocabSize(real(config), 65500))
    assert run(path, tmp_path / "big", hf_dir, "--append-eod") == 0
    small = MMapIndexedDataset(str(tmp_path / "small_text_document"))
    big = MMapIndexedDataset(str(tmp_path / "big_text_document"))
    assert (small.dtype, big.dtype) == (np.uint16, np.int32)
    assert all(np.array_equal(small[i], big[i]) for i in range(len(small)))


def test_compressed_inputs_give_the_same_dataset(tmp_path, hf_dir, corpus):
    path, _ = corpus
    raw = open(path, "rb").read()
    with gzip.open(tmp_path / "c.jsonl.gz", "wb") as f:
        f.write(raw)
    # two zstd frames back to back, as concatenated shards are
    half = raw.index(b"\n", len(raw) // 2) + 1
    compressor = zstandard.ZstdCompressor()
    (tmp_path / "c.jsonl.zst").write_bytes(compressor.compress(raw[:half]) + compressor.compress(raw[half:]))
    for name, source in (("plain", path), ("gz", str(tmp_path / "c.jsonl.gz")),
                         ("zst", str(tmp_path / "c.jsonl.zst"))):
        assert run(source, tmp_path / name, hf_dir, "--append-eod", "--workers", "2") == 0
    assert files(tmp_path / "plain") == files(tmp_path / "gz") == files(tmp_path / "zst")


def test_several_inputs_are_concatenated_in_order(tmp_path, hf_dir, corpus):
    path, docs = corpus
    lines = open(path, encoding="utf-8").read().splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_text("".join(lines[:600]), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("".join(lines[600:]), encoding="utf-8")
    assert run([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], tmp_path / "ab", hf_dir,
               "--append-eod") == 0
    assert run(path, tmp_path / "all", hf_dir, "--append-eod") == 0
    assert files(tmp_path / "ab") == files(tmp_path / "all")


BAD_LINES = [
    ('{"text": "fine"', "not valid JSON"),
    ('["text", "a list"]', "expected a JSON object, got an array"),
    ('{"body": "no text key"}', "missing key 'text'"),
    ('{"text": 42}', "key 'text' holds a number, expected a string"),
    ('{"text": null}', "key 'text' holds null, expected a string"),
    ('{"text": "lone \\ud800 surrogate"}', "key 'text' is not valid Unicode"),
]


@pytest.mark.parametrize("bad, reason", BAD_LINES)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_bad_line_is_named_and_leaves_nothing(tmp_path, hf_dir, capsys, bad, reason, workers):
    good = [json.dumps({"text": d}) for d in generated_docs(1200, seed=4)]
    path = write_jsonl(tmp_path / "in.jsonl", good[:1100] + [bad] + good[1100:])  # 2nd batch
    out = tmp_path / "out"
    assert run(path, out / "ds", hf_dir, "--append-eod", "--workers", workers) == 2
    err = capsys.readouterr().err
    assert f"{path}:1101: {reason}" in err and "--skip-bad-lines" in err
    assert list(out.iterdir()) == []


def test_skip_bad_lines_counts_them(tmp_path, hf_dir, capsys):
    docs = generated_docs(40, seed=5)
    lines = [json.dumps({"text": d}) for d in docs]
    path = write_jsonl(tmp_path / "in.jsonl", lines[:10] + [b for b, _ in BAD_LINES] + lines[10:] + [""])
    assert run(path, tmp_path / "skip", hf_dir, "--append-eod", "--skip-bad-lines") == 0
    captured = capsys.readouterr()
    assert f"skipping {path}:11: not valid JSON" in captured.err
    assert f"bad lines skipped: {len(BAD_LINES)}, blank lines: 1" in captured.out
    assert run(write_jsonl(tmp_path / "good.jsonl", lines), tmp_path / "good", hf_dir, "--append-eod") == 0
    assert files(tmp_path / "skip") == files(tmp_path / "good")


def test_missing_input_and_corrupt_archive(tmp_path, hf_dir, capsys):
    assert run(str(tmp_path / "absent.jsonl"), tmp_path / "out" / "x", hf_dir) == 2
    assert f"--input {tmp_path / 'absent.jsonl'}: file not found" in capsys.readouterr().err
    data = gzip.compress(b"".join(json.dumps({"text": d}).encode() + b"\n" for d in generated_docs(3000)))
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    assert run(str(tmp_path / "cut.jsonl.gz"), tmp_path / "out" / "x", hf_dir) == 2
    assert f"{tmp_path / 'cut.jsonl.gz'}: cannot read" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []


def test_token_id_outside_vocab_is_an_error(tmp_path, hf_dir, capsys, monkeypatch):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}, {"text": "the king and the queen"}])
    tokenizer = build_tokenizer(TokenizerConfig("PretrainedFromHF", tokenizer_name_or_path=hf_dir))
    limit = max(tokenizer.tokenize("a")) + 1  # line 1 fits, line 2 holds a larger id
    assert max(tokenizer.tokenize("the king and the queen")) >= limit
    monkeypatch.setattr(preprocess_data, "build_tokenizer", lambda config: _VocabSize(tokenizer, limit))
    assert run(path, tmp_path / "out" / "x", hf_dir) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: key 'text': token id" in err and f"outside the vocabulary [0, {limit})" in err
    assert list((tmp_path / "out").iterdir()) == []


def test_append_eod_needs_an_eod(tmp_path, hf_dir, capsys, monkeypatch):
    real = preprocess_data.build_tokenizer
    monkeypatch.setattr(preprocess_data, "build_tokenizer",
                        lambda config: type("NoEod", (_VocabSize,), {"eod": None})(real(config), 400))
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    assert run(path, tmp_path / "x", hf_dir, "--append-eod") == 2
    assert "--append-eod" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_runs_as_a_script(tmp_path):
    """`python tools/preprocess_data.py` works from any directory (sentencepiece keeps it quick)."""
    model = train_sentencepiece(tmp_path / "sp.model", generated_docs(200), 150)
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in generated_docs(20)])
    # a plain subprocess (bounded by its timeout), not tests/launch.py: that puts the checkout on
    # PYTHONPATH, which would hide whether the script finds the repository by itself
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tools", "preprocess_data.py"), "--input", path,
         "--output-prefix", str(tmp_path / "sp"), "--tokenizer-type", "GPTSentencePieceTokenizer",
         "--tokenizer-model", model, "--append-eod", "--workers", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "20 documents written, 0 empty dropped" in result.stdout
    data = MMapIndexedDataset(str(tmp_path / "sp_text_document"))
    assert len(data) == 20 and data.dtype == np.uint16
