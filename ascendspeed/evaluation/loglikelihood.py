"""lm-evaluation-harness's request semantics on our Scorer, shared by the zero-shot tasks and the
lm_eval adapter, so both give the answers the harness gives with its Hugging Face model (HFLM):

- loglikelihood(context, continuation): the pair is tokenized as HFLM does (trailing spaces of the
  context move to the continuation; the continuation's tokens are those of context + continuation
  after the context's, so merges across the boundary count as HF's would); an empty context is the
  EOD token; the sequence is left-truncated to max_length + 1 tokens. Result: (sum of the
  continuation's log-probabilities, whether every token is the greedy choice).
- loglikelihood_rolling(text): the whole text's log-likelihood in disjoint windows of max_length
  predicted tokens, the first conditioned on EOD (the harness's get_rolling_token_windows with
  context_len 1).
"""
from __future__ import annotations

from typing import Sequence

from ascendspeed.evaluation.scoring import Scorer


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm_eval's HFLM._encode_pair."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole = tokenizer.tokenize(context + continuation)
    context_ids = tokenizer.tokenize(context)
    return context_ids, whole[len(context_ids):]


def _prefix_token(tokenizer) -> int:
    if tokenizer.eod is None:
        raise ValueError("the tokenizer has no end-of-document token to condition an empty "
                         "context (or a text's first token) on")
    return tokenizer.eod


def loglikelihood_tokens(scorer: Scorer, pairs: Sequence[tuple[list[int], list[int]]],
                         max_length: int) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), all greedy) per (context ids, continuation ids)."""
    sequences, scored = [], []
    for i, (context, continuation) in enumerate(pairs):
        if not continuation:
            raise ValueError(f"request {i}: the continuation has no tokens")
        if not context:
            raise ValueError(f"request {i}: the context has no tokens")
        sequence = (list(context) + list(continuation))[-(max_length + 1):]
        sequences.append(sequence)
        scored.append(min(len(continuation), len(sequence) - 1))
    return [(scores.total, scores.all_greedy) for scores in scorer.score(sequences, scored)]


def loglikelihood(scorer: Scorer, tokenizer, requests: Sequence[tuple[str, str]],
                  max_length: int) -> list[tuple[float, bool]]:
    pairs = []
    for context, continuation in requests:
        if context == "":
            pairs.append(([_prefix_token(tokenizer)], tokenizer.tokenize(continuation)))
        else:
            pairs.append(encode_pair(tokenizer, context, continuation))
    return loglikelihood_tokens(scorer, pairs, max_length)


def rolling_windows(tokens: list[int], prefix: int,
                    max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint (context, predicted) windows covering every token once (lm_eval's
    get_rolling_token_windows(context_len=1) + make_disjoint_window)."""
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    out = [([prefix], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        length = min(len(tokens) - predicted, max_length)
        end = predicted + length
        out.append((tokens[end - max_length - 1:end - length], tokens[end - length:end]))
        predicted += length
    return out


def loglikelihood_rolling(scorer: Scorer, tokenizer, texts: Sequence[str],
                          max_length: int) -> list[float]:
    prefix = _prefix_token(tokenizer)
    windows, owner = [], []
    for i, text in enumerate(texts):
        for window in rolling_windows(tokenizer.tokenize(text), prefix, max_length):
            windows.append(window)
            owner.append(i)
    totals = [0.0] * len(texts)
    for i, (total, _) in zip(owner, loglikelihood_tokens(scorer, windows, max_length)):
        totals[i] += total
    return totals
