"""The one place that knows cpu / cuda / npu: which device this process uses, the matching
collective backend, the device RNG, synchronisation and memory statistics.

torch_npu is imported only when it is installed and works; without it (or CUDA) everything runs on
the CPU with gloo, which is what the tests exercise. `ASCENDSPEED_DEVICE=cpu|cuda|npu` overrides
the choice.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


@functools.lru_cache(maxsize=1)
def _npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except Exception:  # absent, or installed without the Ascend runtime
        return False
    return hasattr(torch, "npu") and torch.npu.is_available()


@functools.lru_cache(maxsize=1)
def device_type() -> str:
    forced = os.environ.get("ASCENDSPEED_DEVICE")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"ASCENDSPEED_DEVICE={forced!r}: expected one of {', '.join(BACKENDS)}")
        return forced
    if _npu_available():
        return "npu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def default_backend() -> str:
    return BACKENDS[device_type()]


def _module():
    """torch.cuda or torch.npu (None on the CPU)."""
    kind = device_type()
    if kind == "cpu":
        return None
    if kind == "npu":
        _npu_available()
    return getattr(torch, kind)


def set_device(local_rank: int) -> None:
    module = _module()
    if module is not None:
        module.set_device(local_rank % module.device_count())


def current_device() -> torch.device:
    module = _module()
    if module is None:
        return torch.device("cpu")
    return torch.device(device_type(), module.current_device())


def manual_seed(seed: int) -> None:
    """Seed the CPU generator and the device's."""
    torch.manual_seed(seed)
    module = _module()
    if module is not None:
        module.manual_seed(seed)


def get_rng_state() -> torch.Tensor:
    """State of the generator that device-side random ops (dropout) draw from."""
    module = _module()
    return torch.get_rng_state() if module is None else module.get_rng_state()


def set_rng_state(state: torch.Tensor) -> None:
    module = _module()
    if module is None:
        torch.set_rng_state(state)
    else:
        module.set_rng_state(state)


def synchronize() -> None:
    module = _module()
    if module is not None:
        module.synchronize()


def max_memory_allocated() -> int:
    """Peak bytes allocated on the device; on the CPU, the process's peak resident set."""
    module = _module()
    if module is not None:
        return module.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
