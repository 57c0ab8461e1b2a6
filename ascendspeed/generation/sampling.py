"""Choosing the next token from full-vocabulary logits, with Megatron's semantics: greedy
(--greedy or top_k = 1) is argmax; otherwise logits / temperature, then top-k or top-p filtering
(one or the other, as Megatron), softmax and one multinomial draw.

Reproducibility: draws come from a `torch.Generator` seeded with --seed, never from the global RNG,
so the same seed gives the same tokens whatever else the process does; every rank that samples
holds the same gathered logits and the same generator, and the generation loop still broadcasts
the chosen tokens from one rank, so all ranks agree bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off; 1: greedy
    top_p: float = 0.0  # 0: off; else in (0, 1]
    seed: int = 1234

    def __post_init__(self):
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (0 = off), got {self.top_p}")
        if not self.is_greedy and not self.temperature > 0.0:
            raise ValueError(f"temperature must be > 0 when sampling (use greedy for argmax), "
                             f"got {self.temperature}")
        if self.top_k > 1 and self.top_p > 0.0:
            raise ValueError(f"top_k and top_p cannot both be set (Megatron samples with one filter): "
                             f"got {self.top_k} and {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.top_k == 1


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """-inf below the k-th largest logit of each row (ties with it are kept)."""
    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering as Megatron: keep the most probable tokens up to and including the one
    whose cumulative probability first exceeds top_p (the shift by one); always the best one."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) > top_p
    drop[..., 1:] = drop[..., :-1].clone()
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row of `logits` [b, V] (fp32, padded vocabulary already -inf)."""
    if params.is_greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k > 1:
        logits = top_k_filter(logits, params.top_k)
    elif params.top_p > 0.0:
        logits = top_p_filter(logits, params.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).view(-1)
