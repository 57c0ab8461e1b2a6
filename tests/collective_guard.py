"""A strict check on torch.distributed's collectives in test processes.

Every tensor handed to a collective must be on a device type its group's backends carry
(`dist.get_backend_config(group)`: "cpu:gloo", "cpu:gloo,cuda:nccl", ...), or the call raises
CollectiveDeviceError naming the collective, the tensor and the caller's file:line. A group that
maps some device type to a device backend (nccl, hccl) also refuses host tensors over HOST_LIMIT
bytes: gradients, parameters and activations belong on the device, only small flags and pickled
objects may travel over gloo. Object collectives (all_gather_object, ...) are checked through the
tensor collectives they call, on the device torch picks for them.

Installed in the pytest process by tests/conftest.py, and in every process tests/launch.py starts
(torchrun workers, scripts, servers) by tests/guard_site/sitecustomize.py, as soon as
torch.distributed is imported there; ASCENDSPEED_COLLECTIVE_GUARD=0 switches it off. On a CPU-only
machine every group is gloo and the check proves the mapping logic; on an accelerator it checks
the device path.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import inspect
import os
import sys
import threading

C10D = "torch.distributed.distributed_c10d"
HOST_LIMIT = 64 * 1024  # bytes: a flag, a loss, a pickled list of names
DEVICE_BACKENDS = ("nccl", "hccl")

TENSOR_COLLECTIVES = (
    "broadcast", "all_reduce", "all_reduce_coalesced", "reduce", "all_gather",
    "all_gather_single", "all_gather_into_tensor", "_all_gather_base", "all_gather_coalesced",
    "gather", "scatter", "reduce_scatter", "reduce_scatter_single", "reduce_scatter_tensor",
    "_reduce_scatter_base", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv",
    "batch_isend_irecv", "barrier")
OBJECT_COLLECTIVES = ("all_gather_object", "gather_object", "broadcast_object_list",
                      "scatter_object_list", "send_object_list", "recv_object_list")

_GUARD_FILE = os.path.abspath(__file__)
_outer = threading.local()  # the collective the caller called (object collectives nest)


class CollectiveDeviceError(BaseException):
    """A collective got a tensor its group cannot carry. A BaseException, so that no product
    `except Exception` (a server's request handler, say) turns it into a logged failure."""


def carried_devices(config: str) -> dict[str, str]:
    """{device type: backend} of a backend config string ("cpu:gloo, cuda:nccl")."""
    mapping = {}
    for entry in config.split(","):
        kind, _, backend = entry.strip().partition(":")
        if kind and backend:
            mapping[kind.strip().lower()] = backend.strip().lower()
    return mapping


def check_tensors(name: str, tensors, config: str, caller: str) -> None:
    """Raise CollectiveDeviceError unless every tensor of collective `name` fits `config`."""
    mapping = carried_devices(config)
    on_device = any(backend in DEVICE_BACKENDS for backend in mapping.values())
    for tensor in tensors:
        kind = tensor.device.type
        what = f"a {kind} tensor {tuple(tensor.shape)} {str(tensor.dtype).replace('torch.', '')}"
        if kind not in mapping:
            _fail(f"{name} got {what}, which its group (backends {config}) cannot carry, "
                  f"at {caller}")
        nbytes = tensor.numel() * tensor.element_size()
        if on_device and kind == "cpu" and nbytes > HOST_LIMIT:
            _fail(f"{name} got {what} of {nbytes} bytes on the host while its group (backends "
                  f"{config}) has a device backend: it would travel over {mapping[kind]}, at "
                  f"{caller}")


def _fail(message: str) -> None:
    print(f"collective guard: {message}", file=sys.stderr, flush=True)
    raise CollectiveDeviceError(message)


def _caller() -> str:
    """file:line of the innermost frame outside torch.distributed and this module."""
    c10d = sys.modules[C10D]
    torch_distributed = os.path.dirname(os.path.abspath(c10d.__file__))
    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != _GUARD_FILE and not path.startswith(torch_distributed + os.sep):
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"


def _tensors(value):
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _check(name: str, signature: inspect.Signature, args, kwargs) -> None:
    c10d = sys.modules[C10D]
    if not c10d.is_initialized():
        return  # torch's own error follows
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return  # torch's own error follows
    outer = getattr(_outer, "name", None)
    label = name if outer in (None, name) else f"{outer} (its {name})"
    if name == "batch_isend_irecv":
        pairs = [(op.group, [op.tensor]) for op in bound.arguments.get("p2p_op_list", [])]
    elif name == "barrier":  # no tensor: torch picks cpu when the group carries it
        if bound.arguments.get("device_ids"):  # ... unless told the accelerator's devices
            import torch

            kind = torch._C._get_accelerator().type
            group = bound.arguments.get("group") or c10d._get_default_group()
            config = c10d.get_backend_config(group)
            if kind not in carried_devices(config):
                _fail(f"{label} on {kind} devices, which its group (backends {config}) cannot "
                      f"carry, at {_caller()}")
        return
    else:
        tensors = [t for key, value in bound.arguments.items() if key != "group"
                   for t in _tensors(value)]
        pairs = [(bound.arguments.get("group"), tensors)]
    for group, tensors in pairs:
        group = group if group is not None else c10d._get_default_group()
        if c10d._rank_not_in_group(group):
            continue  # torch skips the call on a rank outside the group
        check_tensors(label, tensors, c10d.get_backend_config(group), _caller())


def _wrap(name: str, function, checked: bool):
    signature = inspect.signature(function)

    @functools.wraps(function)
    def guarded(*args, **kwargs):
        outermost = getattr(_outer, "name", None) is None
        if outermost:
            _outer.name = name
        try:
            if checked:
                _check(name, signature, args, kwargs)
            return function(*args, **kwargs)
        finally:
            if outermost:
                _outer.name = None

    guarded.__wrapped_by_collective_guard__ = function
    return guarded


def _patch(c10d) -> None:
    public = sys.modules.get("torch.distributed")
    for names, checked in ((TENSOR_COLLECTIVES, True), (OBJECT_COLLECTIVES, False)):
        for name in names:
            function = getattr(c10d, name, None)
            if function is None or hasattr(function, "__wrapped_by_collective_guard__"):
                continue
            guarded = _wrap(name, function, checked)
            setattr(c10d, name, guarded)  # torch's own calls (object collectives) see it too
            if public is not None and getattr(public, name, None) is function:
                setattr(public, name, guarded)


def uninstall() -> None:
    """Put torch's own functions back (for the guard's own tests)."""
    c10d = sys.modules.get(C10D)
    if c10d is None:
        return
    public = sys.modules.get("torch.distributed")
    for name in TENSOR_COLLECTIVES + OBJECT_COLLECTIVES:
        guarded = getattr(c10d, name, None)
        original = getattr(guarded, "__wrapped_by_collective_guard__", None)
        if original is None:
            continue
        setattr(c10d, name, original)
        if public is not None and getattr(public, name, None) is guarded:
            setattr(public, name, original)


def installed() -> bool:
    c10d = sys.modules.get(C10D)
    return c10d is not None and hasattr(c10d.all_reduce, "__wrapped_by_collective_guard__")


class _Finder(importlib.abc.MetaPathFinder):
    """Patches torch.distributed.distributed_c10d right after it executes, before
    torch.distributed copies its names (and before any module captures one)."""

    def find_spec(self, name, path, target=None):
        if name != C10D:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Guard torch.distributed now if it is imported, else as soon as it is."""
    if os.environ.get("ASCENDSPEED_COLLECTIVE_GUARD") == "0":
        return
    if C10D in sys.modules:
        _patch(sys.modules[C10D])
    elif not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
