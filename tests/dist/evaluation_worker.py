"""Run under torchrun by tests/test_evaluation.py: loads a checkpoint at the launched TP x PP
layout through the evaluation loader, then evaluates everything tools/evaluate.py and the
lm_eval adapter compute (perplexity of a dataset, LAMBADA, multiple choice, loglikelihood,
rolling loglikelihood, generate_until); every rank writes what it got to --out.rank{R}.json and
rank 0 also the lines tools/evaluate.py prints."""
import argparse
import contextlib
import io
import json
import os
import sys

import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from ascendspeed.arguments import parse_args  # noqa: E402
from ascendspeed.evaluation.scoring import Scorer  # noqa: E402
from tools import evaluate as cli  # noqa: E402


def evaluate_all(scorer, tokenizer, flags: list[str], tasks: dict) -> dict:
    """Every evaluation of `tasks` (names -> files): structured results and the printed lines.
    Also what the test runs in one process, so both sides compute the same things."""
    from ascendspeed.evaluation import inputs
    from ascendspeed.evaluation import tasks as zero_shot
    from ascendspeed.evaluation.lm_eval_adapter import AscendSpeedLM
    from ascendspeed.evaluation.perplexity import evaluate_perplexity

    length = scorer.max_length
    stream = inputs.indexed_token_stream(tasks["data"])
    ppl = evaluate_perplexity(scorer, stream, length)
    texts = zero_shot.read_lambada(tasks["lambada"])
    lambada = zero_shot.evaluate_lambada(scorer, tokenizer, texts, length, strict=True)
    mc = zero_shot.evaluate_multiple_choice(
        scorer, tokenizer, zero_shot.read_multiple_choice(tasks["mc"]), length)
    lm = AscendSpeedLM(scorer=scorer, tokenizer=tokenizer)
    out = {"loss": ppl.loss, "tokens": ppl.tokens, "windows": ppl.windows,
           "lambada": lambada.correct, "lambada_logprobs": lambada.logprobs,
           "mc": mc.loglikelihoods, "acc": mc.acc, "acc_norm": mc.acc_norm,
           "loglikelihood": lm.loglikelihood(tasks["requests"]),
           "rolling": lm.loglikelihood_rolling([(t,) for t in tasks["texts"]]),
           "generate": lm.generate_until([(c, {"until": ["\n"], "max_gen_toks": 6})
                                          for c in tasks["prompts"]])}
    lines = []
    for task, extra in (("perplexity", ["--data-path", tasks["data"]]),
                        ("lambada", ["--strict-lambada", "--eval-jsonl", tasks["lambada"]]),
                        ("multiple-choice", ["--eval-jsonl", tasks["mc"]])):
        args = parse_args(flags + ["--task", task] + extra,
                          extra_args_provider=cli.add_evaluation_args)
        from ascendspeed.evaluation.loading import prepare

        setup = prepare(args, int(os.environ.get("WORLD_SIZE", "1")), log=lambda _: None)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            cli.run(args, setup, scorer, cli.read_input(args, setup.tokenizer))
        lines += printed.getvalue().splitlines()
    out["lines"] = lines
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", required=True, help="JSON: data, lambada, mc, requests, ...")
    parser.add_argument("--out", required=True)
    known, flags = parser.parse_known_args()
    from ascendspeed.evaluation.loading import load, stop_processes

    args = parse_args(flags)
    setup, model = load(args, log=lambda _: None)
    scorer = Scorer(model, batch_size=4, max_length=setup.context_length)
    with open(known.tasks, encoding="utf-8") as f:
        tasks = json.load(f)
    report = evaluate_all(scorer, setup.tokenizer, flags, tasks)
    with open(f"{known.out}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(report, f)
    stop_processes()


if __name__ == "__main__":
    main()
