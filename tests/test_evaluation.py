"""Evaluation (tools/evaluate.py, ascendspeed/evaluation): a random tiny Hugging Face
BloomForCausalLM converted with tools/convert_checkpoint.py is evaluated by our code and, as the
reference, by HF directly: perplexity of a Megatron dataset and of the JSON-lines file it was
preprocessed from (the trainer's loss definition), LAMBADA last-word accuracy (strict and not),
multiple choice acc / acc_norm, and the lm_eval adapter's loglikelihood, loglikelihood_rolling and
generate_until. TP=2 (torchrun, gloo) gives what one process gives. Bad input: one line, exit 2."""
import contextlib
import io
import json
import math
import os
import random
import re
import sys

import numpy as np
import pytest
import torch

from launch import REPO_ROOT, run_torchrun
from test_pretrain import corpus  # noqa: F401 (a fixture: its GPT-2 BPE files, one token per byte)
from tolerances import FORWARD_REL, assert_logprobs_close, printed_resolution

sys.path.insert(0, os.path.join(REPO_ROOT, "tests", "dist"))
from evaluation_worker import evaluate_all  # noqa: E402

PADDED, HIDDEN, HEADS, LAYERS, SEQ = 258, 32, 4, 2, 64  # HF vocab = our padded vocab (TP=2: 129)
LETTERS = "abcdefgh"


def tiny_hf_model(tokenizer):
    """Random weights perturbed beyond HF's init; the embeddings (tied to the head) of ' ' and the
    letters scaled up so that greedy predictions are often words of letters (LAMBADA has hits)."""
    import transformers

    config = transformers.BloomConfig(vocab_size=PADDED, hidden_size=HIDDEN, n_layer=LAYERS,
                                      n_head=HEADS, hidden_dropout=0.0, attention_dropout=0.0,
                                      seq_length=SEQ)
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(config).eval()
    generator, boosted = torch.Generator().manual_seed(1), tokenizer.tokenize(" " + LETTERS)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("word_embeddings.weight"):
                param[boosted] *= 6
            else:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


def words(rng, low, high):
    return " ".join("".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 5)))
                    for _ in range(rng.randint(low, high)))


@torch.no_grad()
def greedy(hf, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def lambada_texts(hf, tokenizer, rng):
    """Texts whose last word HF predicts entirely (hits), only its first letter of (near misses),
    and random last words: built from HF's own greedy continuations."""
    space, hits, misses, others = tokenizer.tokenize(" ")[0], [], [], []
    while len(hits) < 5 or len(misses) < 3 or len(others) < 5:
        context = words(rng, 2, 6)
        new = greedy(hf, tokenizer.tokenize(context), 3)
        printable = all(t < 94 for t in new[1:])  # ids 0..93 are '!'..'~'
        if new[0] == space and printable and len(hits) < 5:
            hits.append(context + " " + tokenizer.detokenize(new[1:]))
        elif new[0] == space and printable and len(misses) < 3:
            wrong = "a" if tokenizer.detokenize(new[2:]) != "a" else "b"
            misses.append(context + " " + tokenizer.detokenize(new[1:2]) + wrong)
        elif len(others) < 5:
            others.append(context + " " + words(rng, 1, 1))
    return hits + misses + others


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def setup(corpus, tmp_path_factory):  # noqa: F811
    """The HF model, its conversions at TP=1 and TP=2, a dataset preprocessed from documents.jsonl,
    and the task files."""
    torch.set_num_threads(1)
    from ascendspeed.data.tokenizer import GPT2BPETokenizer
    from tools import convert_checkpoint, preprocess_data

    root = tmp_path_factory.mktemp("evaluation")
    vocab, merges = str(corpus[0] / "vocab.json"), str(corpus[0] / "merges.txt")
    tokenizer = GPT2BPETokenizer(vocab, merges)
    hf = tiny_hf_model(tokenizer)
    hf.save_pretrained(root / "hf")
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        for tp, pp in ((1, 1), (2, 1), (1, 2)):
            assert convert_checkpoint.main(["--source-format", "hf", "--target-format", "megatron",
                                            "--input", str(root / "hf"), "--output",
                                            str(root / layout(tp, pp)), "--target-tp", str(tp),
                                            "--target-pp", str(pp),
                                            "--pad-vocab-size-to", str(PADDED),
                                            "--make-vocab-size-divisible-by", "1"]) == 0
    rng = random.Random(0)
    documents = [words(rng, 5, 40) + "." for _ in range(24)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert preprocess_data.main([
            "--input", write_jsonl(root / "documents.jsonl", [{"text": d} for d in documents]),
            "--output-prefix", str(root / "docs"), "--tokenizer-type", "GPT2BPETokenizer",
            "--vocab-file", vocab, "--merge-file", merges, "--append-eod"]) == 0
    lambada = lambada_texts(hf, tokenizer, rng)
    mc = [{"context": words(rng, 2, 8), "choices": [words(rng, 1, 3) for _ in range(4)],
           "label": rng.randrange(4)} for _ in range(6)]
    mc += [{"query": words(rng, 2, 8), "choices": [words(rng, 1, 2) for _ in range(3)],
            "gold": rng.randrange(3)} for _ in range(6)]
    tasks = {"data": str(root / "docs_text_document"),
             "lambada": write_jsonl(root / "lambada.jsonl", [{"text": t} for t in lambada]),
             "mc": write_jsonl(root / "mc.jsonl", mc),
             "requests": [["", "abc de"], ["ab cd ", "ef"], [words(rng, 3, 5), " gh a"],
                          [words(rng, 30, 40), " fed"]],  # the last one is left-truncated
             "texts": [words(rng, 2, 4), words(rng, 40, 50)],  # one window; three windows
             "prompts": [words(rng, 2, 4), words(rng, 5, 8)]}
    (root / "tasks.json").write_text(json.dumps(tasks))
    return {"root": root, "vocab": vocab, "merges": merges, "hf": hf, "tokenizer": tokenizer,
            "documents": documents,
            "lambada": lambada, "mc": mc, "tasks": tasks}


def layout(tp, pp):
    return f"tp{tp}" if pp == 1 else f"tp{tp}pp{pp}"


def flags(setup, tp=1, *extra, pp=1):
    root = setup["root"]
    return ["--load", str(root / layout(tp, pp)), "--use-checkpoint-args",
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--tokenizer-type", "GPT2BPETokenizer",
            "--vocab-file", setup["vocab"], "--merge-file", setup["merges"],
            "--micro-batch-size", "4", *extra]


@pytest.fixture(scope="module")
def ours(setup):
    """(Scorer, tokenizer) of the TP=1 checkpoint, loaded in this process as tools/evaluate.py
    loads it."""
    from ascendspeed.arguments import parse_args
    from ascendspeed.evaluation import Scorer
    from ascendspeed.evaluation.loading import load

    loaded, model = load(parse_args(flags(setup)), log=lambda _: None)
    assert loaded.context_length == SEQ
    return Scorer(model, batch_size=4, max_length=SEQ), loaded.tokenizer


@pytest.fixture(scope="module")
def one_process(setup, ours):
    return evaluate_all(*ours, flags(setup), setup["tasks"])


# ------------------------------------------------------------------------- HF references
@torch.no_grad()
def hf_logprobs(hf, ids):
    """log p(ids[t] | ids[:t]) for t >= 1, by HF."""
    logits = hf(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


@torch.no_grad()
def hf_continuation(hf, context, continuation, max_length=SEQ):
    """(sum log p, all greedy) of continuation ids after context ids, as HFLM computes it."""
    whole = (context + continuation)[-(max_length + 1):]
    logits = hf(torch.tensor([whole[:-1]])).logits[0, -len(continuation):].float()
    target = torch.tensor(continuation)
    logprob = torch.log_softmax(logits, -1).gather(1, target[:, None]).sum().item()
    return logprob, bool((logits.argmax(-1) == target).all())


def hf_pair(tokenizer, context, continuation):
    """HFLM._encode_pair, written out again."""
    if context == "":
        return [tokenizer.eod], tokenizer.tokenize(continuation)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, head = tokenizer.tokenize(context + continuation), tokenizer.tokenize(context)
    return head, whole[len(head):]


# ------------------------------------------------------------------------------- tests
def test_perplexity_is_the_trainers_loss_and_hf(setup, ours, one_process):
    """Windows of SEQ + 1 tokens with stride SEQ over the dataset's documents in order (the last
    one shorter): the token-weighted mean of HF's cross entropies, and of the trainer's
    forward_step losses on the same windows."""
    from ascendspeed.training import forward_step

    tokenizer = setup["tokenizer"]
    stream = []
    for document in setup["documents"]:
        stream += tokenizer.tokenize(document) + [tokenizer.eod]
    windows = [stream[i:i + SEQ + 1] for i in range(0, len(stream) - 1, SEQ)]
    assert len(windows[-1]) < SEQ + 1 and one_process["windows"] == len(windows)
    assert one_process["tokens"] == len(stream) - 1
    hf_sum = sum(-hf_logprobs(setup["hf"], w).double().sum().item() for w in windows)
    model = ours[0].model
    with torch.no_grad():
        trainer_sum = sum(forward_step(model, {"text": torch.tensor([w])}, None).double().item()
                          * (len(w) - 1) for w in windows)
    # token-weighted means of log-probabilities by two fp32 implementations (FORWARD_REL of the
    # value: measured 1e-8); the printed values to one unit of their 7th digit
    assert one_process["loss"] == pytest.approx(trainer_sum / (len(stream) - 1), rel=FORWARD_REL)
    assert one_process["loss"] == pytest.approx(hf_sum / (len(stream) - 1), rel=FORWARD_REL)
    line = next(x for x in one_process["lines"] if "validation loss at" in x)
    loss, ppl = re.search(r"lm loss value: (\S+) \| lm loss PPL: (\S+) \|", line).groups()
    expected_ppl = math.exp(one_process["loss"])
    assert float(loss) == pytest.approx(one_process["loss"],
                                        rel=printed_resolution(one_process["loss"]))
    assert float(ppl) == pytest.approx(expected_ppl, rel=printed_resolution(expected_ppl))
    assert f"tokens evaluated: {len(stream) - 1} | windows: {len(windows)}" in \
        "\n".join(one_process["lines"])


def test_jsonl_perplexity_equals_its_preprocessed_dataset(setup, capsys):
    """--eval-jsonl tokenizes as preprocess_data.py --append-eod does: the same loss as the
    dataset; --eval-max-windows limits the windows."""
    from tools.evaluate import main

    def loss_line(*extra):
        assert main(flags(setup, 1, *extra)) == 0
        out = capsys.readouterr().out
        return next(x for x in out.splitlines() if "lm loss value" in x).split("|")[1], out

    root = setup["root"]
    from_jsonl, _ = loss_line("--eval-jsonl", str(root / "documents.jsonl"))
    from_data, _ = loss_line("--data-path", str(root / "docs_text_document"))
    assert from_jsonl == from_data
    _, out = loss_line("--data-path", str(root / "docs_text_document"), "--eval-max-windows", "2")
    assert f"tokens evaluated: {2 * SEQ} | windows: 2" in out


def test_lambada_matches_hf(setup, ours, one_process):
    """Strict (the last whitespace word, tokenized with its space) and non-strict (the last
    token): every token of the last word greedy, per HF."""
    from ascendspeed.evaluation import evaluate_lambada

    hf, tokenizer, texts = setup["hf"], setup["tokenizer"], setup["lambada"]
    strict_ref, loose_ref = [], []
    for text in texts:
        last = text.split()[-1]
        head = tokenizer.tokenize(text[:text.rfind(last)].strip())
        strict_ref.append(hf_continuation(hf, head, tokenizer.tokenize(" " + last)))
        tokens = tokenizer.tokenize(text)
        loose_ref.append(hf_continuation(hf, tokens[:-1], tokens[-1:]))
    assert one_process["lambada"] == [g for _, g in strict_ref]
    assert 5 <= sum(one_process["lambada"]) < len(texts)  # hits; near misses count as wrong
    assert_logprobs_close(one_process["lambada_logprobs"], [lp for lp, _ in strict_ref],
                          what="lambada")
    loose = evaluate_lambada(*ours, texts, SEQ, strict=False)
    assert loose.correct == [g for _, g in loose_ref]
    correct = sum(one_process["lambada"])
    assert (f"correct / total = {correct} / {len(texts)} = {100 * correct / len(texts):.4f} %"
            in "\n".join(one_process["lines"]))


def test_multiple_choice_matches_hf(setup, one_process):
    """Each choice scored as ' ' + choice after the context; acc and acc_norm (per character)
    as the harness computes them from HF's log-likelihoods."""
    hf, tokenizer = setup["hf"], setup["tokenizer"]
    hits = hits_norm = 0
    for example, ours in zip(setup["mc"], one_process["mc"]):
        context = example.get("context", example.get("query"))
        gold = example.get("label", example.get("gold"))
        lls = [hf_continuation(hf, *hf_pair(tokenizer, context, " " + c))[0]
               for c in example["choices"]]
        assert_logprobs_close(ours, lls, what=context)
        hits += int(np.argmax(lls)) == gold
        hits_norm += int(np.argmax(np.array(lls) / [len(c) for c in example["choices"]])) == gold
    n = len(setup["mc"])
    assert one_process["acc"] == hits / n and one_process["acc_norm"] == hits_norm / n
    assert f"acc = {hits / n:.4f} | acc_norm = {hits_norm / n:.4f} | examples: {n}" in \
        "\n".join(one_process["lines"])


def test_adapter_matches_hf(setup, one_process):
    """loglikelihood (empty context, trailing spaces, left truncation), loglikelihood_rolling
    (one window, several) and greedy generate_until, against HF."""
    hf, tokenizer, tasks = setup["hf"], setup["tokenizer"], setup["tasks"]
    for (context, continuation), (logprob, is_greedy) in zip(tasks["requests"],
                                                             one_process["loglikelihood"]):
        ref = hf_continuation(hf, *hf_pair(tokenizer, context, continuation))
        assert_logprobs_close(logprob, ref[0], what=(context, continuation))
        assert is_greedy == ref[1]
    for text, total in zip(tasks["texts"], one_process["rolling"]):
        tokens = tokenizer.tokenize(text)
        full, ref, done = [tokenizer.eod] + tokens, 0.0, 0
        while done < len(tokens):  # disjoint windows of SEQ predicted tokens, the first after EOD
            end = min(done + SEQ, len(tokens))
            ref += hf_logprobs(hf, full[max(0, end - SEQ):end + 1])[-(end - done):].sum().item()
            done = end
        assert_logprobs_close(total, ref, what=text)
    for prompt, text in zip(tasks["prompts"], one_process["generate"]):
        ids = tokenizer.tokenize(prompt)
        expected = tokenizer.detokenize(greedy(hf, ids, 6)).split("\n")[0]
        assert text == expected


@pytest.mark.multiprocess
@pytest.mark.parametrize("tp,pp", [(2, 1), pytest.param(1, 2, marks=pytest.mark.slow)],
                         ids=["tp2", "pp2"])
def test_parallel_equals_one_process(setup, one_process, tmp_path, tp, pp):
    """torchrun, 2 processes (gloo), the checkpoint converted to TP=2 (or PP=2): every rank
    computes what one process computes (the loss and the log-likelihoods to fp32 rounding; the
    same correct answers, choices and generations), and only rank 0 prints."""
    run_torchrun("tests/dist/evaluation_worker.py",
                 ["--tasks", setup["root"] / "tasks.json", "--out", tmp_path / "run",
                  *flags(setup, tp, pp=pp)], 2, check=True)
    for rank in range(2):
        report = json.loads((tmp_path / f"run.rank{rank}.json").read_text())
        assert report["loss"] == pytest.approx(one_process["loss"], rel=FORWARD_REL)
        for key in ("tokens", "windows", "lambada", "acc", "acc_norm", "generate"):
            assert report[key] == one_process[key], key
        assert_logprobs_close(report["mc"], one_process["mc"], what="multiple choice")
        assert_logprobs_close(report["rolling"], one_process["rolling"], what="rolling")
        assert [g for _, g in report["loglikelihood"]] == \
            [g for _, g in one_process["loglikelihood"]]
        assert_logprobs_close([lp for lp, _ in report["loglikelihood"]],
                              [lp for lp, _ in one_process["loglikelihood"]], what="loglikelihood")
    printed = json.loads((tmp_path / "run.rank0.json").read_text())["lines"]
    assert len(printed) == 6  # perplexity: 4 lines; lambada, multiple choice: 1 each
    assert json.loads((tmp_path / "run.rank1.json").read_text())["lines"] == []  # rank 0 prints


def test_lm_eval_registration(setup, one_process):
    """`lm_eval --model ascendspeed` finds the adapter (the harness's own models still load),
    builds it from --model_args, and it answers the harness's Instance requests."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from ascendspeed.evaluation.lm_eval_adapter import AscendSpeedLM

    assert get_model("ascendspeed") is AscendSpeedLM
    assert get_model("dummy").__name__ == "DummyLM"
    lm = AscendSpeedLM.create_from_arg_string(
        f"load={setup['root'] / 'tp1'},tokenizer_type=GPT2BPETokenizer,"
        f"vocab_file={setup['vocab']},merge_file={setup['merges']}",
        {"batch_size": 2})
    assert lm.rank == 0 and lm.world_size == 1 and lm.max_length == SEQ
    requests = [Instance("loglikelihood", {}, tuple(r), i)
                for i, r in enumerate(setup["tasks"]["requests"])]
    answers = lm.loglikelihood(requests)
    assert_logprobs_close([lp for lp, _ in answers],
                          [lp for lp, _ in one_process["loglikelihood"]], what="lm_eval")
    assert [g for _, g in answers] == [g for _, g in one_process["loglikelihood"]]


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case,message", [
    ("no-checkpoint", "--load /nonexistent/ckpt: no such directory"),
    ("no-file", "missing.jsonl: cannot read"),
    ("not-utf8", "bad.jsonl: line 2 is not valid UTF-8"),
    ("not-json", "bad.jsonl: line 2 is not valid JSON"),
    ("no-key", "bad.jsonl: line 1 has no 'text' key"),
    ("mc-format", "bad.jsonl: line 1: unknown task format"),
    ("mc-gold", "bad.jsonl: line 1: 'label' is 4, not an index into its 2 choices"),
    ("task", "--task 'sentiment': unknown task"),
    ("no-input", "give the text to evaluate"),
    ("no-data", "--data-path /nonexistent/data: no dataset there"),
])
def test_bad_input_one_line_exit_2(setup, tmp_path, capsys, case, message):
    from tools.evaluate import main

    bad = tmp_path / "bad.jsonl"
    argv = flags(setup, 1, "--eval-jsonl", str(bad))
    contents = {"not-utf8": b'{"text": "fine"}\n{"text": "\xff"}\n',
                "not-json": b'{"text": "fine"}\n{"text": \n',
                "no-key": b'{"body": "x"}\n',
                "mc-format": b'{"question": "x", "answers": ["a", "b"]}\n',
                "mc-gold": b'{"context": "x", "choices": ["a", "b"], "label": 4}\n'}
    bad.write_bytes(contents.get(case, b'{"text": "fine"}\n'))
    if case == "no-checkpoint":
        argv[1] = "/nonexistent/ckpt"
    elif case == "no-file":
        argv[-1] = str(tmp_path / "missing.jsonl")
    elif case.startswith("mc"):
        argv += ["--task", "multiple-choice"]
    elif case == "task":
        argv += ["--task", "sentiment"]
    elif case == "no-input":
        argv = argv[:-2]
    elif case == "no-data":
        argv = argv[:-2] + ["--data-path", "/nonexistent/data"]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith(" > ")]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
