"""The job's lock, heartbeat and tools/pulse.py, with real processes where a process matters
(a lock held by another live process, a pid that is gone, a relaunched command)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from ascendspeed.errors import JobLockError
from ascendspeed.job.heartbeat import Heartbeat, read_heartbeat
from ascendspeed.job.lock import DirectoryLock
from launch import REPO_ROOT, launch_env, run_command

PULSE = os.path.join(REPO_ROOT, "tools", "pulse.py")
HOLD_LOCK = """
import sys, time
from ascendspeed.job.lock import DirectoryLock
DirectoryLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def _holder(directory):
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(directory)], stdout=subprocess.PIPE,
                               text=True, env=launch_env())
    assert process.stdout.readline().strip() == "held"
    return process


@pytest.mark.multiprocess
def test_a_second_job_is_refused_naming_the_holder(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(JobLockError) as error:
            DirectoryLock(str(tmp_path)).acquire()
        message = str(error.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message
        assert "job.lock" in message
    finally:
        holder.kill()
        holder.wait(timeout=30)


@pytest.mark.multiprocess
def test_a_lock_whose_holder_is_gone_is_taken_over_with_a_warning(tmp_path, caplog):
    holder = _holder(tmp_path)
    holder.kill()  # kill -9: the kernel drops its flock, the file still names it
    holder.wait(timeout=30)
    lock = DirectoryLock(str(tmp_path))
    with caplog.at_level("WARNING"):
        lock.acquire()
    assert f"pid {holder.pid}" in caplog.text and "taking over" in caplog.text
    assert json.loads((tmp_path / "job.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / "job.lock").read_text() == ""  # a clean exit leaves no holder
    DirectoryLock(str(tmp_path)).acquire()  # and a new job takes it without a warning


def test_heartbeat_is_written_atomically_and_throttled(tmp_path):
    path = tmp_path / "heartbeat.json"
    beat = Heartbeat(str(path), train_iters=10, interval=3600.0)
    beat.beat(1, 8, 5.5, force=True)
    first = read_heartbeat(str(path))
    assert first["state"] == "running" and first["iteration"] == 1 and first["loss"] == 5.5
    beat.beat(2, 16, 5.4)  # within the interval: not rewritten
    assert read_heartbeat(str(path))["iteration"] == 1
    beat.end("finished")
    last = read_heartbeat(str(path))
    assert last["state"] == "finished" and last["iteration"] == 2 and last["consumed_samples"] == 16
    assert [p.name for p in tmp_path.iterdir()] == ["heartbeat.json"]  # no temporary left
    Heartbeat(None, train_iters=10).end("finished")  # no file: nothing written, no error


def _status(tmp_path, age: float = 0.0, **fields):
    """A heartbeat whose last beat was `age` seconds ago (measured now, not at collection)."""
    status = {"state": "running", "reason": None, "iteration": 3, "train_iters": 10,
              "consumed_samples": 24, "loss": 4.5, "time": time.time() - age, "host": socket.gethostname(),
              "pid": os.getpid(), "launcher_pid": os.getppid()}
    status.update(fields)
    (tmp_path / "heartbeat.json").write_text(json.dumps(status))


def pulse(tmp_path, *extra):
    return run_command([sys.executable, PULSE, "--save", str(tmp_path), *extra], timeout=60)


@pytest.mark.multiprocess
@pytest.mark.parametrize("fields,code,start", [
    ({}, 0, "alive: iteration 3/10"),
    ({"state": "finished", "iteration": 10}, 0, "finished: iteration 10/10"),
    ({"state": "stopped", "reason": "kill switch /x/stop"}, 0, "stopped: kill switch /x/stop"),
    ({"state": "stopped", "reason": "--exit-interval 3"}, 5, "stopped: --exit-interval 3"),
    ({"state": "failed", "reason": "iteration 3: non-finite loss"}, 4, "failed: iteration 3: non-finite loss"),
    ({"age": 3600}, 3, "stalled: no beat for 60 minutes"),
    ({"host": "elsewhere", "age": 60}, 0, "alive:"),
])
def test_pulse_reads_the_heartbeat(tmp_path, fields, code, start):
    _status(tmp_path, **fields)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("2")
    result = pulse(tmp_path)
    assert result.returncode == code, result.stdout + result.stderr
    assert result.stdout.startswith(start) and "latest checkpoint 2" in result.stdout


@pytest.mark.multiprocess
def test_pulse_says_dead_when_the_pid_is_gone_and_relaunches_at_most_n_times(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    _status(tmp_path, pid=gone.pid)
    marker = tmp_path / "relaunched"
    command = f"{sys.executable} -c \"open('{marker}', 'a').write('x')\""
    result = pulse(tmp_path, "--relaunch", command, "--max-relaunches", "1")
    assert result.returncode == 4 and result.stdout.startswith(f"dead: pid {gone.pid} is gone")
    assert "relaunched (1 of 1)" in result.stdout
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.read_text() == "x"
    again = pulse(tmp_path, "--relaunch", command, "--max-relaunches", "1")
    assert "not relaunched: --max-relaunches 1 reached" in again.stdout
    assert json.loads((tmp_path / "pulse.json").read_text())["relaunches"] == 1


@pytest.mark.multiprocess
def test_pulse_stops_a_stalled_job_before_relaunching(tmp_path):
    stalled = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _status(tmp_path, age=7200, pid=stalled.pid, launcher_pid=stalled.pid)
        result = pulse(tmp_path, "--relaunch", "true", "--grace-seconds", "5")
        assert result.returncode == 3 and "relaunched (1 of 3)" in result.stdout
        assert stalled.wait(timeout=30) is not None  # SIGTERMed
    finally:
        stalled.kill()


@pytest.mark.multiprocess
def test_pulse_without_a_heartbeat_and_with_a_bad_one(tmp_path):
    result = pulse(tmp_path)
    assert result.returncode == 4 and result.stdout.startswith("not started: no heartbeat")
    (tmp_path / "heartbeat.json").write_text("{not json")
    bad = pulse(tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "heartbeat.json" in bad.stderr
