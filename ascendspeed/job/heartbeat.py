"""The job's status file (`--heartbeat-file`, default `SAVE/heartbeat.json`), for operators and
tools/pulse.py.

Global rank 0 rewrites it (through a temporary file and a rename, so a reader never sees half a
file) when the run starts, at most every `interval` seconds while it trains, and when it ends:

    {"state": "running" | "finished" | "stopped" | "failed", "reason": why it stopped or failed,
     "iteration": 120, "train_iters": 1000, "consumed_samples": 61440, "loss": 3.21,
     "time": 1764633600.0, "updated": "2026-12-01T23:40:00+00:00", "started": "...",
     "host": "node-0", "pid": 4242, "launcher_pid": 4200, "seconds_per_iteration": 1.9}

A job killed with -9 leaves "running" with an old time: the reader judges it by `time` (stalled)
and, on the same host, by whether `pid` still exists (dead).
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import time

RUNNING, FINISHED, STOPPED, FAILED = "running", "finished", "stopped", "failed"
HEARTBEAT_FILENAME = "heartbeat.json"


def _now_text(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


def read_heartbeat(path: str) -> dict:
    """The status `path` holds; OSError / ValueError when it is missing or not a heartbeat."""
    with open(path, encoding="utf-8") as f:
        status = json.load(f)
    if not isinstance(status, dict) or "state" not in status or "time" not in status:
        raise ValueError(f"{path}: not a heartbeat file (expected a JSON object with 'state' and 'time')")
    return status


class Heartbeat:
    """Writes the status file; a no-op when `path` is None (no --save, no --heartbeat-file)."""

    def __init__(self, path: str | None, train_iters: int, interval: float = 10.0):
        self.path = path
        self.interval = interval
        self._last_write = 0.0
        started = time.time()
        self.status = {"state": RUNNING, "reason": None, "iteration": 0, "train_iters": train_iters,
                       "consumed_samples": 0, "loss": None, "time": started, "updated": _now_text(started),
                       "started": _now_text(started), "host": socket.gethostname(), "pid": os.getpid(),
                       "launcher_pid": os.getppid(), "seconds_per_iteration": None}

    def beat(self, iteration: int, consumed_samples: int, loss: float | None,
             seconds_per_iteration: float | None = None, force: bool = False) -> None:
        """After an iteration: rewritten when `interval` seconds have passed since the last write."""
        self.status.update(iteration=iteration, consumed_samples=consumed_samples)
        if loss is not None:
            self.status["loss"] = loss
        if seconds_per_iteration is not None:
            self.status["seconds_per_iteration"] = seconds_per_iteration
        if force or time.monotonic() - self._last_write >= self.interval:
            self._write()

    def end(self, state: str, reason: str | None = None) -> None:
        self.status.update(state=state, reason=reason)
        self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        now = time.time()
        self.status.update(time=now, updated=_now_text(now))
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        temporary = f"{self.path}.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(self.status, f, indent=1)
            f.write("\n")
        os.replace(temporary, self.path)
        self._last_write = time.monotonic()
