"""Where our checkpoints keep what (Megatron-LM's layout):

    {root}/latest_checkpointed_iteration.txt          the tracker: an iteration number or "release"
    {root}/iter_{N:07d}/ (or release/)                  one iteration
        mp_rank_{TT:02d}[_{PPP:03d}]/model_optim_rng.pt one per TP rank TT (and PP rank PPP, PP > 1)

A rank file holds `model` (`model0`, `model1`, ... with virtual pipeline chunks; its nesting is
tensors.py's), `optimizer`, `opt_param_scheduler`, `iteration`, `consumed_*_samples`, `tokens`,
`checkpoint_version`, `checkpoint_info`, `args` and the RNG states (RNG_KEYS).
"""
from __future__ import annotations

import os

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
RANK_FILENAME = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
RNG_KEYS = ("random_rng_state", "np_rng_state", "torch_rng_state", "device_rng_state",
            "rng_tracker_states")


def iteration_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_file(iteration_dir: str, tp_rank: int, pp_rank: int, pp_size: int) -> str:
    rank = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return os.path.join(iteration_dir, rank, RANK_FILENAME)


def rank_dirs(iteration_dir: str) -> list[str]:
    """The mp_rank_* directory names under `iteration_dir`, sorted ([] if it does not exist)."""
    if not os.path.isdir(iteration_dir):
        return []
    return sorted(d for d in os.listdir(iteration_dir) if d.startswith("mp_rank_"))


def model_key(chunk: int, chunks: int) -> str:
    """The rank file's entry for model chunk `chunk` of `chunks`."""
    return "model" if chunks == 1 else f"model{chunk}"
