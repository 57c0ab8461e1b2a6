"""Checkpoint files, written so that nothing half-written appears under a final name: a file
through a temporary name and a rename, a directory through `NAME.tmp/` renamed when complete,
the tracker last. Reading never runs pickled code (torch.load(weights_only=True)).
"""
from __future__ import annotations

import os
import shutil

import torch

from ascendspeed.checkpoint.layout import TRACKER_FILENAME
from ascendspeed.errors import CheckpointError


# ------------------------------------------------------------------------------------ writing
def write_atomically(path: str, text: str) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def save_atomically(state: dict, path: str) -> None:
    """torch.save `state` to `path` (its directory made) through `path.tmp`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def fresh_staging(final: str) -> str:
    """An empty `final.tmp/` (a crashed earlier attempt's removed) to write `final` into."""
    staging = final + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    return staging


def publish(staging: str, final: str) -> None:
    """Rename the complete `staging` to `final`, replacing what was there."""
    if os.path.isdir(final):
        shutil.rmtree(final)
    elif os.path.exists(final):
        os.remove(final)
    os.replace(staging, final)


def write_tracker(root: str, iteration: int | str) -> None:
    write_atomically(os.path.join(root, TRACKER_FILENAME), str(iteration))


# ------------------------------------------------------------------------------------ reading
def read_tracker(root: str) -> int | str | None:
    """The iteration the tracker names ("release" for released weights); None without one."""
    path = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None
    text = open(path, encoding="utf-8").read().strip()
    if text == "release":
        return text
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number or 'release', found "
                              f"{text[:40]!r}") from None


def read_checkpoint_file(path: str, mmap: bool = False) -> dict:
    """`path`'s contents, without running pickled code; `mmap` maps the tensors instead of
    reading them (for a look at `args` without loading a rank's weights)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # missing, truncated, corrupt, or holding pickled code
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(error).__name__}: "
                              f"{(str(error).splitlines() or [''])[0][:200]})") from error
    if not isinstance(state, dict) or not any(k.startswith("model") for k in state):
        raise CheckpointError(f"{path}: not a model checkpoint (no 'model' entry)")
    return state
