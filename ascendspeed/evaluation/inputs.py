"""Reading evaluation inputs: JSON-lines files and Megatron .bin/.idx datasets as token streams.

Every problem is an EvalInputError whose message names the file (and line), so the command line
can print it as one line and exit 2.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from ascendspeed.data.text_lines import read_utf8_lines
from ascendspeed.errors import EvalInputError
from megatron_ext.indexed_dataset import (IndexedDatasetError, MMapIndexedDataset, data_file_path,
                                          dataset_exists)


def read_jsonl(path: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a UTF-8 JSON-lines file."""
    records = []
    for number, line in read_utf8_lines(path, error=EvalInputError):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise EvalInputError(f"{path}: line {number} is not valid JSON ({error.msg} at "
                                 f"column {error.colno})") from None
        if not isinstance(record, dict):
            raise EvalInputError(f"{path}: line {number} is not a JSON object")
        records.append((number, record))
    if not records:
        raise EvalInputError(f"{path}: no records (the file is empty or blank)")
    return records


def field(path: str, number: int, record: dict, key: str, kind: type, what: str = "") -> Any:
    """record[key], checked to be a `kind`; the error names the file, line and key."""
    if key not in record:
        raise EvalInputError(f"{path}: line {number} has no {key!r} key{what}")
    value = record[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise EvalInputError(f"{path}: line {number}: {key!r} must be a {kind.__name__}, got "
                             f"{type(value).__name__}")
    return value


def jsonl_token_stream(path: str, key: str, tokenizer, append_eod: bool = True) -> np.ndarray:
    """The documents record[key] of a JSON-lines file, tokenized and concatenated in order, each
    followed by the tokenizer's EOD (as tools/preprocess_data.py --append-eod writes them)."""
    records = read_jsonl(path)
    texts = [field(path, number, record, key, str) for number, record in records]
    if append_eod and tokenizer.eod is None:
        raise EvalInputError(f"{path}: the tokenizer has no end-of-document token to separate "
                             f"the documents with")
    pieces = []
    for ids in tokenizer.encode_batch(texts):
        pieces.append(np.asarray(ids, dtype=np.int64))
        if append_eod:
            pieces.append(np.asarray([tokenizer.eod], dtype=np.int64))
    stream = np.concatenate(pieces)
    if len(stream) < 2:
        raise EvalInputError(f"{path}: fewer than 2 tokens in its {key!r} texts, nothing to predict")
    return stream


def indexed_token_stream(prefix: str) -> np.ndarray:
    """Every sequence of a Megatron mmap dataset in file order, as one read-only memory map of the
    .bin (which holds exactly that, as the reader checks against the index; nothing is read until
    a window is), the documents as preprocessing wrote them, EODs included if it appended them."""
    if not dataset_exists(prefix):
        raise EvalInputError(f"--data-path {prefix}: no dataset there (expected {prefix}.bin "
                             f"and {prefix}.idx)")
    try:
        dataset = MMapIndexedDataset(prefix)
    except IndexedDatasetError as error:
        raise EvalInputError(str(error)) from None
    if int(dataset.sizes.sum(dtype=np.int64)) < 2:
        raise EvalInputError(f"--data-path {prefix}: fewer than 2 tokens, nothing to predict")
    return np.memmap(data_file_path(prefix), dtype=dataset.dtype, mode="r")
