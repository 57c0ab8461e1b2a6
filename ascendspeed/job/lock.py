"""One job per checkpoint directory: `DIR/job.lock`, held for the life of the job.

Two jobs saving into one directory (a relaunch while the old job is still dying, a requeued
SLURM job) overwrite each other's checkpoints. The lock is an exclusive `flock` on `DIR/job.lock`,
taken by global rank 0 before the first save, whose text names the holder (host, pid, start
time, command). The kernel drops a flock when its process dies, so a lock left by a dead job is
free: the next job takes it over and says whose it was. flock also works across NFS v4 clients;
on filesystems without it, the lock only excludes jobs on the same host.

When torchrun restarts its workers, the new rank 0 may find the lock still held by the previous
attempt's rank 0 (or by a child it forked) while torchrun is ending it: a holder with our host
and launcher is waited for, up to `patience` seconds, before the lock is refused.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
import time

from ascendspeed.errors import JobLockError

logger = logging.getLogger(__name__)

LOCK_FILENAME = "job.lock"


def holder_text(path: str) -> str:
    """Who holds (or last held) the lock at `path`, in words."""
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
        return (f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}: "
                f"{holder['command']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown holder (the lock file is empty or unreadable)"


class DirectoryLock:
    """`DirectoryLock(directory).acquire()` or JobLockError naming the live holder."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILENAME)
        self._fd: int | None = None

    def acquire(self, patience: float = 0.0) -> None:
        """`patience`: seconds to wait for a holder that is an earlier attempt of this job."""
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + patience
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() < deadline and self._held_by_an_earlier_attempt():
                    time.sleep(0.2)
                    continue
                os.close(fd)
                raise JobLockError(f"{self.path}: another job is using this checkpoint directory "
                                   f"({holder_text(self.path)}); stop it first, or give another --save")
        previous = os.read(fd, 4096)
        if previous.strip():
            whose = ("an earlier attempt of this job" if self._held_by_an_earlier_attempt()
                     else "a job that is gone")
            logger.warning(" taking over %s from %s (%s)", self.path, whose, holder_text(self.path))
        me = {"host": socket.gethostname(), "pid": os.getpid(), "launcher_pid": os.getppid(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd

    def _held_by_an_earlier_attempt(self) -> bool:
        """The holder ran on this host under our launcher (torchrun restarting its workers)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                holder = json.load(f)
            return (holder["host"] == socket.gethostname() and holder["launcher_pid"] == os.getppid()
                    and holder["pid"] != os.getpid())
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def release(self) -> None:
        """Unlock and empty the file (a clean exit leaves no holder to take over from)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
