"""Random-number streams under tensor parallelism, as Megatron arranges them.

The default stream (seed + 100 * pp_rank) is the same on every TP rank of a replica: dropout on
replicated activations (hidden and embedding dropout) must pick the same elements everywhere. The
"model-parallel" stream (that seed + 2718 + tp_rank) differs per TP rank and is used inside TP
regions, for attention dropout on each rank's own heads. `fork()` switches to it and back; its
state is saved so recomputation can replay it.
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from ascendspeed import device
from ascendspeed.core import parallel_state as ps

MODEL_PARALLEL_RNG = "model-parallel-rng"
_MODEL_PARALLEL_SEED_OFFSET = 2718


class RNGStatesTracker:
    """Named device-RNG states that can be forked into and out of."""

    def __init__(self):
        self.states: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.states = {}

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise ValueError(f"RNG state {name!r} already exists")
        saved = device.get_rng_state()
        device.manual_seed(seed)
        self.states[name] = device.get_rng_state()
        device.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        if name not in self.states:
            if ps.get_tensor_model_parallel_world_size() == 1:
                yield  # unseeded single-rank use (inference, tests): the default stream serves
                return
            raise KeyError(f"RNG state {name!r} was never added; call model_parallel_seed first")
        saved = device.get_rng_state()
        device.set_rng_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = device.get_rng_state()
            device.set_rng_state(saved)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def model_parallel_seed(seed: int) -> None:
    """Seed python, numpy, torch and the device (per pipeline stage) and the TP-rank stream."""
    seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    device.manual_seed(seed)
    _TRACKER.reset()
    _TRACKER.add(MODEL_PARALLEL_RNG,
                 seed + _MODEL_PARALLEL_SEED_OFFSET + ps.get_tensor_model_parallel_rank())


class _ReplayTrackerStates:
    """Wraps a checkpointed function so its recomputation sees the tracker states of the original
    forward (torch's checkpoint already replays the default CPU/device stream)."""

    def __init__(self, function):
        self.function = function
        self.states = None

    def __call__(self, *args):
        if self.states is None:  # the original forward
            self.states = _TRACKER.get_states()
            return self.function(*args)
        after = _TRACKER.get_states()
        _TRACKER.set_states(self.states)
        try:
            return self.function(*args)
        finally:
            _TRACKER.set_states(after)


def checkpoint(function, *args):
    """Activation recompute that reproduces every dropout mask of the original forward, in the
    default stream and in the tensor-parallel one."""
    import torch.utils.checkpoint

    return torch.utils.checkpoint.checkpoint(_ReplayTrackerStates(function), *args,
                                             use_reentrant=False, preserve_rng_state=True)
