"""Tokenize a JSON-lines corpus into Megatron's mmap `.bin/.idx` datasets (BigScience's flags).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/my-corpus \
        --tokenizer-type PretrainedFromHF --tokenizer-name-or-path TOKENIZER_DIR \
        --append-eod --workers 4

Each line holds one JSON object. Every key of --json-keys gets its own dataset
`{output-prefix}_{key}_document.{bin,idx}`, one sequence per document, in input order whatever
--workers is. A document with no tokens is dropped (no sequence, no doc_idx entry) and counted.
Inputs may be `.jsonl`/`.json`, `.jsonl.gz` or `.jsonl.zst`; blank lines are ignored.

A bad line (not JSON, not an object, a key missing or not a string) stops the run with its file and
line number, unless --skip-bad-lines counts and skips it. On any error nothing appears under the
output names (the builders write to temporary files and rename them only at the end).

Progress goes to stderr: a bar on a terminal, else a line every 10 s (and every --log-interval
documents when given), with the input read so far, the rate and the time left.

--workers N runs N encoder processes of one thread each, fed batches of lines in order. With
--workers 1 the batches are encoded in this process, where the Rust tokenizers library may use
every core for a batch (TOKENIZERS_PARALLELISM=false keeps it to one).
"""
from __future__ import annotations

import argparse
import gzip
import io
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from contextlib import closing, contextmanager
from dataclasses import dataclass, field

import numpy as np
import zstandard

if __package__ in (None, ""):  # run as `python tools/preprocess_data.py`: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ascendspeed.arguments import TokenizerConfig, add_tokenizer_args  # noqa: E402
from ascendspeed.data.tokenizer import build_tokenizer  # noqa: E402
from ascendspeed.errors import AscendSpeedError, ConfigError, PreprocessError, error_line  # noqa: E402
from ascendspeed.progress import Progress  # noqa: E402
from megatron_ext.indexed_dataset import (IndexedDatasetError, MMapIndexedDatasetBuilder,  # noqa: E402
                                          best_fitting_dtype, data_file_path, index_file_path)

# A batch is what one worker tokenizes at a time: big enough that the batched Rust encode and the
# inter-process transfer pay off, small enough to keep every worker busy to the end and memory flat.
# In-process (--workers 1) the Rust encoder spreads each batch over its own threads, which balance
# better over more documents, hence the larger batches there.
BATCH_LINES = 1024
BATCH_BYTES = 256 << 10
INPROCESS_BATCH_BYTES = 1 << 20
MAX_REPORTED_BAD_LINES = 20


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True,
                       help="JSON-lines file(s): .jsonl, .json, .jsonl.gz or .jsonl.zst")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys to extract; each gets its own output dataset")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="skip (and count) malformed lines and lines missing a key instead of failing")
    add_tokenizer_args(parser)
    group.add_argument("--append-eod", action="store_true",
                       help="append the tokenizer's end-of-document id to every document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="writes {prefix}_{key}_document.bin/.idx")
    group.add_argument("--dataset-impl", default="mmap", choices=["mmap"])
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1,
                       help="encoder processes (1: encode in this process, with the tokenizer's threads)")
    group.add_argument("--log-interval", type=int, default=None,
                       help="also a progress line every N documents when stderr is not a terminal "
                            "(default: a line every 10 s)")
    args = parser.parse_args(argv)
    if args.tokenizer_type is None:
        parser.error("--tokenizer-type is required")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.log_interval is not None and args.log_interval < 1:
        parser.error(f"--log-interval must be >= 1, got {args.log_interval}")
    if len(set(args.json_keys)) != len(args.json_keys):
        parser.error(f"--json-keys lists a key twice: {args.json_keys}")
    return args


# ------------------------------------------------------------------------------------ reading
def open_input(path: str):
    """(a binary line iterator over a plain, gzip or zstandard JSON-lines file, the file on disk
    beneath it: its tell() is how far into the file, compressed or not, reading has got)."""
    disk = open(path, "rb")
    try:
        if path.endswith(".gz"):
            return gzip.GzipFile(fileobj=disk, mode="rb"), disk
        if path.endswith(".zst"):
            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(
                disk, read_across_frames=True, closefd=False)), disk
    except BaseException:
        disk.close()
        raise
    return disk, disk


def read_batches(paths, batch_bytes: int = BATCH_BYTES, positions: deque | None = None):
    """Yield (path, first line number, [raw lines]) in input order. With `positions`, append for
    each batch the bytes of the input files on disk read up to its end (for progress)."""
    before = 0  # bytes of the files already read
    for path in paths:
        try:
            stream, disk = open_input(path)
            with disk, stream:
                lines, size, first = [], 0, 1
                for lineno, line in enumerate(stream, start=1):
                    lines.append(line)
                    size += len(line)
                    if len(lines) >= BATCH_LINES or size >= batch_bytes:
                        if positions is not None:
                            positions.append(before + disk.tell())
                        yield path, first, lines
                        lines, size, first = [], 0, lineno + 1
                if lines:
                    if positions is not None:
                        positions.append(before + disk.tell())
                    yield path, first, lines
                before += os.fstat(disk.fileno()).st_size
        except (OSError, EOFError, zstandard.ZstdError) as error:  # I/O error, corrupt or cut archive
            raise PreprocessError(f"{path}: cannot read ({error})") from error


# ------------------------------------------------------------------------------------ encoding
@dataclass
class EncodedBatch:
    path: str
    nbytes: int
    records: int = 0  # non-blank lines
    blank: int = 0
    bad: list = field(default_factory=list)  # [(line number, reason)]
    linenos: list = field(default_factory=list)  # line of each good document
    tokens: dict = field(default_factory=dict)  # key -> (flat int64 ids, int64 lengths)


class Encoder:
    """Parses and tokenizes one batch of lines. Runs in the worker processes (or inline)."""

    def __init__(self, tokenizer, json_keys, append_eod: bool):
        self.tokenizer = tokenizer
        self.json_keys = list(json_keys)
        self.eod = [tokenizer.eod] if append_eod else []

    def __call__(self, batch) -> EncodedBatch:
        path, first, lines = batch
        out = EncodedBatch(path, nbytes=sum(map(len, lines)))
        texts = {key: [] for key in self.json_keys}
        for lineno, line in enumerate(lines, start=first):
            if not line.strip():
                out.blank += 1
                continue
            out.records += 1
            record, reason = self._parse(line)
            if reason:
                out.bad.append((lineno, reason))
                continue
            out.linenos.append(lineno)
            for key in self.json_keys:
                texts[key].append(record[key])
        for key in self.json_keys:
            docs = self.tokenizer.encode_batch(texts[key]) if texts[key] else []
            docs = [ids + self.eod if len(ids) else [] for ids in docs]
            lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
            flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64,
                               count=int(lengths.sum()))
            out.tokens[key] = (flat, lengths)
        return out

    def _parse(self, line: bytes):
        """(record, None) for a usable line, else (None, why not)."""
        try:
            record = json.loads(line)
        except UnicodeDecodeError as error:
            return None, f"not valid UTF-8 ({error})"
        except ValueError as error:
            return None, f"not valid JSON ({error}); expected one JSON object per line"
        if not isinstance(record, dict):
            return None, f"expected a JSON object, got {_json_type(record)}"
        for key in self.json_keys:
            if key not in record:
                return None, f"missing key {key!r} (keys present: {sorted(record)[:10]})"
            value = record[key]
            if not isinstance(value, str):
                return None, f"key {key!r} holds {_json_type(value)}, expected a string"
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as error:  # a lone surrogate such as "\ud800"
                    return None, f"key {key!r} is not valid Unicode ({error})"
        return record, None


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


_WORKER_ENCODER: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def _encode_in_worker(batch) -> EncodedBatch:
    return _WORKER_ENCODER(batch)


@contextmanager
def _one_thread_per_worker():
    """Rust tokenizers must not use their thread pool in forked children (they deadlock or warn);
    with one process per core, one thread each is also the fastest."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def encode_all(batches, encoder: Encoder, workers: int):
    """Encoded batches in input order. With several workers, a bounded window of batches is in
    flight (Pool.imap would read the whole input ahead into memory when the workers lag)."""
    if workers == 1:
        for batch in batches:
            yield encoder(batch)
        return
    with _one_thread_per_worker(), \
            multiprocessing.Pool(workers, initializer=_init_worker, initargs=(encoder,)) as pool:
        pending = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= 2 * workers + 2:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ------------------------------------------------------------------------------------ writing
def output_prefix(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


def _check_inputs(paths) -> None:
    for path in paths:
        if os.path.isdir(path):
            raise PreprocessError(f"--input {path}: is a directory; give the JSON-lines files in it")
        if not os.path.isfile(path):
            raise PreprocessError(f"--input {path}: file not found")


def preprocess(args: argparse.Namespace) -> dict:
    """Run the whole conversion; returns the summary counts. Raises PreprocessError (bad input),
    ConfigError (bad flags) or IndexedDatasetError; on any error no output is left behind."""
    _check_inputs(args.input)
    tokenizer = build_tokenizer(TokenizerConfig.from_args(args))
    if args.append_eod and tokenizer.eod is None:
        raise ConfigError(f"--append-eod: {tokenizer.name} has no end-of-document (eos) token")
    vocab_size = tokenizer.vocab_size
    dtype = best_fitting_dtype(vocab_size)
    prefixes = {key: output_prefix(args.output_prefix, key) for key in args.json_keys}
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)

    summary = {"documents": 0, "blank_lines": 0, "bad_lines_skipped": 0, "bytes": 0,
               "written": dict.fromkeys(args.json_keys, 0), "empty": dict.fromkeys(args.json_keys, 0),
               "tokens": dict.fromkeys(args.json_keys, 0), "dtype": np.dtype(dtype).name,
               "outputs": list(prefixes.values())}
    builders = {}
    start = time.time()
    next_log = args.log_interval
    positions = deque()  # on-disk input bytes read up to the end of each batch in flight
    progress = Progress(sum(os.path.getsize(path) for path in args.input), "preprocess", "B")
    reached = 0
    try:
        for key, prefix in prefixes.items():
            builders[key] = MMapIndexedDatasetBuilder(data_file_path(prefix), dtype=dtype)
        encoder = Encoder(tokenizer, args.json_keys, args.append_eod)
        batch_bytes = BATCH_BYTES if args.workers > 1 else INPROCESS_BATCH_BYTES
        # closing(): an error here stops the worker pool at once, not whenever the generator is freed
        batches = encode_all(read_batches(args.input, batch_bytes, positions), encoder, args.workers)
        with closing(batches):
            for batch in batches:
                if batch.bad:
                    progress.clear()  # the messages below start at the beginning of the line
                _report_bad_lines(batch, args.skip_bad_lines, summary)
                for key, (flat, lengths) in batch.tokens.items():
                    _check_ids(flat, lengths, batch, key, vocab_size, tokenizer.name)
                    _write(builders[key], flat.astype(dtype), lengths, summary, key)
                summary["documents"] += batch.records
                summary["blank_lines"] += batch.blank
                summary["bytes"] += batch.nbytes
                position = positions.popleft()
                due = next_log is not None and summary["documents"] >= next_log
                if due:
                    next_log = (summary["documents"] // args.log_interval + 1) * args.log_interval
                progress.update(position - reached, detail=_documents_read(summary, start),
                                force=due)
                reached = position
        for key, prefix in prefixes.items():
            builders[key].finalize(index_file_path(prefix))
    except BaseException:
        progress.close(success=False)
        for builder in builders.values():
            builder.abort()
        raise
    progress.close()
    summary["seconds"] = time.time() - start
    return summary


def _report_bad_lines(batch: EncodedBatch, skip: bool, summary: dict) -> None:
    if not batch.bad:
        return
    if not skip:
        lineno, reason = batch.bad[0]
        raise PreprocessError(f"{batch.path}:{lineno}: {reason} (use --skip-bad-lines to skip such lines)")
    for lineno, reason in batch.bad:
        summary["bad_lines_skipped"] += 1
        if summary["bad_lines_skipped"] <= MAX_REPORTED_BAD_LINES:
            print(f"skipping {batch.path}:{lineno}: {reason}", file=sys.stderr)
        elif summary["bad_lines_skipped"] == MAX_REPORTED_BAD_LINES + 1:
            print("skipping more bad lines (not listed)", file=sys.stderr)


def _check_ids(flat, lengths, batch: EncodedBatch, key: str, vocab_size: int, name: str) -> None:
    """Every id must index the (unpadded) vocabulary, or training would read garbage embeddings."""
    if not flat.size or (flat.min() >= 0 and flat.max() < vocab_size):
        return
    first = int(np.flatnonzero((flat < 0) | (flat >= vocab_size))[0])
    doc = int(np.searchsorted(np.cumsum(lengths), first, side="right"))
    raise PreprocessError(f"{batch.path}:{batch.linenos[doc]}: key {key!r}: token id {int(flat[first])} "
                          f"is outside the vocabulary [0, {vocab_size}) of {name}")


def _write(builder, flat, lengths, summary: dict, key: str) -> None:
    end = 0
    for length in lengths.tolist():
        if length == 0:  # nothing to train on: no sequence and no doc_idx entry (as Megatron)
            summary["empty"][key] += 1
            continue
        builder.add_item(flat[end:end + length])
        builder.end_document()
        end += length
    summary["written"][key] += len(lengths) - int(np.count_nonzero(lengths == 0))
    summary["tokens"][key] += end


def _documents_read(summary: dict, start: float) -> str:
    elapsed = max(time.time() - start, 1e-9)
    return f"processed {summary['documents']} documents ({summary['documents'] / elapsed:.1f} docs/s)"


def format_summary(summary: dict) -> str:
    seconds = max(summary["seconds"], 1e-9)
    lines = [f"{summary['documents']} documents, {summary['bytes'] / 1e6:.2f} MB in {seconds:.2f} s "
             f"({summary['documents'] / seconds:.1f} docs/s, {summary['bytes'] / seconds / 1e6:.2f} MB/s); "
             f"bad lines skipped: {summary['bad_lines_skipped']}, blank lines: {summary['blank_lines']}"]
    for key, prefix in zip(summary["written"], summary["outputs"]):
        lines.append(f"{prefix}.{{bin,idx}}: {summary['written'][key]} documents written, "
                     f"{summary['empty'][key]} empty dropped, {summary['tokens'][key]} tokens "
                     f"({summary['dtype']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        summary = preprocess(args)
    except (AscendSpeedError, IndexedDatasetError, OSError) as error:  # megatron_ext's own errors
        print(error_line(error), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
