"""Zero-shot tasks from local JSON-lines files.

- LAMBADA (Megatron's tasks/zeroshot_gpt): each record's `text`; the model must predict its last
  word greedily, every token of it. With `strict` (Megatron's --strict-lambada) the last word is
  the last whitespace-separated word, tokenized as ' ' + word after the stripped beginning; without
  it, the last token of the whole text.
- Multiple choice by log-likelihood, as lm-evaluation-harness scores `output_type:
  multiple_choice`: records {context, choices, label} or {query, choices, gold}; each choice is
  scored as the continuation delimiter + choice (default ' '); acc takes the highest
  log-likelihood, acc_norm the highest log-likelihood per character of the choice.
"""
from __future__ import annotations

from dataclasses import dataclass, field as dataclass_field

import numpy as np

from ascendspeed.errors import EvalInputError
from ascendspeed.evaluation.inputs import field, read_jsonl
from ascendspeed.evaluation.loglikelihood import loglikelihood, loglikelihood_tokens
from ascendspeed.evaluation.scoring import Scorer

TASKS = ("lambada", "multiple-choice")
_MC_KEYS = (("context", "label"), ("query", "gold"))


@dataclass(frozen=True)
class LambadaResult:
    correct: list[bool]
    logprobs: list[float]  # of each last word

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)


@dataclass(frozen=True)
class MultipleChoiceResult:
    gold: list[int]
    loglikelihoods: list[list[float]]  # per example, per choice
    choice_lengths: list[list[int]] = dataclass_field(repr=False)  # characters of each choice

    @property
    def predictions(self) -> list[int]:
        return [int(np.argmax(ll)) for ll in self.loglikelihoods]

    @property
    def normalized_predictions(self) -> list[int]:
        return [int(np.argmax(np.array(ll) / np.array(n, dtype=float)))
                for ll, n in zip(self.loglikelihoods, self.choice_lengths)]

    @property
    def acc(self) -> float:
        return float(np.mean([p == g for p, g in zip(self.predictions, self.gold)]))

    @property
    def acc_norm(self) -> float:
        return float(np.mean([p == g for p, g in zip(self.normalized_predictions, self.gold)]))


def lambada_split(tokenizer, text: str, strict: bool) -> tuple[list[int], list[int]]:
    """(context ids, last-word ids) as Megatron's _LambadaDataset.get_tokens."""
    if not strict:
        tokens = tokenizer.tokenize(text)
        return tokens[:-1], tokens[-1:]
    last = text.split()[-1]
    start = text.rfind(last)
    return tokenizer.tokenize(text[:start].strip()), tokenizer.tokenize(" " + last)


def read_lambada(path: str) -> list[str]:
    texts = []
    for number, record in read_jsonl(path):
        text = field(path, number, record, "text", str, " (a LAMBADA record is {\"text\": ...})")
        if not text.split():
            raise EvalInputError(f"{path}: line {number}: 'text' has no words")
        texts.append(text)
    return texts


def evaluate_lambada(scorer: Scorer, tokenizer, texts: list[str], max_length: int,
                     strict: bool = False) -> LambadaResult:
    pairs = []
    for text in texts:
        context, last = lambada_split(tokenizer, text, strict)
        if not context:  # nothing before the last word: condition on EOD, as the harness does
            if tokenizer.eod is None:
                raise ValueError(f"{text!r}: no context before the last word and no EOD token")
            context = [tokenizer.eod]
        pairs.append((context, last))
    results = loglikelihood_tokens(scorer, pairs, max_length)
    return LambadaResult(correct=[greedy for _, greedy in results],
                         logprobs=[total for total, _ in results])


@dataclass(frozen=True)
class MultipleChoiceExample:
    context: str
    choices: list[str]
    gold: int


def read_multiple_choice(path: str) -> list[MultipleChoiceExample]:
    examples = []
    for number, record in read_jsonl(path):
        keys = next((k for k in _MC_KEYS if k[0] in record and "choices" in record), None)
        if keys is None:
            raise EvalInputError(f"{path}: line {number}: unknown task format (keys "
                                 f"{sorted(record)}): a multiple-choice record has "
                                 f"context/choices/label or query/choices/gold")
        context = field(path, number, record, keys[0], str)
        choices = field(path, number, record, "choices", list)
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise EvalInputError(f"{path}: line {number}: 'choices' must be a list of non-empty "
                                 f"strings")
        gold = field(path, number, record, keys[1], int)
        if not 0 <= gold < len(choices):
            raise EvalInputError(f"{path}: line {number}: {keys[1]!r} is {gold}, not an index "
                                 f"into its {len(choices)} choices")
        examples.append(MultipleChoiceExample(context, choices, gold))
    return examples


def evaluate_multiple_choice(scorer: Scorer, tokenizer, examples: list[MultipleChoiceExample],
                             max_length: int, delimiter: str = " ") -> MultipleChoiceResult:
    requests = [(example.context, delimiter + choice)
                for example in examples for choice in example.choices]
    scores = iter(loglikelihood(scorer, tokenizer, requests, max_length))
    loglikelihoods = [[next(scores)[0] for _ in example.choices] for example in examples]
    return MultipleChoiceResult(gold=[e.gold for e in examples], loglikelihoods=loglikelihoods,
                                choice_lengths=[[len(c) for c in e.choices] for e in examples])
