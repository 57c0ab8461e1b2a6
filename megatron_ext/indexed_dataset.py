"""Megatron's mmap indexed dataset: the `.bin/.idx` pair, byte-compatible with Megatron-LM and
Megatron-DeepSpeed.

`P.idx` (all little-endian, no padding):
    magic b"MMIDIDX\\x00\\x00" | u64 version = 1 | u8 dtype code | u64 N sequences | u64 D doc_idx entries
    | int32 sizes[N] | int64 pointers[N] (byte offsets into P.bin) | int64 doc_idx[D]
`P.bin` is every sequence's tokens back to back.

Reading is zero-copy (numpy views over mmaps; a view keeps its mmap alive, so arrays handed out
stay valid after the dataset object is gone — the maps are never closed by hand). Writing goes to a temporary name and is renamed
into place only by `finalize`, index last, so a prefix whose `.idx` exists is always complete.
All offset arithmetic is int64: datasets past 2**31 tokens or bytes are ordinary.
"""
from __future__ import annotations

import array
import os
import shutil
import struct
import numpy as np

_MAGIC = b"MMIDIDX\x00\x00"
_LEGACY_MAGIC = b"TNTIDX\x00\x00"
_VERSION = 1
_HEADER_SIZE = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, N, D

# Codes 6 and 7 mean different float types in different Megatron forks; token files never use them.
_CODE_TO_DTYPE = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_AMBIGUOUS_CODES = {6: "float64 in Megatron-LM and BigScience, float32 in AscendSpeed 2023",
                    7: "float64 in BigScience and AscendSpeed 2023, float32 in Megatron-LM core"}


class IndexedDatasetError(ValueError):
    """A `.bin/.idx` pair that is missing, malformed or inconsistent."""


def code(dtype) -> int:
    """Megatron's dtype code for a token dtype; float dtypes are refused (their codes are ambiguous)."""
    dtype = np.dtype(dtype)
    for k, v in _CODE_TO_DTYPE.items():
        if np.dtype(v) == dtype:
            return k
    raise IndexedDatasetError(
        f"cannot write tokens of dtype {dtype}: Megatron's index supports uint8, int8, int16, int32, "
        f"int64 and uint16 (float codes 6/7 mean different types in different forks)")


def best_fitting_dtype(vocab_size: int | None = None):
    """uint16 when every id fits comfortably (Megatron's < 65500 rule), else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def index_file_path(prefix_path: str) -> str:
    return prefix_path + ".idx"


def data_file_path(prefix_path: str) -> str:
    return prefix_path + ".bin"


def dataset_exists(prefix_path: str) -> bool:
    return os.path.exists(index_file_path(prefix_path)) and os.path.exists(data_file_path(prefix_path))


class MMapIndexedDataset:
    """Reader for `prefix.bin` / `prefix.idx` written by Megatron (or by us)."""

    class Index:
        """The parsed `.idx`: `sizes` (int32), `pointers` (int64 byte offsets), `doc_idx` (int64)."""

        def __init__(self, path: str, skip_warmup: bool = True):
            if not os.path.exists(path):
                raise IndexedDatasetError(f"{path}: index file not found")
            file_size = os.path.getsize(path)
            with open(path, "rb") as stream:
                header = stream.read(_HEADER_SIZE)
            if header[:8] == _LEGACY_MAGIC:
                raise IndexedDatasetError(
                    f"{path}: this is Megatron's legacy 'lazy'/'cached' (TNTIDX) format, which GPT "
                    f"pretraining cannot use; re-run tools/preprocess_data.py with --dataset-impl mmap")
            if header[:9] != _MAGIC:
                raise IndexedDatasetError(
                    f"{path}: not a Megatron mmap index (magic {header[:9]!r}, expected {_MAGIC!r})")
            if len(header) < _HEADER_SIZE:
                raise IndexedDatasetError(
                    f"{path}: truncated header ({len(header)} bytes, expected {_HEADER_SIZE})")
            (version,) = struct.unpack("<Q", header[9:17])
            if version != _VERSION:
                raise IndexedDatasetError(f"{path}: index version {version}, expected {_VERSION}")
            (dtype_code,) = struct.unpack("<B", header[17:18])
            if dtype_code in _AMBIGUOUS_CODES:
                raise IndexedDatasetError(
                    f"{path}: dtype code {dtype_code} means {_AMBIGUOUS_CODES[dtype_code]}; token "
                    f"datasets use 8 (uint16) or 4 (int32)")
            if dtype_code not in _CODE_TO_DTYPE:
                raise IndexedDatasetError(
                    f"{path}: unknown dtype code {dtype_code}, expected one of {sorted(_CODE_TO_DTYPE)}")
            self.dtype = _CODE_TO_DTYPE[dtype_code]
            self.dtype_size = np.dtype(self.dtype).itemsize
            n, d = struct.unpack("<QQ", header[18:34])
            expected = _HEADER_SIZE + 12 * n + 8 * d
            if file_size != expected:
                raise IndexedDatasetError(
                    f"{path}: index holds {file_size} bytes, but its header ({n} sequences, {d} doc_idx "
                    f"entries) needs exactly {expected}; the file is truncated or corrupt")
            self._len = n
            self._doc_count = d
            if skip_warmup is False:
                _warmup(path)
            self._buffer_mmap = np.memmap(path, mode="r", order="C")
            self._bin_buffer = memoryview(self._buffer_mmap)
            self._sizes = np.frombuffer(self._bin_buffer, dtype="<i4", count=n, offset=_HEADER_SIZE)
            self._pointers = np.frombuffer(self._bin_buffer, dtype="<i8", count=n,
                                           offset=_HEADER_SIZE + 4 * n)
            self._doc_idx = np.frombuffer(self._bin_buffer, dtype="<i8", count=d,
                                          offset=_HEADER_SIZE + 12 * n)
            if d == 0 or self._doc_idx[0] != 0 or self._doc_idx[-1] != n:
                raise IndexedDatasetError(
                    f"{path}: doc_idx must start at 0 and end at the sequence count {n}; got "
                    f"{self._doc_idx[:1].tolist()} ... {self._doc_idx[-1:].tolist()}")

        @property
        def sizes(self) -> np.ndarray:
            return self._sizes

        @property
        def pointers(self) -> np.ndarray:
            return self._pointers

        @property
        def doc_idx(self) -> np.ndarray:
            return self._doc_idx

        def __getitem__(self, i):
            return self._pointers[i], self._sizes[i]

        def __len__(self) -> int:
            return self._len

        def data_bytes(self) -> int:
            """Bytes the `.bin` must hold according to this index."""
            if self._len == 0:
                return 0
            return int(self._pointers[-1]) + int(self._sizes[-1]) * self.dtype_size

        @staticmethod
        def writer(path: str, dtype):
            return _IndexWriter(path, dtype)

    def __init__(self, path: str, skip_warmup: bool = True):
        self._path = path
        self._index = self.Index(index_file_path(path), skip_warmup)
        bin_path = data_file_path(path)
        if not os.path.exists(bin_path):
            raise IndexedDatasetError(f"{bin_path}: data file not found (its index {path}.idx exists)")
        bin_size = os.path.getsize(bin_path)
        needed = self._index.data_bytes()
        if bin_size != needed:
            raise IndexedDatasetError(
                f"{bin_path}: holds {bin_size} bytes but its index says {needed} "
                f"({'truncated' if bin_size < needed else 'trailing data'}); re-create the dataset")
        if skip_warmup is False:
            _warmup(bin_path)
        if bin_size:
            self._bin_buffer_mmap = np.memmap(bin_path, mode="r", order="C")
            self._bin_buffer = memoryview(self._bin_buffer_mmap)
        else:  # np.memmap refuses empty files
            self._bin_buffer_mmap = None
            self._bin_buffer = memoryview(b"")

    def __getstate__(self):
        return self._path

    def __setstate__(self, state):
        self.__init__(state)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, idx):
        """One sequence (a zero-copy array) or, for a contiguous slice, a list of them."""
        if isinstance(idx, (int, np.integer)):
            idx = self._check_index(idx)
            ptr, size = self._index[idx]
            return np.frombuffer(self._bin_buffer, dtype=self._index.dtype, count=size, offset=ptr)
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices into indexed dataset must be contiguous")
            if stop <= start:
                return []
            ptr = self._index._pointers[start]
            sizes = self._index._sizes[start:stop]
            offsets = np.cumsum(sizes, dtype=np.int64)[:-1]
            total = int(sizes.sum(dtype=np.int64))
            np_array = np.frombuffer(self._bin_buffer, dtype=self._index.dtype, count=total, offset=ptr)
            return np.split(np_array, offsets)
        raise TypeError(f"indexed dataset indices must be int or slice, not {type(idx).__name__}")

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence idx, as a zero-copy view."""
        idx = self._check_index(idx)
        ptr, size = self._index[idx]
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"{self._path}: tokens [{offset}, {offset + length}) out of range for "
                             f"sequence {idx} of length {size}")
        ptr = int(ptr) + int(offset) * self._index.dtype_size
        return np.frombuffer(self._bin_buffer, dtype=self._index.dtype, count=length, offset=ptr)

    def _check_index(self, idx) -> int:
        n = len(self)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"{self._path}: sequence {idx} out of range [0, {n})")
        return int(idx)

    @property
    def path(self) -> str:
        return self._path

    @property
    def dtype(self):
        return self._index.dtype

    @property
    def sizes(self) -> np.ndarray:
        return self._index.sizes

    @property
    def doc_idx(self) -> np.ndarray:
        return self._index.doc_idx

    @property
    def index(self) -> "MMapIndexedDataset.Index":
        return self._index

    @property
    def supports_prefetch(self) -> bool:
        return False

    @staticmethod
    def exists(path: str) -> bool:
        return dataset_exists(path)


class _IndexWriter:
    """Writes an `.idx` for the given sizes and doc_idx (pointers are derived, in int64)."""

    def __init__(self, path: str, dtype):
        self._path = path
        self._dtype = dtype

    def __enter__(self):
        self._file = open(self._path, "wb")
        return self

    def write(self, sizes, doc_idx):
        write_index(self._file, self._dtype, sizes, doc_idx)

    def __exit__(self, exc_type, exc_val, exc_tb):
        self._file.close()


def write_index(stream, dtype, sizes, doc_idx) -> None:
    sizes = np.asarray(sizes, dtype="<i4")
    doc_idx = np.asarray(doc_idx, dtype="<i8")
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(sizes), dtype="<i8")
    if len(sizes) > 1:
        np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= itemsize
    stream.write(_MAGIC)
    stream.write(struct.pack("<Q", _VERSION))
    stream.write(struct.pack("<B", code(dtype)))
    stream.write(struct.pack("<Q", len(sizes)))
    stream.write(struct.pack("<Q", len(doc_idx)))
    stream.write(sizes.tobytes(order="C"))
    stream.write(pointers.tobytes(order="C"))
    stream.write(doc_idx.tobytes(order="C"))


class MMapIndexedDatasetBuilder:
    """Writes a `.bin/.idx` pair. Tokens go to a temporary file; `finalize(idx_path)` writes the
    index and renames both into place (the `.bin` first, the `.idx` last)."""

    def __init__(self, out_file: str, dtype=np.int64):
        code(dtype)  # refuse float dtypes before writing anything
        self._out_file = out_file
        self._tmp_file = out_file + ".tmp"
        self._data_file = open(self._tmp_file, "wb")
        self._dtype = np.dtype(dtype)
        info = np.iinfo(self._dtype)
        self._min, self._max = info.min, info.max
        self._sizes = array.array("i")
        self._doc_idx = array.array("q", [0])

    @property
    def dtype(self):
        return self._dtype

    def add_item(self, tensor) -> None:
        """Append one sequence (a torch tensor, numpy array or list of ids)."""
        values = np.asarray(tensor)
        if values.size and (values.min() < self._min or values.max() > self._max):
            raise IndexedDatasetError(
                f"{self._out_file}: token ids in [{values.min()}, {values.max()}] do not fit {self._dtype}")
        self._data_file.write(values.astype(self._dtype, copy=False).tobytes(order="C"))
        self._sizes.append(values.size)

    def add_document(self, tensor, lengths) -> None:
        """Append one document made of several sequences of the given lengths, then end it."""
        values = np.asarray(tensor)
        if sum(lengths) != values.size:
            raise ValueError(f"lengths sum to {sum(lengths)} but the document holds {values.size} tokens")
        start = 0
        for length in lengths:
            self.add_item(values[start:start + length])
            start += length
        self.end_document()

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def merge_file_(self, another_file: str) -> None:
        """Append every sequence and document of the dataset at prefix `another_file`."""
        index = MMapIndexedDataset.Index(index_file_path(another_file))
        if np.dtype(index.dtype) != self._dtype:
            raise IndexedDatasetError(
                f"{another_file}: dtype {np.dtype(index.dtype)} differs from the dataset being built "
                f"({self._dtype}); merge only datasets made with the same tokenizer")
        bin_path = data_file_path(another_file)
        if not os.path.exists(bin_path) or os.path.getsize(bin_path) != index.data_bytes():
            raise IndexedDatasetError(f"{bin_path}: missing or not the size its index says")
        offset = len(self._sizes)
        self._sizes.frombytes(np.ascontiguousarray(index.sizes, dtype=np.int32).tobytes())
        self._doc_idx.frombytes((index.doc_idx[1:].astype(np.int64) + offset).tobytes())
        with open(bin_path, "rb") as f:
            shutil.copyfileobj(f, self._data_file, length=16 << 20)

    def finalize(self, index_file: str) -> None:
        self._data_file.close()
        tmp_index = index_file + ".tmp"
        try:
            with open(tmp_index, "wb") as stream:
                write_index(stream, self._dtype, np.frombuffer(self._sizes, dtype=np.int32),
                            np.frombuffer(self._doc_idx, dtype=np.int64))
            os.replace(self._tmp_file, self._out_file)
            os.replace(tmp_index, index_file)
        except BaseException:
            _remove_quietly(tmp_index)
            self.abort()
            raise

    def abort(self) -> None:
        """Drop everything written so far (nothing appears under the final names)."""
        if not self._data_file.closed:
            self._data_file.close()
        _remove_quietly(self._tmp_file)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        if exc_type is not None:
            self.abort()


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _warmup(path: str) -> None:
    with open(path, "rb") as stream:
        while stream.read(100 * 1024 * 1024):
            pass


def make_dataset(path: str, impl: str = "mmap", skip_warmup: bool = True) -> MMapIndexedDataset:
    if impl not in ("mmap", "infer"):
        raise IndexedDatasetError(f"dataset impl {impl!r} is not supported; GPT pretraining uses 'mmap'")
    return MMapIndexedDataset(path, skip_warmup)


def make_builder(out_file: str, impl: str = "mmap", vocab_size: int | None = None,
                 dtype=None) -> MMapIndexedDatasetBuilder:
    if impl != "mmap":
        raise IndexedDatasetError(f"dataset impl {impl!r} is not supported for writing; use 'mmap'")
    return MMapIndexedDatasetBuilder(out_file, dtype=dtype or best_fitting_dtype(vocab_size))
