"""The generation loop over this rank's pipeline stage, under tensor and pipeline parallelism.

A batch of prompts is left-padded to one length with an attention mask (ALiBi positions count
from each prompt's first real token, so padding changes nothing). The prefill runs the whole
prompts once, filling each stage's InferenceCache; every later step feeds one token per sequence.
Each step: the first stage embeds, stages pass hidden states on with the training p2p, the last
stage gathers the vocab-parallel logits of the last position over TP and samples; the chosen
tokens are broadcast from there to every rank, so every rank keeps the same token lists and
decides the same stops (EOS, stop strings, lengths) without further messages.

`generate_tokens` works on token ids (what a server needs); `generate_text` adds the tokenizer:
prompts as text, stop strings, and streaming of the new text of each step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ascendspeed import device
from ascendspeed.core import parallel_state as ps
from ascendspeed.core.pipeline_parallel import p2p_communication as p2p
from ascendspeed.core.tensor_parallel import gather_from_tensor_model_parallel_region
from ascendspeed.errors import PromptError
from ascendspeed.generation.sampling import SamplingParams, sample
from ascendspeed.model.bloom import BloomModel, InferenceCache


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated; an EOS is not included
    logprobs: list[float] | None = None  # log p of each generated token (raw logits, no temperature)
    finish_reason: str | None = None  # "eos" | "stop" | "length"
    text: str | None = None  # generate_text: the continuation (cut before a stop string)


class StageRunner:
    """Runs this rank's stage (a BloomModel built with pre/post_process for its pipeline rank):
    `runner(ids, mask, cache)` -> fp32 logits [b, V] of the last position over the real
    vocabulary (padding rows -inf) on the last stage, None on the others."""

    def __init__(self, model: BloomModel, vocab_size: int):
        self.model = model.eval()
        self.vocab_size = vocab_size  # the tokenizer's: padded rows must never be chosen

    @torch.no_grad()  # (not inference_mode: callers may still modify the logits in place)
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 cache: InferenceCache | None) -> torch.Tensor | None:
        model, config = self.model, self.model.config
        shape = (*input_ids.shape, config.hidden_size)
        hidden = p2p.recv_forward(shape, config.params_dtype, requires_grad=False)
        out = model(input_ids, attention_mask=attention_mask, hidden_states=hidden, cache=cache,
                    last_only=True)  # the head for the last position only
        if not model.post_process:
            p2p.send_forward(out, shape, config.params_dtype)
            return None
        logits = gather_from_tensor_model_parallel_region(out[:, -1].contiguous()).float()
        logits[:, self.vocab_size:] = float("-inf")
        return logits


def broadcast_from_last_stage(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as the last stage's TP rank 0 holds it, on every rank (in place)."""
    if not dist.is_initialized():
        return tensor
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_world_size() > 1:
        dist.broadcast(tensor, src=ps.get_tensor_model_parallel_src_rank(),
                       group=ps.get_tensor_model_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        group = ps.get_pipeline_model_parallel_group()
        dist.broadcast(tensor, src=dist.get_process_group_ranks(group)[-1], group=group)
    return tensor


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, on) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [b, longest] left-padded with pad_id, and the mask (1 = real token)."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=on)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long, device=on)
    for i, prompt in enumerate(prompts):
        if prompt:
            ids[i, longest - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[i, longest - len(prompt):] = 1
    return ids, mask


def generate_tokens(runner: StageRunner, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int | Sequence[int], sampling: SamplingParams,
                    eod: int | None = None, context_length: int | None = None,
                    recompute: bool = False, return_logprobs: bool = False,
                    should_stop: Callable[[int, Generation], bool] | None = None,
                    on_step: Callable[[list[Generation], list[int | None]], None] | None = None,
                    pad_id: int = 0) -> list[Generation]:
    """Generate for every prompt (every rank calls this with the same arguments).

    A sequence stops at `eod` (not included), when `should_stop(i, generation)` says so after a
    token, after its max new tokens, or when prompt + generated reach `context_length`.
    `on_step(generations, new)` follows every step (new[i]: the token appended to sequence i,
    or None). `recompute` runs the whole sequence for every token instead of keeping a cache."""
    if not prompts:
        return []
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise PromptError(f"prompt {i} has no tokens")
        if context_length is not None and len(prompt) >= context_length:
            raise PromptError(f"prompt {i} has {len(prompt)} tokens; the context is "
                              f"{context_length} tokens (--seq-length), leaving none to generate")
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) \
        else list(max_new_tokens)
    if context_length is not None:
        budgets = [min(n, context_length - len(p)) for n, p in zip(budgets, prompts)]
    on = device.current_device()
    ids, mask = left_pad(prompts, pad_id, on)
    results = [Generation(list(p), logprobs=[] if return_logprobs else None) for p in prompts]
    for result, budget in zip(results, budgets):
        if budget <= 0:
            result.finish_reason = "length"
    generator = None
    if not sampling.is_greedy:
        generator = torch.Generator(device=on).manual_seed(sampling.seed)
    # The longest the batch can get: the cache and the mask are allocated once for it.
    longest = ids.shape[1] + max(0, *budgets)
    cache = None if recompute else InferenceCache(capacity=longest)
    full_mask = torch.ones(len(prompts), longest, dtype=mask.dtype, device=on)
    full_mask[:, :ids.shape[1]] = mask
    full_ids = torch.empty(len(prompts), longest, dtype=ids.dtype, device=on) if recompute else None
    if recompute:
        full_ids[:, :ids.shape[1]] = ids
    length = ids.shape[1]  # tokens in the sequences so far (left padding included)
    step_input = ids
    while any(r.finish_reason is None for r in results):
        mask = full_mask[:, :length]
        logits = runner(full_ids[:, :length] if recompute else step_input, mask, cache)
        chosen = torch.zeros(len(prompts), dtype=torch.long, device=on)
        logprobs = torch.zeros(len(prompts), dtype=torch.float32, device=on)
        if logits is not None:
            chosen = sample(logits, sampling, generator)
            if return_logprobs:
                logprobs = F.log_softmax(logits, dim=-1).gather(1, chosen[:, None]).view(-1)
        broadcast_from_last_stage(chosen)
        if return_logprobs:
            broadcast_from_last_stage(logprobs)
        new: list[int | None] = [None] * len(prompts)
        tokens, token_logprobs = chosen.tolist(), logprobs.tolist()  # one device sync per step
        for i, result in enumerate(results):
            if result.finish_reason is not None:
                continue
            token = tokens[i]
            if eod is not None and token == eod:
                result.finish_reason = "eos"
                continue
            result.token_ids.append(token)
            if return_logprobs:
                result.logprobs.append(token_logprobs[i])
            new[i] = token
            if should_stop is not None and should_stop(i, result):
                result.finish_reason = "stop"
            elif len(result.token_ids) >= budgets[i]:
                result.finish_reason = "length"
        if on_step is not None:
            on_step(results, new)
        if all(r.finish_reason is not None for r in results):
            break
        step_input = chosen[:, None]
        if recompute:
            full_ids[:, length] = chosen
        length += 1
    return results


class _TextStreamer:
    """New text per sequence and step: what the detokenized continuation gained, holding back an
    incomplete UTF-8 character and a tail that may be the start of a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str], emit: Callable[[int, str], None]):
        self.tokenizer, self.stop, self.emit = tokenizer, stop, emit
        self.sent: dict[int, int] = {}

    def _safe_end(self, text: str) -> int:
        end = len(text)
        if text.endswith("\ufffd"):
            end -= 1
        for s in self.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[:end].endswith(s[:k]):
                    end -= k
                    break
        return end

    def step(self, results: list[Generation], new: list[int | None]) -> None:
        for i, token in enumerate(new):
            if token is None or results[i].finish_reason is not None:
                continue
            text = self.tokenizer.detokenize(results[i].token_ids)
            end = self._safe_end(text)
            if end > self.sent.get(i, 0):
                self.emit(i, text[self.sent.get(i, 0):end])
                self.sent[i] = end

    def finish(self, results: list[Generation]) -> None:
        for i, result in enumerate(results):
            rest = result.text[self.sent.get(i, 0):]
            if rest:
                self.emit(i, rest)


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def generate_text(runner: StageRunner, tokenizer, prompts: Sequence[str], *,
                  max_new_tokens: int, sampling: SamplingParams,
                  context_length: int | None = None, stop: Sequence[str] = (),
                  recompute: bool = False, return_logprobs: bool = False,
                  stream: Callable[[int, str], None] | None = None) -> list[Generation]:
    """generate_tokens for text prompts; each Generation's `text` is the continuation, cut before
    the first stop string. `stream(i, new_text)` receives the continuation of prompt i piece by
    piece as it is generated (the pieces add up to `text`)."""
    prompt_ids = tokenizer.encode_batch(list(prompts))

    def should_stop(_, result: Generation) -> bool:
        return bool(stop) and _cut_at_stop(tokenizer.detokenize(result.token_ids), stop)[1]

    streamer = _TextStreamer(tokenizer, stop, stream) if stream is not None else None
    pad = tokenizer.pad if tokenizer.pad is not None else (tokenizer.eod or 0)
    results = generate_tokens(runner, prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling,
                              eod=tokenizer.eod, context_length=context_length,
                              recompute=recompute, return_logprobs=return_logprobs,
                              should_stop=should_stop if stop else None,
                              on_step=streamer.step if streamer else None, pad_id=pad)
    for result in results:
        result.text = _cut_at_stop(tokenizer.detokenize(result.token_ids), stop)[0]
    if streamer is not None:
        streamer.finish(results)
    return results
