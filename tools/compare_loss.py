"""Compare the loss curves of two training runs, iteration by iteration.

    python tools/compare_loss.py RUN_A RUN_B [--labels A B] [--output DIR] [--threshold 0.02] \
        [--key "lm loss"]

A run is a training log (what pretrain_bloom.py prints: ` iteration 4/ 10 | ... | lm loss:
9.994644E+00 | ...`, with or without a launcher's prefix on each line) or a TensorBoard directory
(`--tensorboard-dir`: its `events.out.tfevents.*` files, read here without the tensorboard
package). Iterations are matched by number; the relative error of an iteration is
|a - b| / |b|, B being the reference. Prints the mean and maximum relative error, the mean
absolute error and the share of iterations whose relative error is at most --threshold, and
writes DIR/loss.png (both curves) and DIR/relative_error.png.

Iterations that cannot be compared are listed, never dropped silently: those logged by one run
only (other log intervals, a shorter run), and those logged without a finite loss (Megatron
prints no loss for a log interval whose every step was skipped; a NaN loss). A log line of a
resumed run that repeats an iteration replaces the earlier one. Exit status 2 with a one-line
error naming the file (and line or record) when a run cannot be read, or when no iteration has a
loss in both runs.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import struct
import sys
from dataclasses import dataclass, field

import numpy as np

if __package__ in (None, ""):  # run as `python tools/compare_loss.py`: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ascendspeed.errors import AscendSpeedError, RunLogError, error_line  # noqa: E402
from ascendspeed.plotting import BLUE, ORANGE, RED, Series, line_chart, write_png  # noqa: E402
from ascendspeed.training_log import parse_iteration_line  # noqa: E402

DEFAULT_KEY = "lm loss"  # the log field and the TensorBoard tag pretrain_bloom.py writes
LISTED_RANGES = 8        # iteration ranges listed in full before "... (N ranges)"


@dataclass
class Run:
    """One run's loss per iteration: a float (possibly NaN), or None where the line has no
    loss. `notes`: what was noticed while reading (repeated iterations, a partial record)."""
    path: str
    losses: dict[int, float | None]
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ training logs
def read_log(path: str, key: str = DEFAULT_KEY) -> Run:
    losses: dict[int, float | None] = {}
    repeated, fields_seen = 0, None
    try:
        with open(path, "rb") as stream:
            for lineno, raw in enumerate(stream, start=1):
                if b"iteration" not in raw:
                    continue
                parsed = parse_iteration_line(raw.decode("utf-8", errors="replace"))
                if parsed is None:
                    continue
                iteration, fields = parsed
                fields_seen = fields_seen or fields
                text = fields.get(key)
                value = None
                if text is not None:
                    try:
                        value = float(text)
                    except ValueError:
                        raise RunLogError(f"{path}:{lineno}: {key} {text!r} is not a number") from None
                repeated += iteration in losses
                losses[iteration] = value
    except OSError as error:
        raise RunLogError(f"{path}: cannot read ({error.strerror or error})") from None
    if not losses:
        raise RunLogError(f"{path}: no training iteration lines (' iteration N/ M | ... | {key}: "
                          f"X |'): not a pretrain_bloom.py log?")
    if all(value is None for value in losses.values()):
        raise RunLogError(f"{path}: no iteration line has a {key!r} field (fields: "
                          f"{', '.join(sorted(fields_seen))}); give --key")
    run = Run(path, losses)
    if repeated:
        run.notes.append(f"{repeated} iteration(s) logged again (a resumed run); the last kept")
    return run


# ------------------------------------------------------------------------------ TensorBoard
def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1
        table.append(n)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecords(path: str, data: bytes) -> tuple[list[bytes], bool]:
    """(the payloads of a TFRecord file, whether it ends in a partial record, as a writer still
    running leaves). Each record: uint64 length, masked CRC-32C of the length, payload, masked
    CRC-32C of the payload; the length's checksum is verified, the payload's is not (parsing
    the protobuf catches a damaged payload)."""
    payloads, pos = [], 0
    while pos < len(data):
        if pos + 12 > len(data):
            return payloads, True
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        if masked_crc32c(header) != length_crc:
            raise RunLogError(f"{path}: record {len(payloads)} at byte {pos}: bad length "
                              f"checksum (not a TensorBoard event file?)")
        end = pos + 12 + length
        if end + 4 > len(data):
            return payloads, True
        payloads.append(data[pos + 12:end])
        pos = end + 4
    return payloads, False


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("bad varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def proto_fields(data: bytes):
    """(field number, wire type, value) of a protobuf message: an int for a varint, the raw
    bytes for the fixed-size and length-delimited types."""
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        else:
            raise ValueError(f"wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated field")
        yield number, wire, value


# TensorProto dtypes and their packed layouts (tensorflow/core/framework/types.proto)
_DT_FLOAT, _DT_DOUBLE = 1, 2


def _tensor_scalar(data: bytes) -> float | None:
    """The first value of a float or double TensorProto (TF2-style scalar summaries)."""
    dtype, content, floats, doubles = None, None, [], []
    for number, wire, value in proto_fields(data):
        if number == 1 and wire == 0:
            dtype = value
        elif number == 4 and wire == 2:
            content = value
        elif number == 5:  # float_val: packed (wire 2) or one by one (wire 5)
            floats += list(struct.unpack(f"<{len(value) // 4}f", value))
        elif number == 6:
            doubles += list(struct.unpack(f"<{len(value) // 8}d", value))
    if floats:
        return floats[0]
    if doubles:
        return doubles[0]
    if content and dtype in (_DT_FLOAT, _DT_DOUBLE):
        return struct.unpack_from("<f" if dtype == _DT_FLOAT else "<d", content)[0]
    return None


def event_scalars(payload: bytes):
    """(step, tag, value) of each scalar in one Event message: Event.step (2), Event.summary
    (5) -> Summary.value (1) -> Value.tag (1) with simple_value (2, float) or tensor (8)."""
    step, summaries = 0, []
    for number, wire, value in proto_fields(payload):
        if number == 2 and wire == 0:
            step = value
        elif number == 5 and wire == 2:
            summaries.append(value)
    for summary in summaries:
        for number, wire, value in proto_fields(summary):
            if number != 1 or wire != 2:
                continue
            tag, scalar = None, None
            for n, w, v in proto_fields(value):
                if n == 1 and w == 2:
                    tag = v.decode("utf-8", errors="replace")
                elif n == 2 and w == 5:
                    (scalar,) = struct.unpack("<f", v)
                elif n == 8 and w == 2:
                    scalar = _tensor_scalar(v)
            if tag is not None and scalar is not None:
                yield step, tag, scalar


def read_tensorboard(directory: str, tag: str = DEFAULT_KEY) -> Run:
    """The `tag` scalars of the event files in `directory`, in file name order (the names begin
    with the creation time), so a resumed run's later file replaces repeated steps."""
    files = sorted(glob.glob(os.path.join(glob.escape(directory), "events.out.tfevents.*")))
    if not files:
        nested = glob.glob(os.path.join(glob.escape(directory), "**", "events.out.tfevents.*"),
                           recursive=True)
        hint = (f"; they are in subdirectories such as {os.path.dirname(nested[0])}: give that"
                if nested else "")
        raise RunLogError(f"{directory}: no TensorBoard event files (events.out.tfevents.*) in "
                          f"this directory{hint}")
    run, tags = Run(directory, {}), set()
    repeated = 0
    for path in files:
        try:
            with open(path, "rb") as stream:
                data = stream.read()
        except OSError as error:
            raise RunLogError(f"{path}: cannot read ({error.strerror or error})") from None
        payloads, partial = tfrecords(path, data)
        if partial:
            run.notes.append(f"{path} ends in a partial record (still being written?)")
        for number, payload in enumerate(payloads):
            try:
                scalars = list(event_scalars(payload))
            except ValueError as error:
                raise RunLogError(f"{path}: record {number}: not an Event message ({error})") from None
            for step, name, value in scalars:
                tags.add(name)
                if name == tag:
                    repeated += step in run.losses
                    run.losses[step] = float(value)
    if not run.losses:
        raise RunLogError(f"{directory}: no {tag!r} scalars in its event files (tags: "
                          f"{', '.join(sorted(tags)) or 'none'}); give --key")
    if repeated:
        run.notes.append(f"{repeated} step(s) written again (a resumed run); the last kept")
    return run


def read_run(path: str, key: str = DEFAULT_KEY) -> Run:
    if os.path.isdir(path):
        return read_tensorboard(path, key)
    if not os.path.exists(path):
        raise RunLogError(f"{path}: no such file or directory")
    return read_log(path, key)


# ------------------------------------------------------------------------------ comparison
@dataclass
class Comparison:
    iterations: np.ndarray  # compared: a finite loss in both runs, ascending
    a: np.ndarray
    b: np.ndarray
    only_a: list[int]       # logged by A only
    only_b: list[int]
    no_loss_a: list[int]    # logged by both, without a finite loss in A
    no_loss_b: list[int]
    threshold: float

    @property
    def relative(self) -> np.ndarray:
        """|a - b| / |b|; 0 where both are 0, inf where only b is."""
        diff = np.abs(self.a - self.b)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = diff / np.abs(self.b)
        return np.where(diff == 0, 0.0, rel)

    @property
    def mean_relative(self) -> float:
        return float(np.mean(self.relative))

    @property
    def max_relative(self) -> tuple[float, int]:
        """(the largest relative error, its first iteration)."""
        k = int(np.argmax(self.relative))
        return float(self.relative[k]), int(self.iterations[k])

    @property
    def mean_absolute(self) -> float:
        return float(np.mean(np.abs(self.a - self.b)))

    @property
    def within(self) -> int:
        """Iterations whose relative error is at most the threshold."""
        return int(np.count_nonzero(self.relative <= self.threshold))


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def compare(a: Run, b: Run, threshold: float = 0.02) -> Comparison:
    both = sorted(set(a.losses) & set(b.losses))
    usable = [i for i in both if _finite(a.losses[i]) and _finite(b.losses[i])]
    if not usable:
        raise RunLogError(f"{a.path} and {b.path}: no iteration has a finite loss in both runs "
                          f"(A logs {_span(sorted(a.losses))}, B logs {_span(sorted(b.losses))})")
    return Comparison(
        iterations=np.array(usable, dtype=np.int64),
        a=np.array([a.losses[i] for i in usable], dtype=np.float64),
        b=np.array([b.losses[i] for i in usable], dtype=np.float64),
        only_a=sorted(set(a.losses) - set(b.losses)),
        only_b=sorted(set(b.losses) - set(a.losses)),
        no_loss_a=[i for i in both if not _finite(a.losses[i])],
        no_loss_b=[i for i in both if not _finite(b.losses[i])],
        threshold=threshold)


def ranges(iterations: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive numbers: [1, 2, 3, 7, 9, 10] -> [(1, 3), (7, 7), (9, 10)]."""
    out = []
    for i in iterations:
        if out and i == out[-1][1] + 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def format_iterations(iterations: list[int], limit: int = LISTED_RANGES) -> str:
    """'3 iterations: 11-13', '1 iteration: 5', 'none'; long lists end in '... (N ranges)'."""
    if not iterations:
        return "none"
    spans = ranges(iterations)
    text = ", ".join(f"{lo}-{hi}" if hi > lo else f"{lo}" for lo, hi in spans[:limit])
    if len(spans) > limit:
        text += f", ... ({len(spans)} ranges)"
    count = len(iterations)
    return f"{count} iteration{'s' if count != 1 else ''}: {text}"


def _span(iterations: list[int]) -> str:
    return f"{iterations[0]}-{iterations[-1]}" if iterations else "nothing"


def _percent(fraction: float) -> str:
    return "inf" if math.isinf(fraction) else f"{100 * fraction:.4g}%"


def report(comparison: Comparison, a: Run, b: Run, labels: tuple[str, str]) -> str:
    c = comparison
    n = len(c.iterations)
    max_rel, at = c.max_relative
    lines = [f"A = {labels[0]}: {a.path} ({len(a.losses)} iterations logged)",
             f"B = {labels[1]}: {b.path} ({len(b.losses)} iterations logged; the reference)"]
    lines += [f"note: {labels[0]}: {note}" for note in a.notes]
    lines += [f"note: {labels[1]}: {note}" for note in b.notes]
    lines += [f"compared: {format_iterations(c.iterations.tolist())}",
              f"mean relative error |a - b| / |b|: {_percent(c.mean_relative)}",
              f"max relative error: {_percent(max_rel)} at iteration {at}",
              f"mean absolute error: {c.mean_absolute:.6e}",
              f"iterations with relative error <= {_percent(c.threshold)}: "
              f"{100 * c.within / n:.2f}% ({c.within}/{n})",
              f"only in A ({labels[0]}): {format_iterations(c.only_a)}",
              f"only in B ({labels[1]}): {format_iterations(c.only_b)}"]
    for label, missing in ((labels[0], c.no_loss_a), (labels[1], c.no_loss_b)):
        if missing:
            lines.append(f"no finite loss in {label} (skipped interval or NaN): "
                         f"{format_iterations(missing)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ pictures
def _curve(run: Run) -> tuple[np.ndarray, np.ndarray]:
    points = sorted((i, v) for i, v in run.losses.items() if _finite(v))
    return (np.array([i for i, _ in points], dtype=np.float64),
            np.array([v for _, v in points], dtype=np.float64))


def plot(comparison: Comparison, a: Run, b: Run, labels: tuple[str, str], output: str,
         key: str = DEFAULT_KEY) -> list[str]:
    """Write OUTPUT/loss.png and OUTPUT/relative_error.png; returns their paths."""
    os.makedirs(output, exist_ok=True)
    c = comparison
    loss = line_chart([Series(labels[0], *_curve(a), BLUE, width=4),
                       Series(labels[1], *_curve(b), ORANGE)],
                      title=f"{key}: {labels[0]} vs {labels[1]}", x_label="iteration",
                      y_label=key)
    rel = c.relative
    finite = np.isfinite(rel)
    top = float(rel[finite].max()) if finite.any() else 0.0
    series = [Series(f"|{labels[0]} - {labels[1]}| / |{labels[1]}|", c.iterations, rel, BLUE)]
    if c.threshold <= 1.05 * top:  # the threshold line only where it does not flatten the curve
        series.append(Series(f"threshold {_percent(c.threshold)}", c.iterations[[0, -1]],
                             np.full(2, c.threshold), RED, dash=8))
    errors = line_chart(series, title=f"relative error: mean {_percent(c.mean_relative)}, "
                                      f"max {_percent(c.max_relative[0])}, "
                                      f"{100 * c.within / len(rel):.1f}% <= "
                                      f"{_percent(c.threshold)}",
                        x_label="iteration", y_label="relative error", y_floor=0.0,
                        y_percent=True)
    paths = [os.path.join(output, "loss.png"), os.path.join(output, "relative_error.png")]
    write_png(paths[0], loss)
    write_png(paths[1], errors)
    return paths


# ------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", metavar="RUN_A", help="training log or TensorBoard directory")
    parser.add_argument("run_b", metavar="RUN_B", help="the reference run (the denominator)")
    parser.add_argument("--labels", nargs=2, metavar=("A", "B"), default=None,
                        help="names in the report and the legends (default: the file names)")
    parser.add_argument("--output", default=".", help="directory for loss.png and "
                                                      "relative_error.png (default: here)")
    parser.add_argument("--threshold", type=float, default=0.02,
                        help="relative error counted as agreeing (default 0.02, i.e. 2%%)")
    parser.add_argument("--key", default=DEFAULT_KEY,
                        help=f"the loss field of the log lines / TensorBoard tag (default "
                             f"{DEFAULT_KEY!r})")
    args = parser.parse_args(argv)
    if not args.threshold >= 0:
        parser.error(f"--threshold must be >= 0, got {args.threshold}")
    if args.labels is None:
        names = [os.path.basename(os.path.normpath(p)) for p in (args.run_a, args.run_b)]
        args.labels = names if names[0] != names[1] else ["A", "B"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    labels = tuple(args.labels)
    try:
        a, b = read_run(args.run_a, args.key), read_run(args.run_b, args.key)
        comparison = compare(a, b, args.threshold)
        print(report(comparison, a, b, labels))
        for path in plot(comparison, a, b, labels, args.output, args.key):
            print(f"wrote {path}")
    except AscendSpeedError as error:
        print(error_line(error), file=sys.stderr)
        return 2
    except OSError as error:  # writing the pictures; the message names the file
        print(error_line(error), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
