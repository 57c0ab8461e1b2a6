"""torchrun restarts and bounded collectives, with real torchrun jobs (gloo, TP=2 on 2 processes).

A worker kill -9'ed at varied moments (startup, mid-iteration, during and right after a save;
rank 0, which holds the job lock, or rank 1): `torchrun --max-restarts 1` starts both workers
again, they meet under a prefix of their own in the launcher's store (ascendspeed/job/
rendezvous.py), resume from the latest complete checkpoint, and the job exits 0 with an
uninterrupted run's losses and final weights, bit for bit. A stopped rank (SIGSTOP) makes the job
fail within --distributed-timeout-minutes plus a margin, naming the collective. Every wait is
bounded."""
from __future__ import annotations

import datetime
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from ascendspeed.job import rendezvous
from launch import REPO_ROOT, kill_process_tree, launch_env, run_command, run_torchrun, start_torchrun
from test_pretrain import corpus, model_args  # noqa: F401  (corpus is a fixture)

TRACKER = "latest_checkpointed_iteration.txt"
RUN = ("--tensor-model-parallel-size", "2", "--train-iters", "12", "--save-interval", "3")
LOSS = re.compile(r" iteration +(\d+)/ +\d+ \|.*\| lm loss: ([0-9.E+-]+) \|")
STARTED = " parameters on this rank"  # the logging rank's line once its attempt has loaded


def tracker(save) -> int | None:
    path = os.path.join(save, TRACKER)
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def printed_losses(lines) -> list[tuple[int, str]]:
    return [(int(m.group(1)), m.group(2)) for m in map(LOSS.search, lines) if m]


def final_state(save, iteration: int = 12) -> dict:
    directory = os.path.join(save, f"iter_{iteration:07d}")
    return {rank: torch.load(os.path.join(directory, rank, "model_optim_rng.pt"), weights_only=True)
            for rank in sorted(os.listdir(directory))}


def assert_same_tensors(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")


class Job:
    """A torchrun job whose output (stdout and stderr together) is read as it comes."""

    def __init__(self, args, launcher_args=()):
        self.process = start_torchrun("pretrain_bloom.py", args, 2, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, launcher_args=launcher_args)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, condition, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"the job ended before {what}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{self.output()}"
            time.sleep(0.002)  # some moments (a save in progress) last milliseconds

    def printed(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def workers(self) -> dict[int, int]:
        """{global rank: pid} of the launcher's live children."""
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) != self.process.pid:
                        continue
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
                found[int(env[b"RANK"])] = int(entry)
            except (OSError, KeyError, ValueError, IndexError):
                pass
        return found

    def send(self, rank: int, number: int) -> int:
        """Signal `number` to the rank's worker (once it exists); its pid."""
        self.wait_for(lambda: rank in self.workers(), f"a rank {rank} worker")
        pid = self.workers()[rank]
        os.kill(pid, number)
        return pid

    def finish(self, timeout: float) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            self.stop()
            pytest.fail(f"the job did not end within {timeout} s:\n{self.output()}", pytrace=False)
        self._reader.join(timeout=30)
        return code

    def stop(self) -> None:
        for pid in self.workers().values():
            kill_process_tree(pid)
        kill_process_tree(self.process.pid)
        self.process.wait(timeout=60)

    def text(self) -> str:
        return "".join(self.lines)

    def output(self) -> str:
        """The end of the output, for a failure message."""
        return self.text()[-6000:]


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):  # noqa: F811
    """An uninterrupted run: its printed losses by iteration and its save directory."""
    save = str(tmp_path_factory.mktemp("straight") / "save")
    result = run_torchrun("pretrain_bloom.py", model_args(corpus, *RUN, "--save", save), 2,
                          timeout=300, check=True)
    losses = dict(printed_losses(result.stdout.splitlines()))
    assert sorted(losses) == list(range(1, 13))
    return losses, save


def _a_worker(job, save):
    return bool(job.workers())


def _saved(iteration):
    return lambda job, save: tracker(save) == iteration


def _saving(first):
    """While a save of iteration `first` or later is being written (its iter_N.tmp/ exists).
    A tiny model's save lasts milliseconds, so every later save (9, 12) is a chance too."""
    def saving(job, save):
        try:
            names = os.listdir(save)
        except OSError:
            return False
        return any(re.fullmatch(r"iter_(\d{7})\.tmp", name) and int(name[5:12]) >= first
                   for name in names)
    return saving


def _logged(iteration):
    return lambda job, save: job.printed(f" iteration {iteration:8d}/")


# (the moment, the rank killed with -9 then)
MOMENTS = {
    "rank1-during-startup": (_a_worker, 1),
    "rank1-right-after-a-save": (_saved(3), 1),
    "rank0-right-after-a-save": (_saved(6), 0),
    "rank1-during-a-save": (_saving(6), 1),
    "rank1-mid-iteration": (_logged(7), 1),
    "rank0-mid-iteration": (_logged(4), 0),
}


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_killed_worker_is_restarted_and_resumes_bit_for_bit(corpus, straight, tmp_path, moment):  # noqa: F811
    expected, straight_save = straight
    save = str(tmp_path / "save")
    condition, rank = MOMENTS[moment]
    job = Job(model_args(corpus, *RUN, "--save", save, "--load", save), ("--max-restarts", "1"))
    try:
        job.wait_for(lambda: condition(job, save), moment)
        saved_before_the_kill = tracker(save) or 0
        job.send(rank, signal.SIGKILL)
        code = job.finish(timeout=180)
    finally:
        if job.process.poll() is None:
            job.stop()
    output = job.output()
    assert code == 0, output
    assert "exitcode: -9" in job.text(), output  # torchrun saw the kill and restarted
    # Every printed loss, before the kill and after the resume, is the straight run's.
    printed = printed_losses(job.lines)
    assert dict(printed) == expected, output
    # The last attempt resumed from a complete checkpoint, no older than the kill's latest.
    last_start = max(i for i, line in enumerate(job.lines) if STARTED in line)
    resumed = [iteration for iteration, _ in printed_losses(job.lines[last_start:])]
    assert resumed == list(range(resumed[0], 13)), output
    assert (resumed[0] - 1) % 3 == 0 and resumed[0] - 1 >= saved_before_the_kill, output
    assert_same_tensors(final_state(save), final_state(straight_save))
    assert not [name for name in os.listdir(save) if name.endswith(".tmp")]
    with open(os.path.join(save, "job.lock")) as f:
        assert f.read() == ""  # released by the last rank 0
    with open(os.path.join(save, "heartbeat.json")) as f:
        assert json.load(f)["state"] == "finished"


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_stopped_rank_fails_the_job_within_the_timeout_naming_the_collective(corpus, tmp_path):  # noqa: F811
    save = str(tmp_path / "save")
    minutes, stopped_pid = 0.1, None
    job = Job(model_args(corpus, "--tensor-model-parallel-size", "2", "--train-iters", "100000",
                         "--eval-interval", "100000", "--save", save,
                         "--distributed-timeout-minutes", str(minutes)))
    try:
        job.wait_for(lambda: job.printed(f" iteration {3:8d}/"), "iteration 3")
        stopped_pid = job.send(1, signal.SIGSTOP)
        stopped = time.monotonic()
        # rank 0 gives up after the timeout, naming the collective
        job.wait_for(lambda: job.printed("error: rank 0: "), "rank 0's error",
                     timeout=60 * minutes + 60)
        elapsed = time.monotonic() - stopped
        # torchrun would end the stopped rank only after its 30 s SIGTERM grace (SIGTERM stays
        # pending on a stopped process); an operator's kill -9 ends the job at once
        os.kill(stopped_pid, signal.SIGKILL)
        code = job.finish(timeout=60)
    finally:
        if stopped_pid is not None:
            kill_process_tree(stopped_pid)  # (SIGKILL ends a stopped process too)
        if job.process.poll() is None:
            job.stop()
    output = job.output()
    assert code != 0 and elapsed < 60 * minutes + 60, output
    errors = [line for line in job.lines if line.startswith("error: rank 0: ")]
    assert len(errors) == 1, output
    assert re.match(r"error: rank 0: \w+ over the tensor-parallel group \(ascendspeed/\S+:\d+\) "
                    r"failed after iteration \d+: .*--distributed-timeout-minutes 0\.1\)$",
                    errors[0].strip()), errors[0]
    with open(os.path.join(save, "heartbeat.json")) as f:
        beat = json.load(f)
    assert beat["state"] == "failed" and "over the tensor-parallel group" in beat["reason"]


def test_the_attempt_id_is_rank_0s_live_one_not_a_dead_attempts():
    """The workers' side of the rendezvous against a store a dead attempt left behind."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=30))
    stale = dist.TCPStore("127.0.0.1", server.port, is_master=False)
    stale.set(rendezvous.LEADER_KEY, "dead")
    stale.set("ascendspeed/rendezvous/dead/echo/1", "a dead rank 1's id")
    stale.set("ascendspeed/rendezvous/dead/echo/2", "a dead rank 2's id")
    agreed: dict[int, str] = {}

    def rank(number):
        store = dist.TCPStore("127.0.0.1", server.port, is_master=False)
        agreed[number] = rendezvous._agree_on_attempt(store, number, 3, datetime.timedelta(seconds=30))

    followers = [threading.Thread(target=rank, args=(n,)) for n in (1, 2)]
    for thread in followers:
        thread.start()
    time.sleep(0.5)  # the followers read the dead leader's id meanwhile, and must not take it
    assert not agreed
    rank(0)
    for thread in followers:
        thread.join(timeout=30)
    assert sorted(agreed) == [0, 1, 2] and len(set(agreed.values())) == 1, agreed
    assert agreed[0] != "dead"


HOLD = """
import sys, time
from ascendspeed.job.lock import DirectoryLock
DirectoryLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""
ACQUIRE = """
import logging, sys, time
from ascendspeed.errors import JobLockError
from ascendspeed.job.lock import DirectoryLock
logging.basicConfig(level=logging.WARNING, format="%(message)s")
start = time.monotonic()
try:
    DirectoryLock(sys.argv[1]).acquire(patience=30)
    print(f"acquired after {time.monotonic() - start:.1f} s", flush=True)
except JobLockError as error:
    print(f"refused after {time.monotonic() - start:.1f} s: {error}", flush=True)
"""


def _hold(directory, seconds: float, through_a_shell: bool = False) -> subprocess.Popen:
    command = [sys.executable, "-c", HOLD, str(directory), str(seconds)]
    if through_a_shell:  # another launcher: the holder's parent is the shell
        command = ["sh", "-c", '"$@"; exit $?', "sh", *command]
    holder = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=launch_env(),
                              cwd=REPO_ROOT)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _acquire(directory) -> str:
    result = run_command([sys.executable, "-c", ACQUIRE, str(directory)], timeout=90)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


@pytest.mark.multiprocess
def test_a_restarted_rank_0_waits_for_the_lock_of_the_attempt_being_ended(tmp_path):
    """A holder with our parent (torchrun's workers share theirs) is waited for; another job's
    holder is refused at once."""
    holder = _hold(tmp_path, 2.0)  # a sibling, as the previous attempt's rank 0 is
    try:
        said = _acquire(tmp_path)
    finally:
        holder.wait(timeout=60)
    assert said.startswith("acquired after ") and float(said.split()[2]) >= 1.0, said
    assert f"taking over {tmp_path / 'job.lock'} from an earlier attempt of this job" in said
    other = _hold(tmp_path, 60.0, through_a_shell=True)
    try:
        said = _acquire(tmp_path)
    finally:
        kill_process_tree(other.pid)
        other.wait(timeout=60)
    assert said.startswith("refused after ") and float(said.split()[2]) < 5, said
    assert "another job is using this checkpoint directory" in said
