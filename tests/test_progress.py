"""ascendspeed/progress.py: a redrawn bar on a terminal, throttled plain lines elsewhere, and the
rate / time-left arithmetic, with an injected clock."""
import io
import os

import pytest

from ascendspeed.progress import (NoProgress, Progress, format_amount, format_duration,
                                  format_rate)


class FakeStream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def progress(tty, total=100, unit="files", **kwargs):
    clock, stream = Clock(), FakeStream(tty)
    return Progress(total, "convert", unit, stream=stream, clock=clock, **kwargs), clock, stream


def test_rate_and_time_left():
    bar, clock, _ = progress(False, total=100)
    assert bar.rate() is None and bar.eta() is None  # no time has passed
    clock.now += 10
    bar.update(25)
    assert bar.rate() == 2.5 and bar.eta() == 30.0   # 75 left at 2.5/s
    clock.now += 10
    bar.update(75)
    assert bar.eta() == 0.0
    unknown, clock, _ = progress(False, total=None)
    clock.now += 4
    unknown.update(8)
    assert unknown.rate() == 2.0 and unknown.eta() is None


def test_plain_lines_are_throttled_and_end_with_a_final_line():
    bar, clock, stream = progress(False, total=100, interval=10.0)
    for _ in range(9):  # 9 s of updates: nothing yet
        clock.now += 1
        bar.update(1)
    assert stream.getvalue() == ""
    clock.now += 1
    bar.update(1, detail="stage 0")
    assert stream.getvalue() == "convert: 10/100 files (10%), 1.00 files/s, elapsed 10s, ETA 1m30s, stage 0\n"
    clock.now += 5
    bar.update(5)
    assert stream.getvalue().count("\n") == 1      # 5 s since the last line
    bar.update(0, force=True)                      # e.g. a --log-interval boundary
    assert stream.getvalue().count("\n") == 2
    clock.now += 1
    bar.update(85)
    bar.close()
    bar.close()  # once only
    last = stream.getvalue().splitlines()[-1]
    assert last == "convert: 100/100 files (100%), 6.25 files/s, done in 16s, stage 0"
    assert "\r" not in stream.getvalue()


def test_terminal_bar_is_redrawn_on_one_line():
    bar, clock, stream = progress(True, total=40, interval=0.2)
    bar.update(10)  # the first update draws at once
    first = stream.getvalue()
    assert first.startswith("\rconvert  25% [######..................] 10/40 files")
    assert first.endswith("ETA ?")  # no time has passed: no rate yet
    bar.update(1)  # within the interval: not redrawn
    assert stream.getvalue() == first
    clock.now += 1
    bar.update(9)
    assert stream.getvalue() == first + ("\rconvert  50% [############............] 20/40 files, "
                                         "20.0 files/s, ETA 1s")
    bar.clear()
    assert stream.getvalue().endswith("\r" + " " * len("convert  50% [############............] "
                                                       "20/40 files, 20.0 files/s, ETA 1s") + "\r")
    clock.now += 1
    bar.update(20)
    bar.close()
    out = stream.getvalue()
    assert out.endswith("\rconvert 100% [########################] 40/40 files, 20.0 files/s, "
                        "done in 2s\n")
    assert out.count("\n") == 1


def test_a_shorter_redraw_blanks_the_rest_of_the_longer_line():
    bar, clock, stream = progress(True, total=10)
    bar.update(1, detail="d" * 25)
    clock.now += 1
    bar.update(1, detail="x")
    drawn = stream.getvalue().split("\r")
    assert len(drawn[2]) == len(drawn[1])  # padded with spaces over the old text
    assert drawn[2].rstrip().endswith(", ETA 4s, x")


def test_a_narrow_terminal_cuts_the_line_short_of_its_last_column(monkeypatch):
    import ascendspeed.progress as progress_module

    monkeypatch.setattr(progress_module, "_columns", lambda stream: 30)
    bar, clock, stream = progress(True, total=10)
    bar.update(1, detail="a detail that does not fit")
    assert stream.getvalue() == "\r" + "convert  10% [##......................] 1/10"[:29]


def test_failure_ends_the_terminal_line_without_a_final_line():
    bar, clock, stream = progress(True, total=10)
    try:
        with bar:
            bar.update(3)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert stream.getvalue().endswith("ETA ?\n") and "done in" not in stream.getvalue()
    plain, clock, stream = progress(False, total=10)
    try:
        with plain:
            plain.update(3)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert stream.getvalue() == ""  # a short failed run leaves only its error message


def test_unknown_total_and_bytes():
    bar, clock, stream = progress(False, total=None, unit="entries")
    clock.now += 20
    bar.update(1_234_567)
    bar.close()
    assert stream.getvalue().splitlines() == [
        "convert: 1,234,567 entries, 61,728 entries/s, elapsed 20s",
        "convert: 1,234,567 entries, 61,728 entries/s, done in 20s"]
    bar, clock, stream = progress(True, total=None, unit="B")
    clock.now += 2
    bar.update(3_000_000)
    assert stream.getvalue() == "\rconvert: 3.00 MB, 1.50 MB/s, elapsed 2s"
    assert format_amount(250e6, 1.5e9, "B") == "0.25/1.50 GB"
    assert format_amount(512, 900, "B") == "512/900 B"
    assert format_rate(12_345, "B") == "12.3 kB/s" and format_rate(0.5, "tensors") == "0.50 tensors/s"
    assert [format_duration(s) for s in (0.4, 42, 185, 7380, 370800)] == \
        ["0s", "42s", "3m05s", "2h03m", "4d07h"]


def test_stderr_by_default_and_no_progress(capsys):
    bar = Progress(2, "work", "items")
    bar.update(2)
    bar.close()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("work: 2/2 items (100%)")
    with NoProgress(5, "work", "items") as silent:
        silent.update(5, detail="x", force=True)
        silent.clear()
    assert capsys.readouterr() == ("", "")


# ---------------------------------------------------------------------------- in the tools
def _dataset(prefix, documents=50, seed=0):
    import numpy as np

    from megatron_ext.indexed_dataset import MMapIndexedDatasetBuilder

    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.RandomState(seed)
    for _ in range(documents):
        builder.add_item(rng.randint(0, 100, size=rng.randint(5, 40)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


INDEX_ARGS = ("--split", "90,10,0", "--seq-length", "16", "--train-samples", "100",
              "--valid-samples", "5")


def test_index_build_reports_each_index_it_builds(tmp_path, capsys):
    """Not a terminal: one final line per index built (2 epochs of 45 documents + 2 x 118
    samples + 1, built and written); none for a cache that is reused."""
    from tools import build_dataset_indices

    prefix = _dataset(str(tmp_path / "corpus_text_document"))
    assert build_dataset_indices.main(["--data-path", prefix, *INDEX_ARGS]) == 0
    err = capsys.readouterr().err
    assert "train index of corpus_text_document: 654/654 entries (100%), " in err
    assert "valid index of corpus_text_document: 48/48 entries (100%), " in err
    assert err.count("done in") == 2 and "\r" not in err
    assert build_dataset_indices.main(["--data-path", prefix, *INDEX_ARGS]) == 0
    assert "entries" not in capsys.readouterr().err


def test_index_build_on_a_terminal_draws_a_bar(tmp_path, capsys, monkeypatch):
    from tools import build_dataset_indices

    prefix = _dataset(str(tmp_path / "corpus_text_document"))
    terminal = FakeStream(tty=True)
    monkeypatch.setattr("sys.stderr", terminal)
    assert build_dataset_indices.main(["--data-path", prefix, *INDEX_ARGS]) == 0
    out = terminal.getvalue()
    assert "\rtrain index of corpus_text_document 100% [########################] 654/654 entries" in out
    assert "\rtrain index of corpus_text_document   0% [" in out  # drawn at the start
    assert "shuffling doc_idx" in out and "writing the cache" in out


@pytest.mark.multiprocess
def test_merge_as_a_script_ends_with_a_progress_line(tmp_path):
    from launch import run_python

    parts = [_dataset(str(tmp_path / f"part{k}_text_document"), seed=k) for k in range(3)]
    size = sum(os.path.getsize(p + ".bin") for p in parts)
    result = run_python("tools/merge_datasets.py",
                        ["--input", *parts, "--output-prefix", tmp_path / "all_text_document"],
                        timeout=120)
    assert result.returncode == 0, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"merge: {size / 1e3:.2f}/{size / 1e3:.2f} kB (100%), ")
    assert "done in" in last and last.endswith("3/3 datasets")
    assert "merged 3 datasets" in result.stdout
