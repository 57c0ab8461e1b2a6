"""Megatron-LM's forward/backward schedules over the micro-batches of one iteration.

- `forward_backward_no_pipelining`: one stage, plain gradient accumulation;
- `forward_backward_pipelining_without_interleaving`: 1F1B. Stage p runs min(PP - p - 1, m)
  warm-up forwards, then alternates one forward and one backward, then drains the backwards;
- `forward_backward_pipelining_with_interleaving`: each stage holds several model chunks and
  the micro-batches go round the chunks in groups of PP (Megatron's virtual pipeline).

All share one signature (see `ForwardBackwardFunc`). `forward_step(model_chunk, batch,
input_tensor)` returns the chunk's output: hidden states, or on the last stage's last chunk the
micro-batch's mean loss (a scalar). Backward runs on `scale_loss(loss / num_microbatches)`;
nothing here touches the optimizer otherwise. The m micro-batches are drawn from the iterator
up front, the same on every rank, so that the chunks of an interleaved stage each see the
micro-batches in order and every rank's iterator advances alike.

An output sent to the next stage is needed afterwards only for its graph (its backward takes
the gradient the next stage sends back), so once sent its data is freed, as Megatron's
`deallocate_output_tensor` does, and its backward runs through `_run_backward`, which does not
compare the gradient's shape with the freed tensor's.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch.autograd.graph import _engine_run_backward

from ascendspeed.core import parallel_state as ps
from ascendspeed.core.pipeline_parallel import p2p_communication as p2p

ForwardStep = Callable[[torch.nn.Module, Any, "torch.Tensor | None"], torch.Tensor]
ScaleLoss = Callable[[torch.Tensor], torch.Tensor]


class ForwardBackwardFunc(Protocol):
    def __call__(self, forward_step: ForwardStep, data_iterator: Iterator,
                 model_chunks: Sequence[torch.nn.Module], num_microbatches: int,
                 tensor_shape: Sequence[int], dtype: torch.dtype, scale_loss: ScaleLoss,
                 forward_only: bool = False) -> list[float]:
        """Per-micro-batch mean losses on the last stage; [] on the others."""


def get_forward_backward_func(parallel) -> ForwardBackwardFunc:
    """The schedule for a ParallelConfig (Megatron's choice)."""
    if parallel.pipeline_model_parallel_size == 1:
        return forward_backward_no_pipelining
    if parallel.num_layers_per_virtual_pipeline_stage is not None:
        return forward_backward_pipelining_with_interleaving
    return forward_backward_pipelining_without_interleaving


def _forward_step(forward_step: ForwardStep, chunk: torch.nn.Module, batch, input_tensor,
                  num_microbatches: int, is_last: bool, losses: list[torch.Tensor]) -> torch.Tensor:
    output = forward_step(chunk, batch, input_tensor)
    if is_last:
        losses.append(output.detach())
        output = output / num_microbatches
    return output


def deallocate_output_tensor(output_tensor: torch.Tensor | None) -> None:
    """Free the data of an output already sent to the next stage, keeping its graph: its
    backward needs only the gradient that comes back. A view frees nothing (its base holds the
    memory), so it is left alone."""
    if output_tensor is None or output_tensor._base is not None:
        return
    output_tensor.data = torch.empty((1,), device=output_tensor.device, dtype=output_tensor.dtype)


def _run_backward(output_tensor: torch.Tensor, grad: torch.Tensor | None) -> None:
    """torch.autograd.backward(output_tensor, grad) without its check of grad's shape against
    the tensor's (whose data deallocate_output_tensor may have freed): the same engine call,
    which checks grad against the shape its graph recorded."""
    if grad is None:  # a scalar loss: d loss / d loss = 1
        grad = torch.ones_like(output_tensor, memory_format=torch.preserve_format)
    _engine_run_backward((output_tensor,), (grad,), False, False, (), allow_unreachable=True,
                         accumulate_grad=True)


def _backward_step(input_tensor: torch.Tensor | None, output_tensor: torch.Tensor,
                   output_tensor_grad: torch.Tensor | None,
                   scale_loss: ScaleLoss) -> torch.Tensor | None:
    """Backward through one chunk; the gradient of its input, for the previous stage."""
    if output_tensor_grad is None:  # the loss: only its scaling is the optimizer's business
        output_tensor = scale_loss(output_tensor)
    _run_backward(output_tensor, output_tensor_grad)
    return None if input_tensor is None else input_tensor.grad


def _losses(losses: list[torch.Tensor]) -> list[float]:
    return torch.stack(losses).float().tolist() if losses else []


def forward_backward_no_pipelining(forward_step, data_iterator, model_chunks, num_microbatches,
                                   tensor_shape, dtype, scale_loss, forward_only=False):
    assert len(model_chunks) == 1, "no pipelining: one model chunk"
    losses: list[torch.Tensor] = []
    for _ in range(num_microbatches):
        output = _forward_step(forward_step, model_chunks[0], next(data_iterator), None,
                               num_microbatches, True, losses)
        if not forward_only:
            _backward_step(None, output, None, scale_loss)
    return _losses(losses)


def forward_backward_pipelining_without_interleaving(forward_step, data_iterator, model_chunks,
                                                     num_microbatches, tensor_shape, dtype,
                                                     scale_loss, forward_only=False):
    assert len(model_chunks) == 1, "1F1B without interleaving: one model chunk per stage"
    chunk, m = model_chunks[0], num_microbatches
    batches = iter([next(data_iterator) for _ in range(m)])
    is_last = ps.is_pipeline_last_stage()
    needs_grad = not forward_only
    num_warmup = min(ps.get_pipeline_model_parallel_world_size()
                     - ps.get_pipeline_model_parallel_rank() - 1, m)
    num_remaining = m - num_warmup
    input_tensors: list[torch.Tensor | None] = []
    output_tensors: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []

    def forward(input_tensor):
        return _forward_step(forward_step, chunk, next(batches), input_tensor, m, is_last, losses)

    for _ in range(num_warmup):
        input_tensor = p2p.recv_forward(tensor_shape, dtype, needs_grad)
        output_tensor = forward(input_tensor)
        p2p.send_forward(output_tensor, tensor_shape, dtype)
        if not forward_only:
            input_tensors.append(input_tensor)
            output_tensors.append(output_tensor)
            if not is_last:  # sent: only its graph is needed now
                deallocate_output_tensor(output_tensor)

    # Steady state: the next micro-batch's input was received before the loop (or at the end of
    # the previous step, together with sending a gradient back).
    input_tensor = p2p.recv_forward(tensor_shape, dtype, needs_grad) if num_remaining else None
    for i in range(num_remaining):
        last_iteration = i == num_remaining - 1
        output_tensor = forward(input_tensor)
        if forward_only:
            p2p.send_forward(output_tensor, tensor_shape, dtype)
            if not last_iteration:
                input_tensor = p2p.recv_forward(tensor_shape, dtype, needs_grad)
            continue
        output_tensor_grad = p2p.send_forward_recv_backward(output_tensor, tensor_shape, dtype)
        input_tensors.append(input_tensor)
        output_tensors.append(output_tensor)
        if not is_last:
            deallocate_output_tensor(output_tensor)
        input_tensor_grad = _backward_step(input_tensors.pop(0), output_tensors.pop(0),
                                           output_tensor_grad, scale_loss)
        if last_iteration:
            input_tensor = None
            p2p.send_backward(input_tensor_grad, tensor_shape, dtype)
        else:
            input_tensor = p2p.send_backward_recv_forward(input_tensor_grad, tensor_shape, dtype)

    if not forward_only:  # cool-down: the warm-up micro-batches' backwards
        for _ in range(num_warmup):
            output_tensor_grad = p2p.recv_backward(tensor_shape, dtype)
            input_tensor_grad = _backward_step(input_tensors.pop(0), output_tensors.pop(0),
                                               output_tensor_grad, scale_loss)
            p2p.send_backward(input_tensor_grad, tensor_shape, dtype)
    return _losses(losses)


def forward_backward_pipelining_with_interleaving(forward_step, data_iterator, model_chunks,
                                                  num_microbatches, tensor_shape, dtype,
                                                  scale_loss, forward_only=False):
    """Megatron-LM's interleaved 1F1B. Virtual micro-batch k runs on chunk
    (k mod (PP x chunks)) // PP forward, and on the mirror chunk backward."""
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    num_chunks = len(model_chunks)
    if num_microbatches % pp:
        raise ValueError(f"the interleaved schedule needs the number of micro-batches "
                         f"({num_microbatches}) to be a multiple of the pipeline size {pp}")
    batches = [next(data_iterator) for _ in range(num_microbatches)]
    first_stage, last_stage = pp_rank == 0, pp_rank == pp - 1
    needs_grad = not forward_only
    input_tensors: list[list] = [[] for _ in range(num_chunks)]
    output_tensors: list[list] = [[] for _ in range(num_chunks)]
    output_tensor_grads: list[list] = [[] for _ in range(num_chunks)]
    forwards_done = [0] * num_chunks  # micro-batches each chunk has run forward
    losses: list[torch.Tensor] = []

    total = num_microbatches * num_chunks
    all_warmup = False
    if forward_only:
        num_warmup = total
    elif num_microbatches == pp:
        num_warmup, all_warmup = total, True
    else:
        num_warmup = min((pp - pp_rank - 1) * 2 + (num_chunks - 1) * pp, total)
    num_remaining = total - num_warmup

    def chunk_id(k: int, forward: bool) -> int:
        c = (k % (pp * num_chunks)) // pp
        return c if forward else num_chunks - c - 1

    def is_first(c: int) -> bool:  # the whole model's first chunk / last chunk
        return first_stage and c == 0

    def is_last(c: int) -> bool:
        return last_stage and c == num_chunks - 1

    def forward_helper(k: int) -> torch.Tensor:
        c = chunk_id(k, forward=True)
        if is_first(c) and len(input_tensors[c]) == len(output_tensors[c]):
            input_tensors[c].append(None)
        output_tensor = _forward_step(forward_step, model_chunks[c], batches[forwards_done[c]],
                                      input_tensors[c][-1], num_microbatches, is_last(c), losses)
        forwards_done[c] += 1
        output_tensors[c].append(output_tensor)
        if forward_only:
            input_tensors[c].pop()
            output_tensors[c].pop()
        return output_tensor

    def backward_helper(k: int) -> torch.Tensor | None:
        c = chunk_id(k, forward=False)
        if is_last(c) and not output_tensor_grads[c]:
            output_tensor_grads[c].append(None)
        return _backward_step(input_tensors[c].pop(0), output_tensors[c].pop(0),
                              output_tensor_grads[c].pop(0), scale_loss)

    # Warm-up forwards.
    input_tensors[0].append(p2p.recv_forward(tensor_shape, dtype, needs_grad))
    for k in range(num_warmup):
        output_tensor = forward_helper(k)
        next_chunk = chunk_id(k + 1, forward=True)
        recv_prev = not (first_stage and next_chunk == 0) and k != total - 1
        if is_last(chunk_id(k, forward=True)):
            output_tensor = None  # the loss goes nowhere
        if k == num_warmup - 1 and not forward_only and not all_warmup:
            recv_next = not last_stage
            input_tensor, output_tensor_grad = p2p.send_forward_backward_recv_forward_backward(
                output_tensor, None, recv_prev, recv_next, tensor_shape, dtype)
            output_tensor_grads[num_chunks - 1].append(output_tensor_grad)
        else:
            input_tensor = p2p.send_forward_recv_forward(output_tensor, recv_prev, tensor_shape,
                                                         dtype, needs_grad)
        if needs_grad:  # sent (None: the loss, kept): only its graph is needed now
            deallocate_output_tensor(output_tensor)
        input_tensors[next_chunk].append(input_tensor)

    # Steady state: one forward, one backward, one exchange.
    for k in range(num_remaining):
        forward_k, backward_k = k + num_warmup, k
        output_tensor = forward_helper(forward_k)
        input_tensor_grad = backward_helper(backward_k)
        if is_last(chunk_id(forward_k, forward=True)):
            output_tensor = None
        if is_first(chunk_id(backward_k, forward=False)):
            input_tensor_grad = None

        recv_prev = True
        if first_stage:  # the first stage runs PP - 1 micro-batches ahead of the last
            next_forward_chunk = chunk_id(forward_k - (pp - 1), forward=True)
            if next_forward_chunk == num_chunks - 1:
                recv_prev = False
            next_forward_chunk += 1
        else:
            next_forward_chunk = chunk_id(forward_k + 1, forward=True)
        recv_next = True
        if last_stage:  # and the last stage's backwards run PP - 1 ahead of the first's
            next_backward_chunk = chunk_id(backward_k - (pp - 1), forward=False)
            if next_backward_chunk == 0:
                recv_next = False
            next_backward_chunk -= 1
        else:
            next_backward_chunk = chunk_id(backward_k + 1, forward=False)
        if k == num_remaining - 1:  # the last input was received before this loop
            recv_prev = False
        input_tensor, output_tensor_grad = p2p.send_forward_backward_recv_forward_backward(
            output_tensor, input_tensor_grad, recv_prev, recv_next, tensor_shape, dtype)
        deallocate_output_tensor(output_tensor)
        if recv_prev:
            input_tensors[next_forward_chunk].append(input_tensor)
        if recv_next:
            output_tensor_grads[next_backward_chunk].append(output_tensor_grad)

    # Cool-down backwards.
    if not forward_only:
        if all_warmup:
            output_tensor_grads[num_chunks - 1].append(
                p2p.recv_backward(tensor_shape, dtype))
        for k in range(num_remaining, total):
            input_tensor_grad = backward_helper(k)
            next_backward_chunk = chunk_id(k + 1, forward=False)
            recv_next = not (last_stage and next_backward_chunk == num_chunks - 1) and k != total - 1
            if is_first(chunk_id(k, forward=False)):
                input_tensor_grad = None
            output_tensor_grads[next_backward_chunk].append(
                p2p.send_backward_recv_backward(input_tensor_grad, recv_next, tensor_shape, dtype))
    return _losses(losses)
