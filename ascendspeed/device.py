"""The one place that knows cpu / cuda / npu: which device this process uses, the collective
backends (a per-device map: host tensors over gloo, the device's over its own backend), the
device RNG, synchronisation and memory statistics.

torch_npu is imported only when it is installed and works; without it (or CUDA) everything runs on
the CPU with gloo, which is what the tests exercise. `ASCENDSPEED_DEVICE=cpu|cuda|npu` overrides
the choice.
"""
from __future__ import annotations

import functools
import os

import torch

from ascendspeed.errors import ConfigError

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
# The device types each collective backend carries (torch's Backend.backend_capability; hccl's
# is torch_npu's registration).
CARRIES = {"gloo": ("cpu", "cuda"), "nccl": ("cuda",), "hccl": ("npu",)}


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


def _backend_map(requested: str) -> dict[str, str]:
    """{device type: backend} of a `--distributed-backend` value: a backend name, or a map
    `cpu:gloo,cuda:nccl` (which must include cpu); ConfigError naming the entry otherwise."""
    flag = f"--distributed-backend {requested!r}"
    names = ", ".join(CARRIES)
    text = requested.strip().lower()
    if ":" not in text:
        if text not in CARRIES:
            raise ConfigError(f"{flag}: expected one of {names}, or a device map such as "
                              f"cpu:gloo,cuda:nccl")
        return {kind: text for kind in CARRIES[text]}
    mapping: dict[str, str] = {}
    for entry in text.split(","):
        kind, sep, backend = (part.strip() for part in entry.partition(":"))
        if not sep or ":" in backend or not kind or not backend:
            raise ConfigError(f"{flag}: {entry.strip()!r} is not DEVICE:BACKEND "
                              f"(e.g. cpu:gloo,cuda:nccl)")
        if kind not in BACKENDS:
            raise ConfigError(f"{flag}: unknown device type {kind!r} (expected one of "
                              f"{', '.join(BACKENDS)})")
        if backend not in CARRIES:
            raise ConfigError(f"{flag}: unknown backend {backend!r} (expected one of {names})")
        if kind not in CARRIES[backend]:
            raise ConfigError(f"{flag}: {backend} cannot carry {kind} tensors (it carries "
                              f"{', '.join(CARRIES[backend])})")
        if kind in mapping:
            raise ConfigError(f"{flag}: device type {kind!r} given twice")
        mapping[kind] = backend
    if "cpu" not in mapping:
        raise ConfigError(f"{flag}: the map needs a cpu entry (cpu:gloo): host-side flags, "
                          f"object collectives and barriers travel on it")
    return mapping


def check_backend(requested: str | None) -> None:
    """ConfigError unless `requested` is a valid --distributed-backend value on some device."""
    if requested is not None:
        _backend_map(requested)


def distributed_backend(requested: str | None = None, kind: str | None = None) -> str:
    """The backend string every init_process_group of ours gets: a per-device map, cpu first,
    so host tensors (loss and exit flags, checkpoint votes, pickled objects, barriers) travel over
    gloo and tensors on the device (`kind`, default this process's) over the device's backend.
    None means the device's (`cpu:gloo`, `cpu:gloo,cuda:nccl`, `cpu:gloo,npu:hccl`); a backend
    name is the device's entry (`nccl` -> `cpu:gloo,cuda:nccl`); a map passes through, checked.
    Groups from dist.new_group(ranks) inherit the map. ConfigError if it cannot carry `kind`."""
    kind = kind or device_type()
    if requested is None:
        mapping = {"cpu": "gloo", kind: BACKENDS[kind]}
    elif ":" not in requested:
        _backend_map(requested)
        name = requested.strip().lower()
        if kind not in CARRIES[name]:
            raise ConfigError(f"--distributed-backend {requested!r} cannot carry {kind} tensors "
                              f"and this process runs on {kind}: use {BACKENDS[kind]} (or leave "
                              f"the flag out)")
        mapping = {"cpu": "gloo", kind: name}
    else:
        mapping = _backend_map(requested)
        if kind not in mapping:
            raise ConfigError(f"--distributed-backend {requested!r} has no entry for {kind}, the "
                              f"device this process runs on (add {kind}:{BACKENDS[kind]})")
        unused = [other for other in mapping if other not in ("cpu", kind)]
        if unused:
            raise ConfigError(f"--distributed-backend {requested!r} has an entry for "
                              f"{unused[0]}, which this process does not use (it runs on {kind})")
    ordered = {"cpu": mapping.pop("cpu"), **mapping}
    return ",".join(f"{device}:{backend}" for device, backend in ordered.items())


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
