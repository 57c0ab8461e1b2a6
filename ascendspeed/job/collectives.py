"""Which collective failed: one error line instead of gloo's transport message.

With --distributed-timeout-minutes every collective of ours gives up when a peer does not
answer, but gloo says only what its transport saw ("Timed out waiting 6000ms for recv operation
to complete", "Connection reset by peer"), not which collective was waiting. `named_failures`
turns such an error, raised anywhere in its block, into a TrainingError naming the collective,
its group and our line that called it, all read from the error's traceback. `any_rank` and
`every_rank` are the small host-side votes the ranks use to stop together.
"""
from __future__ import annotations

import contextlib
import os
import re
import traceback

import torch
import torch.distributed as dist

from ascendspeed.core import parallel_state as ps
from ascendspeed.errors import AscendSpeedError, TrainingError

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../ascendspeed
_C10D = os.path.join("torch", "distributed", "distributed_c10d.py")
# What gloo, NCCL and the store say when a peer is gone or silent (DistError covers the rest).
_TRANSPORT_WORDS = ("timed out", "timeout", "connection", "closed", "reset by peer", "broken pipe")


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any (a collective; `flag` itself with one process)."""
    if not dist.is_initialized():
        return flag
    tensor = torch.tensor([float(flag)])  # on the host: the default group's cpu:gloo entry
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def every_rank(value) -> list:
    """Each rank's (picklable) `value`, in rank order, on every rank (a collective; [value]
    with one process): how the ranks tell each other why they stopped."""
    if not dist.is_initialized():
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


@contextlib.contextmanager
def named_failures(timeout_minutes: float, when):
    """Re-raise a failed torch.distributed call of ours as TrainingError; `when` (a string, or
    a callable giving one, e.g. "after iteration 4") says where the run was."""
    try:
        yield
    except RuntimeError as error:
        if isinstance(error, AscendSpeedError):
            raise
        collective = failed_collective(error)
        if collective is None:
            raise
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        message = re.sub(r"^\[[^\]]*\]\s*", "", first_line)  # less gloo's [file:line]
        raise TrainingError(f"rank {rank}: {collective} failed {when() if callable(when) else when}: "
                            f"{message} (a peer stopped, hung or died; each collective waits at "
                            f"most --distributed-timeout-minutes {timeout_minutes:g})") from error


def failed_collective(error: BaseException) -> str | None:
    """E.g. 'all_reduce over the tensor-parallel group (ascendspeed/core/tensor_parallel/
    mappings.py:18)' when `error` is a communication failure inside a torch.distributed call
    (or the wait for an asynchronous one) made by our code; None for anything else."""
    if not (isinstance(error, dist.DistError)
            or any(word in str(error).lower() for word in _TRANSPORT_WORDS)):
        return None
    frames = list(traceback.walk_tb(error.__traceback__))  # (frame, line), outermost first
    ours = [i for i, (frame, _) in enumerate(frames)
            if frame.f_code.co_filename.startswith(_PACKAGE + os.sep)]
    if not ours:
        return None
    frame, line = frames[ours[-1]]
    where = f"{os.path.relpath(frame.f_code.co_filename, os.path.dirname(_PACKAGE))}:{line}"
    for inner, _ in frames[ours[-1] + 1:]:
        if inner.f_code.co_filename.endswith(_C10D):
            group = _over(inner.f_locals["group"]) if "group" in inner.f_locals else ""
            return f"{inner.f_code.co_name}{group} ({where})"
    innermost = traceback.extract_tb(error.__traceback__)[-1]
    if ours[-1] == len(frames) - 1 and ".wait(" in (innermost.line or ""):  # Work.wait() raised
        return f"the wait for an asynchronous communication in {frame.f_code.co_name} ({where})"
    return None


def _over(group) -> str:
    """' over the tensor-parallel group', ... for one of parallel_state's groups."""
    if group is None or group is dist.GroupMember.WORLD:
        return " over all ranks"
    for name, get in (("tensor-parallel", ps.get_tensor_model_parallel_group),
                      ("pipeline-parallel", ps.get_pipeline_model_parallel_group),
                      ("data-parallel", ps.get_data_parallel_group),
                      ("embedding", ps.get_embedding_group)):
        if group is get():
            return f" over the {name} group"
    return ""
