"""Where the GPT dataset's index arrays are cached, who builds them, and when a cache is stale.

File names are Megatron's (`{prefix}_{name}_indexmap_{ns}ns_{sl}sl_{seed}s_{doc,sample,shuffle}_idx.npy`),
so caches Megatron already built are reused. Megatron's key omits the split, the cutoff and the
data itself; we record those in a sidecar (`..._meta.json`) and rebuild a cache whose sidecar
disagrees. A cache without a sidecar (written by Megatron) is checked for consistency with the
data before it is trusted. Files are written under temporary names and renamed into place, by one
process per node while the others wait.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

logger = logging.getLogger(__name__)

ARRAY_NAMES = ("doc_idx", "sample_idx", "shuffle_idx")
SIDECAR_FORMAT = 1


@dataclass(frozen=True)
class IndexIdentity:
    """Everything the three arrays depend on beyond what the file name says."""
    first_document: int
    end_document: int
    sizes_digest: str
    tokens_per_epoch: int
    num_epochs: int
    separate_last_epoch: bool
    cutoff_last_epoch: float
    format: int = SIDECAR_FORMAT


def sizes_digest(sizes: np.ndarray) -> str:
    return hashlib.blake2b(memoryview(np.ascontiguousarray(sizes, dtype="<i4")),
                           digest_size=16).hexdigest()


def cache_paths(data_prefix: str, name: str, num_samples: int, seq_length: int, seed: int,
                cache_dir: str | None = None) -> dict[str, str]:
    base = f"{data_prefix}_{name}_indexmap_{num_samples}ns_{seq_length}sl_{seed}s"
    if cache_dir is not None:
        base = os.path.join(cache_dir, os.path.basename(base))
    paths = {array: f"{base}_{array}.npy" for array in ARRAY_NAMES}
    paths["meta"] = f"{base}_meta.json"
    return paths


def load_cached(paths: dict[str, str], identity: IndexIdentity,
                check_legacy: Callable[[dict[str, np.ndarray]], str | None]):
    """The cached arrays if present and valid for `identity`, else None (with the reason logged)."""
    if not all(os.path.exists(paths[a]) for a in ARRAY_NAMES):
        return None
    try:
        arrays = {a: np.load(paths[a], allow_pickle=False, mmap_mode="r") for a in ARRAY_NAMES}
    except (ValueError, OSError) as error:
        logger.warning(" > index cache %s is unreadable (%s); rebuilding", paths["doc_idx"], error)
        return None
    if os.path.exists(paths["meta"]):
        try:
            with open(paths["meta"], encoding="utf-8") as f:
                recorded = json.load(f)
        except (ValueError, OSError):
            recorded = None
        if recorded != asdict(identity):
            logger.warning(" > index cache %s was built for other data, split or cutoff "
                           "(recorded %s, now %s); rebuilding", paths["meta"], recorded,
                           asdict(identity))
            return None
        return arrays
    problem = check_legacy(arrays)
    if problem is not None:
        logger.warning(" > index cache %s (no sidecar) does not fit this data: %s; rebuilding",
                       paths["doc_idx"], problem)
        return None
    logger.info(" > reusing index cache %s written without a sidecar (checked against the data)",
                paths["doc_idx"])
    return arrays


def save_atomically(paths: dict[str, str], arrays: dict[str, np.ndarray],
                    identity: IndexIdentity, saved: Callable[[int], None] | None = None) -> None:
    """np.save each array to a temporary name and rename; the sidecar is renamed last. `saved`
    is called with each array's length once it is written (progress)."""
    directory = os.path.dirname(os.path.abspath(paths["doc_idx"]))
    os.makedirs(directory, exist_ok=True)
    written = []
    try:
        for array in ARRAY_NAMES:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npy")
            written.append(tmp)
            with os.fdopen(fd, "wb") as f:
                np.save(f, arrays[array], allow_pickle=False)
            if saved is not None:
                saved(len(arrays[array]))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
        written.append(tmp)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(asdict(identity), f, indent=1)
        for tmp, target in zip(written, [paths[a] for a in ARRAY_NAMES] + [paths["meta"]]):
            os.replace(tmp, target)
    except BaseException:
        for tmp in written:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


def is_writable_dir(path: str) -> bool:
    directory = os.path.dirname(os.path.abspath(path))
    return os.path.isdir(directory) and os.access(directory, os.W_OK)


def run_on_one_process_per_node(build: Callable[[], None], group=None) -> None:
    """Run `build` on the first process of each node in `group` (all of whose members must call
    this); the others wait for it. Any failure is raised on every process, not only the builder,
    so no rank is left waiting in a collective."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        build()
        return
    host = socket.gethostname()
    hosts = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, host, group=group)
    my_index = dist.get_rank(group)
    failure = None
    if hosts.index(host) == my_index:
        try:
            build()
        except Exception as exc:  # reported to every rank below
            failure = exc
    errors = [None] * len(hosts)
    dist.all_gather_object(errors, None if failure is None else f"{type(failure).__name__}: {failure}",
                           group=group)
    if failure is not None:
        raise failure
    failed = [e for e in errors if e is not None]
    if failed:
        raise RuntimeError(f"building the dataset index cache failed on another rank: {failed[0]}")
