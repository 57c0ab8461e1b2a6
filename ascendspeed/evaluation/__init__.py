"""Evaluation of a checkpoint: loss / perplexity over a token stream, zero-shot tasks from local
files, and an lm-evaluation-harness model (lm_eval_adapter, imported on its own: it needs the
optional `lm_eval` package). tools/evaluate.py is the command line."""
from ascendspeed.errors import EvalInputError
from ascendspeed.evaluation.loglikelihood import (encode_pair, loglikelihood,
                                                  loglikelihood_rolling, loglikelihood_tokens)
from ascendspeed.evaluation.perplexity import PerplexityResult, evaluate_perplexity
from ascendspeed.evaluation.scoring import Scorer, TokenScores
from ascendspeed.evaluation.tasks import evaluate_lambada, evaluate_multiple_choice

__all__ = ["EvalInputError", "PerplexityResult", "Scorer", "TokenScores", "encode_pair",
           "evaluate_lambada", "evaluate_multiple_choice", "evaluate_perplexity", "loglikelihood",
           "loglikelihood_rolling", "loglikelihood_tokens"]
