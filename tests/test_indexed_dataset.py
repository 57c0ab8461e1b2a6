"""The mmap .bin/.idx format: byte-exact with Megatron's files, int64 offsets, clear errors."""
import filecmp
import os
import struct

import numpy as np
import pytest

from megatron_ext import indexed_dataset as idx
from megatron_ext.indexed_dataset import (IndexedDatasetError, MMapIndexedDataset,
                                          MMapIndexedDatasetBuilder)


def write_dataset(prefix, sequences, dtype=np.uint16, documents=None):
    """Sequences grouped into documents (default: one sequence per document)."""
    documents = documents or [[i] for i in range(len(sequences))]
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for document in documents:
        for i in document:
            builder.add_item(np.asarray(sequences[i]))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def test_reads_megatron_fixture_header_and_tokens(megatron_fixture):
    dataset = MMapIndexedDataset(megatron_fixture)
    assert len(dataset) == 1000 and dataset.dtype == np.uint16
    assert dataset.doc_idx.tolist() == list(range(1001))
    assert dataset.sizes.min() == 193 and dataset.sizes.max() == 21809
    assert int(dataset.sizes.sum(dtype=np.int64)) == 1_361_845
    expected_pointers = 2 * np.concatenate([[0], np.cumsum(dataset.sizes, dtype=np.int64)[:-1]])
    assert np.array_equal(dataset.index.pointers, expected_pointers)
    assert all(dataset[i][-1] == 4999 for i in range(len(dataset)))  # --append-eod
    assert os.path.getsize(megatron_fixture + ".idx") == 20_042


def test_fixture_round_trip_is_byte_exact(megatron_fixture, tmp_path):
    source = MMapIndexedDataset(megatron_fixture)
    out = write_dataset(str(tmp_path / "copy"), [source[i] for i in range(len(source))])
    assert filecmp.cmp(out + ".bin", megatron_fixture + ".bin", shallow=False)
    assert filecmp.cmp(out + ".idx", megatron_fixture + ".idx", shallow=False)


def test_spec_toy_example_bytes(tmp_path):
    # Three sequences [5,6,7] [8,9] [10..13] in two documents -> 94-byte uint16 index.
    prefix = write_dataset(str(tmp_path / "toy"), [[5, 6, 7], [8, 9], [10, 11, 12, 13]],
                           documents=[[0, 1], [2]])
    raw = open(prefix + ".idx", "rb").read()
    assert len(raw) == 94
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<QBQQ", raw[9:34]) == (1, 8, 3, 3)
    assert np.frombuffer(raw[34:46], "<i4").tolist() == [3, 2, 4]
    assert np.frombuffer(raw[46:70], "<i8").tolist() == [0, 6, 10]
    assert np.frombuffer(raw[70:94], "<i8").tolist() == [0, 2, 3]
    assert open(prefix + ".bin", "rb").read() == np.arange(5, 14, dtype="<u2").tobytes()


@pytest.mark.parametrize("dtype,code", [(np.uint8, 1), (np.int8, 2), (np.int16, 3), (np.int32, 4),
                                        (np.int64, 5), (np.uint16, 8)])
def test_every_integer_dtype_code_round_trips(tmp_path, dtype, code):
    sequences = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6])]
    prefix = write_dataset(str(tmp_path / "d"), sequences, dtype=dtype)
    assert open(prefix + ".idx", "rb").read()[17] == code
    dataset = MMapIndexedDataset(prefix)
    assert dataset.dtype == dtype
    assert [dataset[i].tolist() for i in range(3)] == [[1, 2, 3], [4], [5, 6]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_dtypes_are_refused_for_writing(tmp_path, dtype):
    with pytest.raises(IndexedDatasetError, match="float"):
        MMapIndexedDatasetBuilder(str(tmp_path / "f.bin"), dtype=dtype)
    assert not os.listdir(tmp_path)


def test_partial_reads_and_slices_are_zero_copy(tmp_path):
    prefix = write_dataset(str(tmp_path / "d"), [list(range(10)), list(range(100, 105))])
    dataset = MMapIndexedDataset(prefix)
    part = dataset.get(0, offset=3, length=4)
    assert part.tolist() == [3, 4, 5, 6] and not part.flags.owndata
    assert dataset.get(1, offset=2).tolist() == [102, 103, 104]
    assert [a.tolist() for a in dataset[0:2]] == [list(range(10)), list(range(100, 105))]
    assert dataset[-1].tolist() == list(range(100, 105))
    with pytest.raises(IndexError):
        dataset.get(1, offset=3, length=5)
    with pytest.raises(IndexError):
        dataset[2]


def test_builder_refuses_ids_that_do_not_fit_and_leaves_nothing(tmp_path):
    builder = MMapIndexedDatasetBuilder(str(tmp_path / "d.bin"), dtype=np.uint16)
    with pytest.raises(IndexedDatasetError, match="do not fit"):
        builder.add_item(np.array([1, 70000]))
    builder.abort()
    assert os.listdir(tmp_path) == []


def test_builder_writes_nothing_under_final_names_until_finalize(tmp_path):
    with pytest.raises(RuntimeError):
        with MMapIndexedDatasetBuilder(str(tmp_path / "d.bin"), dtype=np.uint16) as builder:
            builder.add_item([1, 2, 3])
            builder.end_document()
            assert not os.path.exists(tmp_path / "d.bin")
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_merge_appends_sequences_and_shifted_doc_idx(tmp_path):
    a = write_dataset(str(tmp_path / "a"), [[1, 2], [3], [4, 5, 6]], documents=[[0, 1], [2]])
    b = write_dataset(str(tmp_path / "b"), [[7], [8, 9]], documents=[[0, 1]])
    both = write_dataset(str(tmp_path / "both"), [[1, 2], [3], [4, 5, 6], [7], [8, 9]],
                         documents=[[0, 1], [2], [3, 4]])
    builder = MMapIndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)
    builder.merge_file_(a)
    builder.merge_file_(b)
    builder.finalize(str(tmp_path / "m.idx"))
    assert filecmp.cmp(tmp_path / "m.idx", both + ".idx", shallow=False)
    assert filecmp.cmp(tmp_path / "m.bin", both + ".bin", shallow=False)


def test_merge_refuses_other_dtype(tmp_path):
    a = write_dataset(str(tmp_path / "a"), [[1, 2]], dtype=np.int32)
    builder = MMapIndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)
    with pytest.raises(IndexedDatasetError, match="int32.*uint16|dtype"):
        builder.merge_file_(a)
    builder.abort()


def test_pointers_are_int64_past_2_31_bytes(tmp_path):
    # Three int32 sequences of 2**30 tokens: byte offsets 0, 2**32, 2**33 (no real 12 GB needed).
    sizes = np.full(3, 2 ** 30, dtype=np.int32)
    with open(tmp_path / "big.idx", "wb") as f:
        idx.write_index(f, np.int32, sizes, np.array([0, 3]))
    index = MMapIndexedDataset.Index(str(tmp_path / "big.idx"))
    assert index.pointers.tolist() == [0, 2 ** 32, 2 ** 33]
    assert index.data_bytes() == 3 * 2 ** 32


def test_reads_tokens_beyond_4_gib_from_a_sparse_file(tmp_path):
    sizes = np.array([2 ** 31 - 1, 2 ** 31 - 1, 5], dtype=np.int32)  # uint16: the last one at ~8 GiB
    with open(tmp_path / "big.idx", "wb") as f:
        idx.write_index(f, np.uint16, sizes, np.array([0, 1, 2, 3]))
    last = 2 * 2 * (2 ** 31 - 1)
    with open(tmp_path / "big.bin", "wb") as f:
        f.truncate(last + 10)  # sparse: no disk blocks for the zeros
        f.seek(last)
        f.write(np.array([11, 12, 13, 14, 15], dtype="<u2").tobytes())
        f.seek(2 ** 31 + 6)  # inside sequence 0, past 2**31 bytes
        f.write(np.array([42], dtype="<u2").tobytes())
    dataset = MMapIndexedDataset(str(tmp_path / "big"))
    assert dataset[2].tolist() == [11, 12, 13, 14, 15]
    assert dataset.get(2, offset=3, length=2).tolist() == [14, 15]
    assert dataset.get(0, offset=2 ** 30 + 3, length=1).tolist() == [42]


# ---------------------------------------------------------------------------------- bad input
@pytest.fixture
def small(tmp_path):
    return write_dataset(str(tmp_path / "small"), [[1, 2, 3], [4, 5]])


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_missing_idx(small):
    os.remove(small + ".idx")
    with pytest.raises(IndexedDatasetError, match=r"small\.idx: index file not found"):
        MMapIndexedDataset(small)


def test_missing_bin(small):
    os.remove(small + ".bin")
    with pytest.raises(IndexedDatasetError, match=r"small\.bin: data file not found"):
        MMapIndexedDataset(small)


def test_wrong_magic(small):
    _patch(small + ".idx", 0, b"NOTMAGIC!")
    with pytest.raises(IndexedDatasetError, match=r"small\.idx: not a Megatron mmap index"):
        MMapIndexedDataset(small)


def test_legacy_tntidx_is_named(small):
    _patch(small + ".idx", 0, b"TNTIDX\x00\x00")
    with pytest.raises(IndexedDatasetError, match="TNTIDX"):
        MMapIndexedDataset(small)


def test_unknown_version(small):
    _patch(small + ".idx", 9, struct.pack("<Q", 2))
    with pytest.raises(IndexedDatasetError, match="version 2, expected 1"):
        MMapIndexedDataset(small)


@pytest.mark.parametrize("code,message", [(9, "unknown dtype code 9"), (6, "dtype code 6 means"),
                                          (7, "dtype code 7 means")])
def test_bad_dtype_code(small, code, message):
    _patch(small + ".idx", 17, bytes([code]))
    with pytest.raises(IndexedDatasetError, match=message):
        MMapIndexedDataset(small)


def test_truncated_idx(small):
    with open(small + ".idx", "r+b") as f:
        f.truncate(os.path.getsize(small + ".idx") - 8)
    with pytest.raises(IndexedDatasetError, match=r"small\.idx: index holds .* truncated"):
        MMapIndexedDataset(small)


def test_bin_shorter_than_index_says(small):
    with open(small + ".bin", "r+b") as f:
        f.truncate(4)
    with pytest.raises(IndexedDatasetError, match=r"small\.bin: holds 4 bytes but its index says 10"):
        MMapIndexedDataset(small)


def test_bin_longer_than_index_says(small):
    with open(small + ".bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(IndexedDatasetError, match="trailing data"):
        MMapIndexedDataset(small)
