"""lm-evaluation-harness model "ascendspeed": our checkpoints under lm_eval, offline, under TP/PP.

    pip install lm_eval==0.4.13          # optional: not an AscendSpeed dependency (~700 MB of deps)
    torchrun --nproc_per_node 2 -m ascendspeed.evaluation.lm_eval_adapter --model ascendspeed \\
        --model_args load=CKPT,tokenizer_type=PretrainedFromHF,tokenizer_name_or_path=TOK \\
        --tasks my_task --include_path my_tasks/ --batch_size 8

`python -m ascendspeed.evaluation.lm_eval_adapter` is lm_eval's own command line with this model
registered (lm_eval finds third-party models only once their module is imported). From Python:
`import ascendspeed.evaluation.lm_eval_adapter` registers it for `lm_eval.simple_evaluate(
model="ascendspeed", ...)`, or pass an `AscendSpeedLM(...)` instance.

Every rank of a TP x PP launch runs the harness over all requests and reports rank 0 of world
size 1 (the harness's convention for tensor-parallel launchers: only LOCAL_RANK 0 writes
results); the ranks compute each batch together. The methods follow ascendspeed.evaluation.
loglikelihood (the harness's HFLM semantics) and generate with ascendspeed.generation.
Without lm_eval installed the class still works (tests call its methods directly); it is then a
plain class, not registered.
"""
from __future__ import annotations

import argparse
from typing import Any, Sequence

from ascendspeed.errors import CheckpointError
from ascendspeed.evaluation.loglikelihood import loglikelihood, loglikelihood_rolling
from ascendspeed.evaluation.scoring import Scorer

try:  # optional dependency
    from lm_eval.api.model import LM as _Base
except ImportError:  # pragma: no cover - depends on the environment
    _Base = object

MODEL_NAME = "ascendspeed"
_TOKENIZER_KEYS = ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_name_or_path",
                   "tokenizer_model", "vocab_extra_ids")


def _args_of(request) -> tuple:
    """An lm_eval Instance's arguments (plain tuples are accepted too)."""
    return tuple(getattr(request, "args", request))


def _flags(load: str, options: dict[str, Any]) -> argparse.Namespace:
    """pretrain_bloom.py-style flags for the loader, from model_args key=value pairs."""
    from ascendspeed.arguments import parse_args
    from ascendspeed.checkpoint.save_load import checkpoint_args

    argv = ["--load", str(load), "--use-checkpoint-args"]
    for key in _TOKENIZER_KEYS:
        if options.get(key) is not None:
            argv += [f"--{key.replace('_', '-')}", str(options[key])]
    saved = {}
    if options.get("tp") is None or options.get("pp") is None:
        try:
            saved = checkpoint_args(str(load))
        except CheckpointError:
            pass  # prepare() says what is wrong with --load
    tp = options.get("tp") or saved.get("tensor_model_parallel_size", 1)
    pp = options.get("pp") or saved.get("pipeline_model_parallel_size", 1)
    argv += ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    if options.get("dtype") in ("bf16", "bfloat16"):
        argv.append("--bf16")
    elif options.get("dtype") in ("fp16", "float16"):
        argv.append("--fp16")
    return parse_args(argv)


class AscendSpeedLM(_Base):
    """lm_eval's LM over a pretrain_bloom.py checkpoint.

    model_args: load=DIR (required), tokenizer_type and its files (as pretrain_bloom.py's flags,
    underscores for dashes), tp / pp (default: the checkpoint's), max_length (default: the
    checkpoint's seq_length), max_gen_toks (256), dtype (fp32 | bf16 | fp16), seed, backend;
    --batch_size is the harness's."""

    def __init__(self, load: str | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, seed: int = 1234,
                 backend: str | None = None, *, scorer: Scorer | None = None, tokenizer=None,
                 **options: Any):
        if _Base is not object:
            super().__init__()
        self._rank, self._world_size = 0, 1
        if scorer is None:
            if not load:
                raise ValueError("model_args needs load=DIR: the checkpoint to evaluate")
            from ascendspeed.evaluation.loading import (load_stage, prepare, start_processes,
                                                        world_size)

            setup = prepare(_flags(load, options), world_size())
            start_processes(setup, backend, int(seed))
            scorer = Scorer(load_stage(setup), max_length=setup.context_length)
            tokenizer = setup.tokenizer
        if tokenizer is None:
            raise ValueError("give the tokenizer with the scorer")
        self.scorer, self.tokenizer = scorer, tokenizer
        self.scorer.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = int(max_length or scorer.max_length or 2048)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)

    @property
    def eot_token_id(self) -> int | None:
        return self.tokenizer.eod

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    def _cache(self, kind: str, request, result) -> None:
        hook = getattr(self, "cache_hook", None)
        if hook is not None and hasattr(request, "args"):
            hook.add_partial(kind, request.args, result)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [_args_of(r)[:2] for r in requests]
        results = loglikelihood(self.scorer, self.tokenizer, pairs, self.max_length)
        for request, result in zip(requests, results):
            self._cache("loglikelihood", request, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [_args_of(r)[0] for r in requests]
        results = loglikelihood_rolling(self.scorer, self.tokenizer, texts, self.max_length)
        for request, result in zip(requests, results):
            self._cache("loglikelihood_rolling", request, result)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample and a temperature) continuations of each context,
        cut before the first `until` string; batches of requests with equal generation settings."""
        from ascendspeed.generation import StageRunner

        runner = StageRunner(self.scorer.model, self.tokenizer.vocab_size)
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        settings = [self._generation_settings(_args_of(r)[1] if len(_args_of(r)) > 1 else {})
                    for r in requests]
        for i, setting in enumerate(settings):
            groups.setdefault(repr(setting), []).append(i)
        for indices in groups.values():
            until, max_new, sampling = settings[indices[0]]
            for start in range(0, len(indices), self.scorer.batch_size):
                batch = indices[start:start + self.scorer.batch_size]
                texts = self._generate([_args_of(requests[i])[0] for i in batch], runner,
                                       until, max_new, sampling)
                for i, text in zip(batch, texts):
                    out[i] = text
                    self._cache("generate_until", requests[i], text)
        return out

    def _generation_settings(self, kwargs: dict) -> tuple:
        from ascendspeed.generation import SamplingParams

        kwargs = dict(kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        temperature = float(kwargs.get("temperature", 0.0) or 0.0)
        if kwargs.get("do_sample") and temperature > 0:
            sampling = SamplingParams(temperature=temperature, top_k=int(kwargs.get("top_k", 0)),
                                      top_p=float(kwargs.get("top_p", 0.0)), seed=self.seed)
        else:
            sampling = SamplingParams(greedy=True)
        return tuple(until), max_new, sampling

    def _generate(self, contexts: Sequence[str], runner, until: Sequence[str], max_new: int,
                  sampling) -> list[str]:
        from ascendspeed.generation import generate_tokens

        keep = max(1, self.max_length - max_new)  # left-truncate, leaving room to generate
        prompts = [(self.tokenizer.tokenize(c) or [self._prefix()])[-keep:] for c in contexts]

        def stopped(_, generation) -> bool:
            text = self.tokenizer.detokenize(generation.token_ids)
            return any(s in text for s in until)

        pad = self.tokenizer.pad if self.tokenizer.pad is not None else (self.tokenizer.eod or 0)
        generations = generate_tokens(runner, prompts, max_new_tokens=max_new, sampling=sampling,
                                      eod=self.tokenizer.eod, context_length=self.max_length,
                                      should_stop=stopped if until else None, pad_id=pad)
        texts = []
        for generation in generations:
            text = self.tokenizer.detokenize(generation.token_ids)
            cuts = [text.find(s) for s in until if s in text]
            texts.append(text[:min(cuts)] if cuts else text)
        return texts

    def _prefix(self) -> int:
        if self.tokenizer.eod is None:
            raise ValueError("an empty context needs the tokenizer's end-of-document token")
        return self.tokenizer.eod


def register() -> bool:
    """Register "ascendspeed" with lm_eval's model registry (False without lm_eval)."""
    if _Base is object:
        return False
    # The harness's own models first: its lazy import of them runs only into an empty registry.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry, register_model

    if MODEL_NAME not in model_registry:
        register_model(MODEL_NAME)(AscendSpeedLM)
    return True


register()


def main() -> None:
    """lm_eval's command line, with the "ascendspeed" model registered."""
    if _Base is object:
        raise SystemExit("error: lm_eval is not installed (pip install lm_eval==0.4.13)")
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
