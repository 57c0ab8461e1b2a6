"""Long runs survive, with real torchrun jobs (gloo): divergence stops the run before any
checkpoint holds non-finite weights, a failed write fails the save without touching the latest
checkpoint, the kill switch stops every rank cleanly, one job owns a checkpoint directory, and
workers stop when their launcher is killed. Every wait is bounded."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from launch import kill_process_tree, launch_env, run_command, run_torchrun, start_torchrun, torchrun_command
from test_pretrain import corpus, model_args  # noqa: F401  (corpus is a fixture)

pytestmark = pytest.mark.multiprocess

TRACKER = "latest_checkpointed_iteration.txt"
PULSE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "pulse.py")


def tracker(save) -> str | None:
    path = os.path.join(save, TRACKER)
    return open(path).read().strip() if os.path.exists(path) else None


def heartbeat(save) -> dict:
    with open(os.path.join(save, "heartbeat.json")) as f:
        return json.load(f)


def weights_finite(save, iteration: int) -> bool:
    directory = os.path.join(save, f"iter_{iteration:07d}")
    for rank_dir in sorted(os.listdir(directory)):
        state = torch.load(os.path.join(directory, rank_dir, "model_optim_rng.pt"), weights_only=True)
        tensors = [t for t in _tensors(state["model"])]
        assert tensors
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            return False
    return True


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)


# lr 300 without clipping: finite for six iterations (checkpoints at 2, 4, 6), then the gradient
# norm or the loss goes non-finite (measured: at iteration 7 or 8 on this model and data).
DIVERGING = ("--lr", "300", "--min-lr", "300", "--lr-warmup-iters", "0", "--clip-grad", "0",
             "--train-iters", "20", "--save-interval", "2", "--eval-interval", "1000")


def test_a_diverging_run_stops_before_a_non_finite_checkpoint(corpus, tmp_path):  # noqa: F811
    save = str(tmp_path / "checked")
    result = run_torchrun("pretrain_bloom.py", model_args(corpus, *DIVERGING, "--save", save), 2, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: iteration")]
    assert len(errors) == 2, result.stderr[-3000:]  # one line per rank, the same
    # which ranks: those whose own loss or gradients were non-finite, or none when only the
    # global sum of squares overflowed (both happen at this learning rate)
    assert "non-finite" in errors[0] and ("from rank(s) " in errors[0] or "from no single rank" in errors[0])
    stopped_at = int(errors[0].split()[2].rstrip(":"))
    latest = int(tracker(save))
    assert latest < stopped_at and latest >= 2
    for name in os.listdir(save):
        if name.startswith("iter_"):
            assert not name.endswith(".tmp") and weights_finite(save, int(name[5:]))
    beat = heartbeat(save)
    assert beat["state"] == "failed" and f"iteration {stopped_at}" in beat["reason"]

    # The same run without the check trains on and saves non-finite weights: the check is what
    # keeps them out.
    unchecked = str(tmp_path / "unchecked")
    result = run_torchrun("pretrain_bloom.py", model_args(corpus, *DIVERGING, "--save", unchecked,
                                                          "--no-check-for-nan-in-loss-and-grad"), 2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert tracker(unchecked) == "20" and not weights_finite(unchecked, 20)


def test_kill_switch_saves_and_stops_every_rank(corpus, tmp_path):  # noqa: F811
    save, switch = str(tmp_path / "save"), tmp_path / "stop-now"
    switch.write_text("")
    result = run_torchrun("pretrain_bloom.py", model_args(corpus, "--save", save, "--kill-switch-path", str(switch)),
                          2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"exiting at iteration 1 (kill switch {switch})" in result.stdout
    assert tracker(save) == "1"
    assert heartbeat(save)["state"] == "stopped"
    pulse = run_command([sys.executable, PULSE, "--save", save, "--relaunch", "false"], timeout=60)
    assert pulse.returncode == 0 and pulse.stdout.startswith(f"stopped: kill switch {switch} at iteration 1/10")
    assert "relaunched (" not in pulse.stdout  # the operator's stop is never undone
    switch.unlink()
    resumed = run_torchrun("pretrain_bloom.py", model_args(corpus, "--save", save, "--load", save), 2, timeout=300)
    assert resumed.returncode == 0 and tracker(save) == "10"
    assert heartbeat(save)["state"] == "finished"


def test_a_failed_write_fails_the_save_and_keeps_the_previous_checkpoint(corpus, tmp_path):  # noqa: F811
    save = str(tmp_path / "save")
    tp2 = ("--tensor-model-parallel-size", "2", "--save", save, "--save-interval", "2")
    first = run_torchrun("pretrain_bloom.py", model_args(corpus, *tp2, "--exit-interval", "2"), 2, timeout=300)
    assert first.returncode == 0 and tracker(save) == "2", first.stderr[-3000:]
    # Rank 1 may write no file past 64 KiB (its checkpoint file is ~5x that): the kernel refuses
    # the write (EFBIG) as a full disk or a quota would.
    script = 'if [ "$RANK" = 1 ]; then ulimit -f 128; fi; exec "$0" "$@"'
    command = [*torchrun_command("pretrain_bloom.py", model_args(corpus, *tp2, "--load", save), 2)]
    launcher_end = command.index("--nproc_per_node=2") + 1
    command = command[:launcher_end] + ["--no-python", "sh", "-c", script, sys.executable] + command[launcher_end:]
    result = run_command(command, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: saving iteration 4")]
    assert len(errors) == 2, result.stderr[-3000:]
    assert "rank 1 could not write" in errors[0] and "mp_rank_01" in errors[0]
    assert "the latest checkpoint is still iteration 2" in errors[0]
    assert tracker(save) == "2"
    assert sorted(os.listdir(save)) == ["heartbeat.json", "iter_0000002", "job.lock", TRACKER]
    assert heartbeat(save)["state"] == "failed"


def _wait_for_iteration(save, at_least: int, process, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the job ended early"
        try:
            beat = heartbeat(save)
            if beat["iteration"] >= at_least:
                return beat
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no heartbeat at iteration {at_least} within {timeout} s")


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


LONG = ("--train-iters", "100000", "--log-interval", "1000", "--eval-interval", "100000")


def test_one_job_per_checkpoint_directory(corpus, tmp_path):  # noqa: F811
    save = str(tmp_path / "save")
    first = start_torchrun("pretrain_bloom.py", model_args(corpus, *LONG, "--save", save), 1,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        beat = _wait_for_iteration(save, 1, first)
        second = run_torchrun("pretrain_bloom.py", model_args(corpus, "--save", save), 2, timeout=300)
        assert second.returncode != 0
        refusal = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
        assert refusal and "another job is using this checkpoint directory" in refusal[0]
        assert f"pid {beat['pid']}" in second.stderr
        assert first.poll() is None  # the first job trains on
    finally:
        kill_process_tree(first.pid)
        first.wait(timeout=60)
    third = run_torchrun("pretrain_bloom.py", model_args(corpus, "--save", save), 1, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "taking over" in third.stdout + third.stderr and f"pid {beat['pid']}" in third.stdout + third.stderr


def test_workers_stop_when_their_launcher_is_killed(corpus, tmp_path):  # noqa: F811
    save = str(tmp_path / "orphans")
    job = start_torchrun("pretrain_bloom.py", model_args(corpus, *LONG, "--save", save, "--save-interval", "3"), 2,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        beat = _wait_for_iteration(save, 4, job)
        workers = [pid for pid in _processes_mentioning(save) if pid != job.pid]
        assert len(workers) == 2, workers
        os.kill(job.pid, signal.SIGKILL)  # torchrun alone: its workers are in their own sessions
        job.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers), "orphaned workers still run"
    finally:
        for pid in _processes_mentioning(save):
            kill_process_tree(pid)
    # Whatever moment they stopped at, every published checkpoint is complete.
    for name in os.listdir(save):
        if name.startswith("iter_") and not name.endswith(".tmp"):
            assert os.listdir(os.path.join(save, name)) == ["mp_rank_00"]
    assert int(tracker(save)) >= 3 and beat["iteration"] >= 4


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False
