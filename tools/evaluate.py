"""Evaluate a pretrain_bloom.py checkpoint: loss / perplexity, or zero-shot accuracy, under TP/PP.

    # loss and perplexity over a Megatron dataset (its documents in order, seq-length windows)
    torchrun --nproc_per_node 2 tools/evaluate.py --load CKPT --use-checkpoint-args \\
        --tensor-model-parallel-size 2 --data-path my-corpus_text_document \\
        --tokenizer-type PretrainedFromHF --tokenizer-name-or-path TOKENIZER_DIR
    # ... over a JSON-lines file (each record's --json-key, EOD after each, as preprocessing does)
    python tools/evaluate.py --load CKPT --use-checkpoint-args --eval-jsonl docs.jsonl [...]
    # zero-shot: LAMBADA last-word accuracy, multiple choice by log-likelihood
    python tools/evaluate.py --load CKPT --use-checkpoint-args --task lambada --strict-lambada \\
        --eval-jsonl lambada_test.jsonl [...]
    python tools/evaluate.py --load CKPT --use-checkpoint-args --task multiple-choice \\
        --eval-jsonl piqa.jsonl [...]

Flags are pretrain_bloom.py's (the model's shape from the checkpoint with --use-checkpoint-args;
--micro-batch-size sequences per forward, default 8; --seq-length the window) plus those below.
Results are printed by rank 0 in Megatron's format. Bad input (missing checkpoint or tokenizer, a
missing / non-UTF-8 / malformed JSON-lines file, an unknown task or record format) is one line on
stderr, exit status 2, before any process group exists.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

if __package__ in (None, ""):  # run as `python tools/evaluate.py`: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ascendspeed.arguments import parse_args  # noqa: E402
from ascendspeed.errors import AscendSpeedError, ConfigError, error_line  # noqa: E402

TASKS = ("perplexity", "lambada", "multiple-choice")
RANK = int(os.environ.get("RANK", "0"))


def add_evaluation_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("evaluation")
    group.add_argument("--task", type=str, default="perplexity",
                       help=f"one of {', '.join(TASKS)} (default perplexity)")
    group.add_argument("--eval-jsonl", type=str, default=None,
                       help="JSON-lines input: documents (perplexity) or task records")
    group.add_argument("--json-key", type=str, default="text",
                       help="the key holding each document's text (perplexity)")
    group.add_argument("--strict-lambada", action="store_true",
                       help="LAMBADA: the last word is the last whitespace-separated word "
                            "(else the last token)")
    group.add_argument("--target-delimiter", type=str, default=" ",
                       help="multiple choice: put between context and each choice (harness: ' ')")
    group.add_argument("--eval-max-windows", type=int, default=None,
                       help="perplexity: score at most this many windows")
    return parser


def log(message: str) -> None:
    if RANK == 0:
        print(message, file=sys.stderr, flush=True)


def say(message: str) -> None:
    if RANK == 0:
        print(message, flush=True)


def check_flags(args: argparse.Namespace) -> None:
    if args.task not in TASKS:
        raise ConfigError(f"--task {args.task!r}: unknown task; expected one of {', '.join(TASKS)}")
    data_path = args.data_path or []
    if args.task == "perplexity":
        if bool(data_path) == bool(args.eval_jsonl):
            raise ConfigError("give the text to evaluate: --data-path PREFIX (a Megatron dataset) "
                              "or --eval-jsonl FILE, one of them")
        if len(data_path) > 1:
            raise ConfigError("--data-path: give one dataset prefix (a blend has no single "
                              "document order)")
    elif not args.eval_jsonl:
        raise ConfigError(f"--task {args.task} needs --eval-jsonl FILE")
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        raise ConfigError(f"--micro-batch-size must be >= 1, got {args.micro_batch_size}")
    if args.eval_max_windows is not None and args.eval_max_windows < 1:
        raise ConfigError(f"--eval-max-windows must be >= 1, got {args.eval_max_windows}")


def read_input(args: argparse.Namespace, tokenizer):
    """The task's input, read and checked before any process group exists."""
    from ascendspeed.evaluation import inputs, tasks

    if args.task == "lambada":
        return tasks.read_lambada(args.eval_jsonl)
    if args.task == "multiple-choice":
        return tasks.read_multiple_choice(args.eval_jsonl)
    if args.eval_jsonl:
        return inputs.jsonl_token_stream(args.eval_jsonl, args.json_key, tokenizer)
    return inputs.indexed_token_stream(args.data_path[0])


def run(args: argparse.Namespace, setup, scorer, data) -> None:
    from ascendspeed.evaluation import tasks
    from ascendspeed.evaluation.perplexity import evaluate_perplexity
    from ascendspeed.training_log import validation_log_lines

    length = setup.context_length
    source = args.eval_jsonl or args.data_path[0]
    start = time.time()
    if args.task == "perplexity":
        result = evaluate_perplexity(scorer, data, length, args.eval_max_windows)
        for line in validation_log_lines(f"the end of evaluation for {source}",
                                         {"lm loss": result.loss}):
            say(line)
        say(f" tokens evaluated: {result.tokens} | windows: {result.windows} | seq length: "
            f"{length} | elapsed time (s): {time.time() - start:.1f}")
    elif args.task == "lambada":
        result = tasks.evaluate_lambada(scorer, setup.tokenizer, data, length, args.strict_lambada)
        correct, total = sum(result.correct), len(result.correct)
        say(f" > metrics for lambada ({source}{', strict' if args.strict_lambada else ''}): "
            f"correct / total = {correct} / {total} = {100.0 * correct / total:.4f} %")
    else:
        result = tasks.evaluate_multiple_choice(scorer, setup.tokenizer, data, length,
                                                args.target_delimiter)
        say(f" > metrics for multiple-choice ({source}): acc = {result.acc:.4f} | "
            f"acc_norm = {result.acc_norm:.4f} | examples: {len(result.gold)}")


def main(argv=None) -> int:
    args = parse_args(argv, extra_args_provider=add_evaluation_args)
    from ascendspeed.evaluation.loading import (load_stage, prepare, start_processes,
                                                stop_processes, world_size)

    try:
        check_flags(args)
        setup = prepare(args, world_size(), log)
        data = read_input(args, setup.tokenizer)
    except AscendSpeedError as error:  # before any process group: nothing can hang
        log(error_line(error))
        return 2

    from ascendspeed.evaluation.scoring import Scorer

    start_processes(setup, args.distributed_backend, args.seed,
                    timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes))
    status = 0
    try:
        scorer = Scorer(load_stage(setup, log), batch_size=args.micro_batch_size or 8,
                        max_length=setup.context_length)
        run(args, setup, scorer, data)
    except AscendSpeedError as error:  # every rank raises it alike
        log(error_line(error))
        status = 2
    stop_processes()
    return status


if __name__ == "__main__":
    sys.exit(main())
