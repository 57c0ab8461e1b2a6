"""GPT dataset index mappings: equal to Megatron-DeepSpeed's bit for bit, cached safely."""
import hashlib
import json
import logging
import os
import shutil

import numpy as np
import pytest

import megatron_reference as ref
from ascendspeed.data import index_cache, index_helpers
from ascendspeed.data.builders import build_train_valid_test_datasets
from ascendspeed.data.gpt_dataset import (GPTDataset, compute_index_mappings,
                                          get_train_valid_test_split_, plan_index_mappings)
from ascendspeed.errors import DatasetError
from megatron_ext.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder

ARRAYS = ("doc_idx", "sample_idx", "shuffle_idx")


def build(prefix, cache, num_samples, seq_length=1024, seed=1234, split="969, 30, 1", **kwargs):
    return build_train_valid_test_datasets([prefix], split, num_samples, seq_length, seed,
                                           data_cache_path=str(cache), **kwargs)


def make_corpus(prefix, num_docs, seed=0, low=1, high=60, vocab=1000):
    rng = np.random.RandomState(seed)
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    docs = []
    for _ in range(num_docs):
        doc = rng.randint(0, vocab, size=rng.randint(low, high))
        docs.append(doc)
        builder.add_item(doc)
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return docs


# ---------------------------------------------------------------------------------- spec vectors
def test_spec_vector_train_10000(megatron_fixture, tmp_path):
    train, valid, test = build(megatron_fixture, tmp_path, [10000, 0, 0])
    assert len(train) == 10390 and len(train.doc_idx) == 7752
    assert train.doc_idx[:8].tolist() == [21, 46, 705, 438, 352, 689, 790, 358]
    assert train.sample_idx[:5].tolist() == [[0, 0], [1, 601], [2, 365], [3, 698], [4, 376]]
    assert train.shuffle_idx[:8].tolist() == [1842, 7630, 6656, 1750, 3608, 4887, 3616, 3759]
    assert train.doc_idx.dtype == np.int32 and train.sample_idx.dtype == np.int32
    assert train.shuffle_idx.dtype == np.uint32
    assert len(valid) == 30
    assert valid.doc_idx[:8].tolist() == [976, 979, 973, 970, 997, 977, 972, 992]
    assert valid.shuffle_idx[:8].tolist() == [29, 3, 8, 22, 6, 15, 9, 13]
    assert len(test) == 0  # one 758-token document, shorter than a sample
    sample = train[0]["text"]
    assert sample.dtype == np.int64 and len(sample) == 1025


def test_spec_plan_numbers(megatron_fixture):
    sizes = MMapIndexedDataset(megatron_fixture).sizes
    plan = plan_index_mappings(int(sizes[:969].sum()), 10000, 1024, 0.95, "train")
    assert (plan.tokens_per_epoch, plan.num_epochs, plan.total_samples) == (1_329_945, 8, 10390)
    assert plan.num_samples_from_epochs_minus_one == 9091 and plan.separate_last_epoch


@pytest.mark.parametrize("cutoff,separate,doc_idx_head,doc_idx_sha", [
    (0.95, True, [626, 110, 77, 190, 168, 785, 311, 37], "620fb797"),
    (0.80, False, None, "4ee31374"),
])
def test_spec_vector_train_5000_and_cutoff(megatron_fixture, tmp_path, cutoff, separate,
                                           doc_idx_head, doc_idx_sha):
    train, _, _ = build(megatron_fixture, tmp_path, [5000, 0, 0], cutoff_last_epoch=cutoff)
    assert len(train) == 5195
    if doc_idx_head:
        assert train.doc_idx[:8].tolist() == doc_idx_head
        assert train.shuffle_idx[:8].tolist() == [2669, 2503, 3871, 3280, 2116, 2124, 974, 3181]
    # The spec's sha256 of the whole doc_idx, from Megatron-DeepSpeed's own run.
    assert hashlib.sha256(np.ascontiguousarray(train.doc_idx).tobytes()).hexdigest()[:8] == doc_idx_sha
    assert (train.shuffle_idx[3896:].min() >= 3896) == separate  # S_prev = 3896


@pytest.mark.parametrize("split,num_samples,seq_length,seed,cutoff", [
    ("969, 30, 1", (10000, 300, 5), 17, 3, 0.95),
    ("90,8,2", (3000, 100, 10), 256, 42, 0.80),
    ("100", (800, 0, 0), 512, 7, 0.95),
    ("969, 30, 1", (2500, 20, 0), 2048, 1234, 0.95),
    ("50/50", (7000, 7000, 0), 1024, 1234, 0.80),
])
def test_full_arrays_equal_reference(megatron_fixture, tmp_path, split, num_samples, seq_length,
                                     seed, cutoff):
    datasets = build(megatron_fixture, tmp_path, list(num_samples), seq_length, seed, split,
                     cutoff_last_epoch=cutoff)
    fixture = MMapIndexedDataset(megatron_fixture)
    bounds = ref.split_boundaries(split, len(fixture.sizes))
    tokens = [fixture[i] for i in range(len(fixture))]
    for index, dataset in enumerate(datasets):
        if bounds[index + 1] == bounds[index]:
            assert dataset is None
            continue
        documents = np.arange(bounds[index], bounds[index + 1], dtype=np.int32)
        expected = ref.index_mappings(documents, fixture.sizes, num_samples[index], seq_length,
                                      seed, cutoff)
        for name, want in zip(ARRAYS, expected):
            got = getattr(dataset, name)
            assert got.dtype == want.dtype and np.array_equal(got, want), name
        for k in range(0, len(dataset), max(1, len(dataset) // 7)):
            want = ref.sample_tokens(tokens, *expected, k, seq_length)
            assert np.array_equal(dataset[k]["text"], want)


def test_zero_length_sequences_are_stepped_over(tmp_path):
    prefix = str(tmp_path / "z")
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.RandomState(1)
    sequences = [rng.randint(0, 50, size=n) for n in [5, 0, 3, 0, 0, 7, 1, 0, 9, 4] * 5]
    for seq in sequences:
        builder.add_item(seq)
        builder.end_document()
    builder.finalize(prefix + ".idx")
    documents = np.arange(len(sequences), dtype=np.int32)
    sizes = np.array([len(s) for s in sequences], dtype=np.int32)
    for seq_length in (1, 2, 4, 9):
        expected = ref.index_mappings(documents, sizes, 300, seq_length, 5, 0.95)
        dataset = GPTDataset("train", prefix, documents, MMapIndexedDataset(prefix), 300,
                             seq_length, 5, data_cache_path=str(tmp_path))
        for name, want in zip(ARRAYS, expected):
            assert np.array_equal(getattr(dataset, name), want), (seq_length, name)
        for k in range(len(dataset)):
            assert np.array_equal(dataset[k]["text"], ref.sample_tokens(sequences, *expected, k,
                                                                        seq_length))


def test_sample_idx_widens_to_int64_with_same_values(megatron_fixture, monkeypatch):
    sizes = MMapIndexedDataset(megatron_fixture).sizes
    documents = np.arange(969, dtype=np.int32)
    plan = plan_index_mappings(int(sizes[:969].sum()), 3000, 512, 0.95, "train")
    narrow = compute_index_mappings(documents, sizes, plan, 512, 1234)
    monkeypatch.setattr(index_helpers, "INT32_MAX", 100)  # pretend doc_idx is past 2**31 entries
    wide = compute_index_mappings(documents, sizes, plan, 512, 1234)
    assert narrow["sample_idx"].dtype == np.int32 and wide["sample_idx"].dtype == np.int64
    assert np.array_equal(narrow["sample_idx"], wide["sample_idx"])


@pytest.mark.parametrize("size,expected", [(1000, [0, 969, 999, 1000]), (1500, [0, 1453, 1498, 1500]),
                                           (2500, [0, 2423, 2498, 2500]),
                                           (12345, [0, 11963, 12333, 12345]), (7, [0, 7, 7, 7])])
def test_split_boundaries(size, expected):
    assert get_train_valid_test_split_("969, 30, 1", size) == expected


@pytest.mark.parametrize("split", ["90/8/2", "100", "1,1", "98,1,1,5", " 7 , 2 , 1 "])
def test_split_syntaxes_match_reference(split):
    for size in (10, 999, 12345):
        assert get_train_valid_test_split_(split, size) == ref.split_boundaries(split, size)


@pytest.mark.parametrize("split,message", [("a,b,c", "expected up to three numbers"),
                                           ("0,0,0", "sum to 0"), ("-1,2,0", ">= 0")])
def test_bad_split_strings(split, message):
    with pytest.raises(DatasetError, match=message):
        get_train_valid_test_split_(split, 100)


# ---------------------------------------------------------------------------------- bad input
def test_split_too_small_for_one_sample_says_what_to_change(megatron_fixture, tmp_path):
    # The test split is a single 758-token document; asking it for samples at seq 1024 fails.
    with pytest.raises(DatasetError) as error:
        build(megatron_fixture, tmp_path, [100, 10, 5])
    message = str(error.value)
    assert "test split" in message and "758 tokens" in message
    for advice in ("shorter --seq-length", "more documents (--split)", "fewer samples"):
        assert advice in message


def test_empty_split_tokens(tmp_path):
    prefix = str(tmp_path / "e")
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(4):
        builder.add_item([])
        builder.end_document()
    builder.finalize(prefix + ".idx")
    with pytest.raises(DatasetError, match="hold no tokens"):
        build(prefix, tmp_path, [5, 0, 0], 8, split="100")


# ---------------------------------------------------------------------------------- caching
def cache_files(directory):
    return sorted(f for f in os.listdir(directory) if "indexmap" in f)


def test_cache_uses_megatron_names_and_is_reused(megatron_fixture, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    build(megatron_fixture, tmp_path, [10000, 0, 0])
    base = "meg-gpt2-openwebtext_text_document_train_indexmap_10000ns_1024sl_1234s"
    for array in ARRAYS:
        assert os.path.exists(tmp_path / f"{base}_{array}.npy")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    mtimes = {f: os.path.getmtime(tmp_path / f) for f in cache_files(tmp_path)}
    caplog.clear()
    build(megatron_fixture, tmp_path, [10000, 0, 0])
    assert "built train index" not in caplog.text
    assert mtimes == {f: os.path.getmtime(tmp_path / f) for f in cache_files(tmp_path)}


def test_stale_cache_with_other_split_is_rebuilt(megatron_fixture, tmp_path, caplog):
    build(megatron_fixture, tmp_path, [2000, 0, 0])
    caplog.set_level(logging.INFO)
    train, _, _ = build(megatron_fixture, tmp_path, [2000, 0, 0], split="900, 99, 1")
    assert "built for other data, split or cutoff" in caplog.text
    expected = ref.index_mappings(np.arange(900, dtype=np.int32),
                                  MMapIndexedDataset(megatron_fixture).sizes, 2000, 1024, 1234, 0.95)
    assert np.array_equal(train.doc_idx, expected[0])


def test_megatron_cache_without_sidecar_is_reused_when_consistent(megatron_fixture, tmp_path, caplog):
    build(megatron_fixture, tmp_path, [5000, 0, 0])
    for meta in [f for f in os.listdir(tmp_path) if f.endswith("_meta.json")]:
        os.remove(tmp_path / meta)  # what Megatron leaves behind
    caplog.set_level(logging.INFO)
    train, _, _ = build(megatron_fixture, tmp_path, [5000, 0, 0])
    assert "written without a sidecar" in caplog.text and "built train" not in caplog.text
    assert train.doc_idx[:3].tolist() == [626, 110, 77]


def test_megatron_cache_built_with_other_cutoff_is_rebuilt(megatron_fixture, tmp_path, caplog):
    other = tmp_path / "nvidia"
    other.mkdir()
    build(megatron_fixture, other, [5000, 0, 0], cutoff_last_epoch=0.80)  # NVIDIA's 0.80
    for name in os.listdir(other):
        if name.endswith(".npy"):
            shutil.copy(other / name, tmp_path / name)  # a cache NVIDIA Megatron-LM wrote
    caplog.set_level(logging.INFO)
    train, _, _ = build(megatron_fixture, tmp_path, [5000, 0, 0])  # BLOOM's 0.95
    assert "does not fit this data" in caplog.text
    assert train.doc_idx[:3].tolist() == [626, 110, 77]


def test_corrupt_cache_file_is_rebuilt(megatron_fixture, tmp_path):
    build(megatron_fixture, tmp_path, [5000, 0, 0])
    path = [f for f in os.listdir(tmp_path) if f.startswith(
        "meg-gpt2-openwebtext_text_document_train") and f.endswith("shuffle_idx.npy")][0]
    with open(tmp_path / path, "r+b") as f:
        f.truncate(100)
    train, _, _ = build(megatron_fixture, tmp_path, [5000, 0, 0])
    assert train.shuffle_idx[:3].tolist() == [2669, 2503, 3871]


def test_sidecar_records_identity(megatron_fixture, tmp_path):
    build(megatron_fixture, tmp_path, [5000, 0, 0])
    meta = json.load(open(tmp_path / "meg-gpt2-openwebtext_text_document_train_indexmap_5000ns_1024sl_1234s_meta.json"))
    assert meta["first_document"] == 0 and meta["end_document"] == 969
    assert meta["cutoff_last_epoch"] == 0.95 and meta["num_epochs"] == 4
    assert meta["separate_last_epoch"] is True


def test_default_cache_lives_next_to_the_data(tmp_path):
    prefix = str(tmp_path / "corpus")
    make_corpus(prefix, 200)
    build_train_valid_test_datasets([prefix], "90,10,0", [500, 10, 0], 32, 1234)
    assert os.path.exists(f"{prefix}_train_indexmap_500ns_32sl_1234s_doc_idx.npy")
    assert os.path.exists(f"{prefix}_valid_indexmap_10ns_32sl_1234s_meta.json")


def test_unwritable_data_dir_builds_in_memory(tmp_path, caplog, monkeypatch):
    prefix = str(tmp_path / "corpus")
    make_corpus(prefix, 100)
    monkeypatch.setattr(index_cache, "is_writable_dir", lambda path: False)
    train, _, _ = build_train_valid_test_datasets([prefix], "100", [100, 0, 0], 16, 1234)
    assert len(train) >= 100 and "building them in memory" in caplog.text
    assert cache_files(tmp_path) == []


def test_cache_paths_match_megatron_names():
    paths = index_cache.cache_paths("/d/x_text_document", "train", 10, 20, 30)
    assert paths["doc_idx"] == "/d/x_text_document_train_indexmap_10ns_20sl_30s_doc_idx.npy"
    assert index_cache.cache_paths("/d/x", "valid", 1, 2, 3, "/c")["shuffle_idx"] == \
        "/c/x_valid_indexmap_1ns_2sl_3s_shuffle_idx.npy"


def test_first_train_sample_text(megatron_fixture, tmp_path):
    from ascendspeed.data.tokenizer import GPT2BPETokenizer
    from conftest import shared_fixture

    tokenizer = GPT2BPETokenizer(shared_fixture("megatron", "gpt2-tiny-vocab.json"),
                                 shared_fixture("megatron", "gpt2-tiny-merges.txt"))
    train, _, _ = build(megatron_fixture, tmp_path, [10000, 0, 0])
    text = tokenizer.detokenize(train[0]["text"].tolist())
    assert text.startswith(" not have Humphrey Kayange to call on")
