"""Per-token log-probabilities of a loaded checkpoint, under tensor and pipeline parallelism.

Everything evaluation computes (perplexity, zero-shot accuracy, the lm-evaluation-harness
adapter) reduces to one question: for a token sequence, what is log p(token t | tokens < t) for
the last few positions, and is each token the model's greedy choice? `Scorer.score` answers it
for a list of sequences, batched.

The log-probability is minus the trainer's per-token loss (vocab-parallel cross entropy over the
checkpoint's padded vocabulary, in fp32): the same definition as the validation loss, as Megatron's
zero-shot tasks, and as Hugging Face's BLOOM, whose vocabulary is the padded one (250880). A batch
is right-padded: attention is causal, so padding after a sequence never changes its scores and
needs no mask. Every rank calls `score` with the same sequences; the last pipeline stage computes
and the results are broadcast, so every rank returns the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from ascendspeed import device
from ascendspeed.core import parallel_state as ps
from ascendspeed.core.pipeline_parallel import p2p_communication as p2p
from ascendspeed.core.tensor_parallel import vocab_parallel_cross_entropy
from ascendspeed.generation.generate import broadcast_from_last_stage
from ascendspeed.model.bloom import BloomModel


@dataclass(frozen=True)
class TokenScores:
    """The scored (last n) positions of one sequence."""
    logprobs: list[float]  # log p(token) for each scored token
    greedy: list[bool]  # whether each scored token is the argmax of its distribution

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))

    @property
    def all_greedy(self) -> bool:
        return all(self.greedy)


def vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Global argmax ids [..] of vocab-parallel logits [.., V/TP]; ties go to the lowest id, as
    torch.argmax over the whole vocabulary."""
    values, local = logits.max(dim=-1)
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return local
    ids = local + ps.get_tensor_model_parallel_rank() * logits.shape[-1]
    group = ps.get_tensor_model_parallel_group()
    all_values = [torch.empty_like(values) for _ in range(tp)]
    all_ids = [torch.empty_like(ids) for _ in range(tp)]
    dist.all_gather(all_values, values.contiguous(), group=group)
    dist.all_gather(all_ids, ids.contiguous(), group=group)
    best = torch.stack(all_values).argmax(dim=0, keepdim=True)  # first rank holding the maximum
    return torch.stack(all_ids).gather(0, best)[0]


class Scorer:
    """Scores token sequences with this rank's stage (a BloomModel built for its pipeline rank,
    e.g. by ascendspeed.generation.loading.load_stage)."""

    def __init__(self, model: BloomModel, batch_size: int = 8, max_length: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.batch_size = batch_size
        self.max_length = max_length  # tokens a forward may take (the checkpoint's --seq-length)

    @torch.no_grad()
    def _forward(self, inputs: torch.Tensor, labels: torch.Tensor):
        """(logprobs, greedy) [b, s] on every rank for one right-padded batch."""
        model, config = self.model, self.model.config
        shape = (*inputs.shape, config.hidden_size)
        hidden = p2p.recv_forward(shape, config.params_dtype, requires_grad=False)
        out = model(inputs, hidden_states=hidden)
        logprobs = torch.zeros(inputs.shape, dtype=torch.float32, device=inputs.device)
        greedy = torch.zeros(inputs.shape, dtype=torch.long, device=inputs.device)
        if model.post_process:
            logits = out.float()
            greedy = (vocab_parallel_argmax(logits) == labels).long()
            logprobs = -vocab_parallel_cross_entropy(logits, labels)  # the trainer's loss
        else:
            p2p.send_forward(out, shape, config.params_dtype)
        return broadcast_from_last_stage(logprobs), broadcast_from_last_stage(greedy)

    def score(self, sequences: Sequence[Sequence[int]],
              scored: Sequence[int]) -> list[TokenScores]:
        """For each token sequence and count n: the scores of its last n tokens (each predicted
        from all tokens before it; 1 <= n < len(sequence))."""
        if len(sequences) != len(scored):
            raise ValueError("one scored-token count per sequence")
        for i, (tokens, n) in enumerate(zip(sequences, scored)):
            if not 1 <= n < len(tokens):
                raise ValueError(f"sequence {i}: cannot score its last {n} of {len(tokens)} tokens")
            if self.max_length is not None and len(tokens) - 1 > self.max_length:
                raise ValueError(f"sequence {i}: {len(tokens) - 1} input tokens, more than the "
                                 f"{self.max_length} the model takes")
        # Longest first: similar lengths share a batch, and an out-of-memory shows at once.
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        results: list[TokenScores | None] = [None] * len(sequences)
        on = device.current_device()
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = len(sequences[batch[0]]) - 1
            inputs = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                tokens = torch.as_tensor(list(sequences[i]), dtype=torch.long)
                inputs[row, :len(tokens) - 1] = tokens[:-1]
                labels[row, :len(tokens) - 1] = tokens[1:]
            logprobs, greedy = self._forward(inputs.to(on), labels.to(on))
            logprobs, greedy = logprobs.cpu(), greedy.cpu()
            for row, i in enumerate(batch):
                end = len(sequences[i]) - 1
                results[i] = TokenScores(logprobs[row, end - scored[i]:end].tolist(),
                                         [bool(g) for g in greedy[row, end - scored[i]:end]])
        return results
