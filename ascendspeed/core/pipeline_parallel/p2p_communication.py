"""Point-to-point exchange of activations (forward) and their gradients (backward) between
adjacent pipeline stages, as Megatron-LM's p2p_communication.

Every call posts all its sends and receives in one `torch.distributed.batch_isend_irecv` and
waits for all of them, so the paired calls of 1F1B (send_forward_recv_backward on one stage,
send_backward_recv_forward on the next) cannot deadlock. Activations travel with tag 1 and
gradients with tag 2, and the ops are posted sends-forward-first: with two stages `prev` and
`next` are the same peer, and the interleaved schedule sends both ways to it at once, so the
messages must not be matched to the wrong receive.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from ascendspeed import device
from ascendspeed.core import parallel_state as ps

_FORWARD_TAG, _BACKWARD_TAG = 1, 2


def _empty(shape: Sequence[int], dtype: torch.dtype, requires_grad: bool) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device=device.current_device(),
                       requires_grad=requires_grad)


def communicate(tensor_send_next: torch.Tensor | None, tensor_send_prev: torch.Tensor | None,
                recv_prev: bool, recv_next: bool, tensor_shape: Sequence[int],
                dtype: torch.dtype, requires_grad: bool = True
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Send to / receive from the neighbouring stages; returns (from prev, from next). The
    tensor received from prev is an activation and gets requires_grad (backward will need its
    gradient) unless `requires_grad` is False (forward-only)."""
    group = ps.get_pipeline_model_parallel_group()
    tensor_recv_prev = _empty(tensor_shape, dtype, requires_grad) if recv_prev else None
    tensor_recv_next = _empty(tensor_shape, dtype, False) if recv_next else None
    next_rank = ps.get_pipeline_model_parallel_next_rank()
    prev_rank = ps.get_pipeline_model_parallel_prev_rank()
    sends = ((tensor_send_next, next_rank, _FORWARD_TAG), (tensor_send_prev, prev_rank, _BACKWARD_TAG))
    receives = ((tensor_recv_prev, prev_rank, _FORWARD_TAG), (tensor_recv_next, next_rank, _BACKWARD_TAG))
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), peer, group, tag)
           for tensor, peer, tag in sends if tensor is not None]
    ops += [dist.P2POp(dist.irecv, tensor, peer, group, tag)
            for tensor, peer, tag in receives if tensor is not None]
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    return tensor_recv_prev, tensor_recv_next


# The non-interleaved schedule's calls: a stage without a neighbour on that side does nothing.
def recv_forward(tensor_shape, dtype, requires_grad: bool = True) -> torch.Tensor | None:
    if ps.is_pipeline_first_stage():
        return None
    return communicate(None, None, True, False, tensor_shape, dtype, requires_grad)[0]


def recv_backward(tensor_shape, dtype) -> torch.Tensor | None:
    if ps.is_pipeline_last_stage():
        return None
    return communicate(None, None, False, True, tensor_shape, dtype)[1]


def send_forward(output_tensor: torch.Tensor, tensor_shape, dtype) -> None:
    if not ps.is_pipeline_last_stage():
        communicate(output_tensor, None, False, False, tensor_shape, dtype)


def send_backward(input_tensor_grad: torch.Tensor, tensor_shape, dtype) -> None:
    if not ps.is_pipeline_first_stage():
        communicate(None, input_tensor_grad, False, False, tensor_shape, dtype)


def send_forward_recv_backward(output_tensor: torch.Tensor, tensor_shape,
                               dtype) -> torch.Tensor | None:
    if ps.is_pipeline_last_stage():
        return None
    return communicate(output_tensor, None, False, True, tensor_shape, dtype)[1]


def send_backward_recv_forward(input_tensor_grad: torch.Tensor, tensor_shape,
                               dtype) -> torch.Tensor | None:
    if ps.is_pipeline_first_stage():
        return None
    return communicate(None, input_tensor_grad, True, False, tensor_shape, dtype)[0]


# The interleaved schedule's calls: the schedule decides who sends and receives (None / flags).
def send_forward_recv_forward(output_tensor, recv_prev: bool, tensor_shape, dtype,
                              requires_grad: bool = True) -> torch.Tensor | None:
    return communicate(output_tensor, None, recv_prev, False, tensor_shape, dtype,
                       requires_grad)[0]


def send_backward_recv_backward(input_tensor_grad, recv_next: bool, tensor_shape,
                                dtype) -> torch.Tensor | None:
    return communicate(None, input_tensor_grad, False, recv_next, tensor_shape, dtype)[1]


def send_forward_backward_recv_forward_backward(output_tensor, input_tensor_grad,
                                                recv_prev: bool, recv_next: bool,
                                                tensor_shape, dtype):
    return communicate(output_tensor, input_tensor_grad, recv_prev, recv_next, tensor_shape, dtype)
