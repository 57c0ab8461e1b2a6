"""Workers stop when their launcher is gone.

torchrun starts each worker in its own session, so killing the launcher's process group misses
them, and a `kill -9` of torchrun leaves its workers training and saving as orphans, racing the
next job for the checkpoint directory. Under torchrun (TORCHELASTIC_RUN_ID is set) a daemon
thread watches the parent pid; when the worker is re-parented (the launcher died), it ends the
process at once with os._exit. Checkpoints are written under staging names and renamed when
complete, so an exit at any moment leaves no half-written checkpoint under a final name.
"""
from __future__ import annotations

import os
import sys
import threading
import time

EXIT_STATUS = 3  # distinct from a user error (2): the launcher vanished


_watch: threading.Thread | None = None


def watch_launcher(poll_seconds: float = 1.0) -> threading.Thread | None:
    """Start the watch (once per process) when this process was launched by torchrun; the
    thread, or None."""
    global _watch
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    if _watch is not None:
        return _watch
    launcher = os.getppid()
    if launcher == 1:  # already orphaned before we looked
        _stop(launcher)

    def watch():
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != launcher:
                _stop(launcher)

    _watch = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    _watch.start()
    return _watch


def _stop(launcher: int) -> None:
    print(f"error: the launcher (pid {launcher}) is gone; rank {os.environ.get('RANK', '?')} stops",
          file=sys.stderr, flush=True)
    os._exit(EXIT_STATUS)
