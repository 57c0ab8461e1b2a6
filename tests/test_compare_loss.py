"""tools/compare_loss.py: Megatron log lines and TensorBoard event files read back, the
statistics on known numbers, iterations of one run only reported, PNGs that decode, and a
one-line error for a run that cannot be read."""
import math
import os
import struct
import zlib

import numpy as np
import pytest

from ascendspeed.plotting import BLUE, ORANGE, RED
from ascendspeed.training_log import (Throughput, format_iteration_line, parse_iteration_line,
                                      validation_log_lines)
from test_pretrain import corpus, launch, losses, model_args  # noqa: F401 (corpus is a fixture)
from tools import compare_loss
from tools.compare_loss import Run, compare, format_iterations, masked_crc32c


def log_line(iteration, losses, train_iters=100, **extra):
    return format_iteration_line(iteration=iteration, train_iters=train_iters,
                                 consumed_samples=8 * iteration, seconds_per_iteration=0.25,
                                 learning_rate=1e-4, global_batch_size=8, losses=losses, **extra)


def write_log(path, losses: dict, prefix=""):
    """A log of pretrain_bloom.py's lines: {iteration: loss, or None for an interval whose
    every step was skipped}, with a validation block and other lines in between."""
    lines = ["using world size: 1, data-parallel size: 1", "> building train dataset ..."]
    for iteration, loss in losses.items():
        if loss is None:
            lines.append(log_line(iteration, {}, skipped_iterations=1))
        else:
            lines.append(log_line(iteration, {"lm loss": loss}, grad_norm=1.25,
                                  throughput=Throughput(1000.0, 1.5, 0.25)))
        if iteration % 5 == 0:
            lines += validation_log_lines(iteration, {"lm loss": 7.0})
    path.write_text("".join(prefix + line + "\n" for line in lines))
    return str(path)


def run_of(losses, path="run"):
    return Run(path, dict(losses))


# ------------------------------------------------------------------------------ reading
def test_parse_iteration_line_reads_back_format_iteration_line():
    line = log_line(4, {"lm loss": 9.994644}, grad_norm=2.5, throughput=Throughput(10.0, 1.0, 0.5))
    assert line.startswith(" iteration        4/     100 | consumed samples:")
    iteration, fields = parse_iteration_line("[default0]:" + line)
    assert iteration == 4 and fields["lm loss"] == "9.994644E+00"
    assert fields["grad norm"] == "2.500" and fields["MFU"] == "50.00%"
    assert "lm loss" not in parse_iteration_line(log_line(5, {}, skipped_iterations=1))[1]
    assert parse_iteration_line(validation_log_lines(10, {"lm loss": 3.0})[1]) is None
    assert parse_iteration_line(" exiting at iteration 7 (--exit-interval 7)") is None


def test_read_log_keeps_every_iteration_it_logs(tmp_path):
    values = {1: 10.123456789, 2: 9.5, 3: None, 4: float("nan"), 5: 8.25, 6: 8.0}
    path = write_log(tmp_path / "train.log", values, prefix="[default0]:")
    run = compare_loss.read_run(path)
    assert run.losses.keys() == values.keys() and run.losses[3] is None
    assert math.isnan(run.losses[4])
    assert run.losses[1] == float(f"{values[1]:.6E}") == 10.12346  # the printed digits
    assert run.losses[5] == 8.25 and run.notes == []


def test_a_resumed_run_keeps_the_last_line_of_an_iteration(tmp_path):
    path = tmp_path / "resumed.log"
    path.write_text("\n".join([log_line(1, {"lm loss": 5.0}), log_line(2, {"lm loss": 4.0}),
                               log_line(2, {"lm loss": 4.5}), log_line(3, {"lm loss": 4.25})]))
    run = compare_loss.read_run(str(path))
    assert run.losses == {1: 5.0, 2: 4.5, 3: 4.25}
    assert run.notes == ["1 iteration(s) logged again (a resumed run); the last kept"]


# ------------------------------------------------------------------------------ statistics
def test_statistics_on_known_numbers():
    a = run_of({1: 1.0, 2: 3.0, 3: 2.0, 4: 1.5})
    b = run_of({1: 1.0, 2: 2.0, 3: 4.0, 4: 2.0})
    c = compare(a, b, threshold=0.25)
    assert c.iterations.tolist() == [1, 2, 3, 4]
    assert c.relative.tolist() == [0.0, 0.5, 0.5, 0.25]  # |a - b| / |b|, b the reference
    assert c.mean_relative == 0.3125 and c.max_relative == (0.5, 2)
    assert c.mean_absolute == 0.875  # (0 + 1 + 2 + 0.5) / 4
    assert c.within == 2              # 0 and 0.25 are at most 0.25
    assert compare(b, a, threshold=0.25).relative.tolist() == [0.0, 1 / 3, 1.0, 1 / 3]
    zero = compare(run_of({1: 0.0, 2: 1.0}), run_of({1: 0.0, 2: 0.0}))
    assert zero.relative.tolist() == [0.0, math.inf] and zero.within == 1


def test_iterations_of_one_run_only_are_reported(tmp_path):
    a = run_of({**{i: 2.0 for i in range(1, 11)}, 3: None}, "a.log")  # 1-10, 3 skipped
    b = run_of({**{i: 2.0 for i in range(1, 6)}, **{i: 2.0 for i in range(8, 13)},
                4: float("nan")}, "b.log")                             # 1-5, 8-12
    c = compare(a, b)
    assert c.iterations.tolist() == [1, 2, 5, 8, 9, 10]
    assert (c.only_a, c.only_b) == ([6, 7], [11, 12])
    assert (c.no_loss_a, c.no_loss_b) == ([3], [4])
    text = compare_loss.report(c, a, b, ("A", "B"))
    assert "compared: 6 iterations: 1-2, 5, 8-10" in text
    assert "only in A (A): 2 iterations: 6-7" in text and "only in B (B): 2 iterations: 11-12" in text
    assert "no finite loss in A (skipped interval or NaN): 1 iteration: 3" in text
    assert "no finite loss in B (skipped interval or NaN): 1 iteration: 4" in text
    assert "iterations with relative error <= 2%: 100.00% (6/6)" in text
    assert format_iterations([]) == "none"
    assert format_iterations(list(range(1, 40, 2)), limit=3) == \
        "20 iterations: 1, 3, 5, ... (20 ranges)"


def test_no_common_iteration_is_an_error():
    with pytest.raises(compare_loss.RunLogError, match="no iteration has a finite loss in both"):
        compare(run_of({1: 1.0, 2: None}, "a.log"), run_of({2: 1.0, 3: 1.0}, "b.log"))


# ------------------------------------------------------------------------------ pictures
def decode_png(path):
    """(width, height, pixels[h, w, 3]) of an 8-bit RGB PNG with unfiltered scanlines, every
    chunk's CRC checked."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color, interlace) == (8, 2, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all()  # filter type 0 on every scanline
    return width, height, rows[:, 1:].reshape(height, width, 3)


def has_color(pixels, color):
    return int(np.all(pixels == np.array(color, dtype=np.uint8), axis=-1).sum())


def test_writes_both_pictures_and_prints_the_statistics(tmp_path, capsys):
    a = write_log(tmp_path / "a.log", {i: 10.0 - 0.25 * i for i in range(1, 21)})
    b = write_log(tmp_path / "b.log", {i: 10.0 - 0.25 * i + (0.5 if i % 4 == 0 else 0.0)
                                       for i in range(1, 25)})
    out = tmp_path / "pictures"
    assert compare_loss.main([a, b, "--labels", "TP=1", "TP=2 PP=2", "--output", str(out),
                              "--threshold", "0.02"]) == 0
    printed = capsys.readouterr().out
    assert "A = TP=1: " in printed and "only in B (TP=2 PP=2): 4 iterations: 21-24" in printed
    assert "iterations with relative error <= 2%: 75.00% (15/20)" in printed
    width, height, loss = decode_png(out / "loss.png")
    assert (width, height) == (960, 540)
    assert has_color(loss, BLUE) > 500 and has_color(loss, ORANGE) > 500
    _, _, errors = decode_png(out / "relative_error.png")
    assert has_color(errors, BLUE) > 500 and has_color(errors, RED) > 100  # the threshold line
    assert sorted(os.listdir(out)) == ["loss.png", "relative_error.png"]  # no temporary left


# ------------------------------------------------------------------------------ TensorBoard
def varint(n):
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def pb(number, wire, payload: bytes):
    key = varint(number << 3 | wire)
    return key + (varint(len(payload)) + payload if wire == 2 else payload)


def scalar_event(step, tag, value, tensor=False):
    """An Event as torch's SummaryWriter.add_scalar writes it (simple_value), or TF2-style
    (a float TensorProto)."""
    if tensor:
        content = pb(1, 0, varint(1)) + pb(5, 2, struct.pack("<f", value))  # DT_FLOAT, float_val
        summary_value = pb(1, 2, tag.encode()) + pb(8, 2, content)
    else:
        summary_value = pb(1, 2, tag.encode()) + pb(2, 5, struct.pack("<f", value))
    return (pb(1, 1, struct.pack("<d", 1.7e9 + step)) + pb(2, 0, varint(step))
            + pb(5, 2, pb(1, 2, summary_value)))


def record(payload):
    header = struct.pack("<Q", len(payload))
    return (header + struct.pack("<I", masked_crc32c(header)) + payload
            + struct.pack("<I", masked_crc32c(payload)))


def test_crc32c_is_castagnoli():
    assert compare_loss.crc32c(b"123456789") == 0xE3069283  # the standard check value


def test_reads_tensorboard_scalars(tmp_path):
    tb = tmp_path / "tb"
    tb.mkdir()
    first = record(pb(1, 1, struct.pack("<d", 1.7e9)) + pb(3, 2, b"brain.Event:2"))
    first += b"".join(record(scalar_event(i, "lm loss", 10.0 / i)) for i in range(1, 6))
    first += record(scalar_event(3, "lm loss vs samples", 1.0))
    (tb / "events.out.tfevents.1700000000.host.1.0").write_bytes(first)
    later = b"".join(record(scalar_event(i, "lm loss", 1.5 * i, tensor=True)) for i in (5, 6))
    (tb / "events.out.tfevents.1700000900.host.2.0").write_bytes(later + b"\x10\x00\x00")
    run = compare_loss.read_run(str(tb))
    assert run.losses == {**{i: float(np.float32(10.0 / i)) for i in range(1, 5)}, 5: 7.5, 6: 9.0}
    assert run.notes == [f"{tb / 'events.out.tfevents.1700000900.host.2.0'} ends in a partial "
                         f"record (still being written?)",
                         "1 step(s) written again (a resumed run); the last kept"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "events.out.tfevents.1.host").write_bytes(b"\x05" + first[1:])
    with pytest.raises(compare_loss.RunLogError, match=r"events.out.tfevents.1.host: record 0 at "
                                                       r"byte 0: bad length checksum"):
        compare_loss.read_run(str(bad))
    with pytest.raises(compare_loss.RunLogError, match=r"no 'lm loss' scalars .*tags: lm loss vs"):
        only_other = tmp_path / "other"
        only_other.mkdir()
        (only_other / "events.out.tfevents.2.host").write_bytes(
            record(scalar_event(1, "lm loss vs samples", 1.0)))
        compare_loss.read_run(str(only_other))


# ------------------------------------------------------------------------------ errors
def error_of(capsys, *argv):
    assert compare_loss.main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    line = captured.err.strip()
    assert line.startswith("error: ") and "\n" not in line, captured.err
    return line


def test_a_run_that_cannot_be_read_is_one_error_line(tmp_path, capsys):
    good = write_log(tmp_path / "good.log", {1: 3.0, 2: 2.5})
    assert "missing.log: no such file or directory" in error_of(capsys, tmp_path / "missing.log", good)
    broken = tmp_path / "broken.log"
    broken.write_text("hello\n" + log_line(1, {"lm loss": 3.0}) + "\n"
                      + log_line(2, {"lm loss": 3.0}).replace("3.000000E+00", "3.0x") + "\n")
    assert f"{broken}:3: lm loss '3.0x' is not a number" in error_of(capsys, good, broken)
    empty = tmp_path / "empty.log"
    empty.write_text("nothing to see\n")
    assert f"{empty}: no training iteration lines" in error_of(capsys, empty, good)
    assert "no iteration line has a 'val loss' field" in error_of(capsys, good, good, "--key", "val loss")
    (tmp_path / "tb").mkdir()
    assert "no TensorBoard event files" in error_of(capsys, good, tmp_path / "tb")


@pytest.mark.multiprocess
def test_compares_a_real_run_as_a_script(corpus, tmp_path):
    """pretrain_bloom.py's own stdout (10 iterations, validation lines between them) against
    itself, through `python tools/compare_loss.py`."""
    from launch import run_python

    result = launch(1, model_args(corpus))
    printed = losses(result)
    log = tmp_path / "run.log"
    log.write_text(result.stdout)
    parsed = compare_loss.read_run(str(log))
    assert [parsed.losses[i] for i in sorted(parsed.losses)] == printed and len(printed) == 10
    tool = run_python("tools/compare_loss.py", [log, log, "--output", tmp_path / "out"], timeout=120)
    assert tool.returncode == 0, tool.stderr
    assert "mean relative error |a - b| / |b|: 0%" in tool.stdout
    assert "iterations with relative error <= 2%: 100.00% (10/10)" in tool.stdout
    assert decode_png(tmp_path / "out" / "loss.png")[:2] == (960, 540)

