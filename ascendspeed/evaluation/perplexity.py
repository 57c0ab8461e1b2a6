"""Loss and perplexity of a checkpoint over a token stream.

The stream (a Megatron dataset's documents in order, or a JSON-lines file tokenized as
preprocessing would) is cut into non-overlapping windows as GPTDataset cuts samples: window i is
tokens [i*s, (i+1)*s] (s + 1 tokens, the last one shared with the next window), inputs its first s
tokens and labels its last s. A final shorter window keeps the tail, so every token but the first
is predicted exactly once. The loss is the mean token cross entropy over all predicted tokens:
the trainer's validation loss (the mean of full windows' mean losses is the same number).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ascendspeed.evaluation.scoring import Scorer


@dataclass(frozen=True)
class PerplexityResult:
    loss: float  # mean cross entropy per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int

    @property
    def ppl(self) -> float:
        return math.exp(min(20.0, self.loss))  # Megatron's validation PPL (capped at e^20)


def windows(stream: np.ndarray, seq_length: int,
            max_windows: int | None = None) -> Iterator[np.ndarray]:
    """Windows of s + 1 tokens with stride s (the last may be shorter; none under 2 tokens)."""
    count = 0
    for start in range(0, max(len(stream) - 1, 0), seq_length):
        if max_windows is not None and count >= max_windows:
            return
        yield stream[start:start + seq_length + 1]
        count += 1


def evaluate_perplexity(scorer: Scorer, stream: np.ndarray, seq_length: int,
                        max_windows: int | None = None,
                        progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Mean token loss of the model over the stream's windows; `progress(windows, tokens)` after
    each batch."""
    if len(stream) < 2:
        raise ValueError(f"the token stream has {len(stream)} token(s): nothing to predict")
    total, tokens, count = 0.0, 0, 0
    batch: list[list[int]] = []

    def flush() -> None:
        nonlocal total, tokens, count
        for scores in scorer.score(batch, [len(w) - 1 for w in batch]):
            total -= math.fsum(scores.logprobs)
            tokens += len(scores.logprobs)
        count += len(batch)
        batch.clear()
        if progress is not None:
            progress(count, tokens)

    for window in windows(stream, seq_length, max_windows):
        batch.append(window.tolist())
        if len(batch) == scorer.batch_size:
            flush()
    if batch:
        flush()
    return PerplexityResult(loss=total / tokens, tokens=tokens, windows=count)
