"""Text generation: the KV cache gives the full-recompute logits, greedy decoding equals Hugging
Face's `generate`, TP=2 and TP=2 x PP=2 generate what one process does (greedy and seeded
sampling, on every rank), sampling semantics, stop strings and streaming, and
examples/bloom/generate_bloom.py end to end from a pretrain_bloom.py checkpoint with its
bad-input errors."""
import importlib.util
import json
import os
import sys

import pytest
import torch

from launch import REPO_ROOT, launch_env, run_command, run_python, run_torchrun
from test_pretrain import corpus, model_args  # noqa: F401 (corpus is a fixture)
from tolerances import FORWARD_REL, assert_close_to_scale, assert_logprobs_close

sys.path.insert(0, os.path.join(REPO_ROOT, "tests", "dist"))
from generation_worker import (HEADS, HIDDEN, LAYERS, PROMPTS, RUNS, VOCAB, run_all,  # noqa: E402
                               stage_from_hf)

from ascendspeed.errors import PromptError  # noqa: E402
from ascendspeed.generation import SamplingParams, StageRunner, generate_text, generate_tokens
from ascendspeed.generation.generate import left_pad  # noqa: E402
from ascendspeed.generation.sampling import sample, top_k_filter, top_p_filter  # noqa: E402
from ascendspeed.model.bloom import InferenceCache  # noqa: E402

ENV = launch_env()


def tiny_hf_model():
    """Deterministic random weights, perturbed beyond HF's 0.02 init so that greedy decoding does
    not just repeat one token (the embeddings are left alone: they are tied to the head)."""
    import transformers

    config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS,
                                      n_head=HEADS, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "word_embeddings.weight" not in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    model.generation_config.eos_token_id = None  # generate the full length unless told otherwise
    return model


@pytest.fixture(scope="module")
def hf():
    torch.set_num_threads(1)
    return tiny_hf_model()


@pytest.fixture(scope="module")
def hf_weights(hf, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "hf_state.pt"
    torch.save(hf.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def ours(hf):
    return stage_from_hf(hf.state_dict())


@pytest.fixture(scope="module")
def reference(ours):
    """The one-process results of the worker's runs."""
    return run_all(StageRunner(ours, VOCAB))


# ------------------------------------------------------------------------------- model + cache
@torch.no_grad()
def test_kv_cache_logits_equal_full_recompute(ours):
    """Left-padded batch: prefill into the cache, then one token per step; at every step the
    cached forward's logits equal a full forward over the whole sequence (all positions at the
    prefill, the new one after)."""
    ids, mask = left_pad(PROMPTS, 0, "cpu")
    cache = InferenceCache()
    full = ours(ids, attention_mask=mask)
    cached = ours(ids, attention_mask=mask, cache=cache)
    real = mask.bool()
    # the same weights and tokens, attention over the cache or over the whole sequence: one
    # fp32 forward each, ulps of the logits' scale (a cache entry at the wrong position, or a
    # pad attended to, moves logits at their own scale)
    assert_close_to_scale(cached[real], full[real], rel=FORWARD_REL, what="prefill")
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        new = torch.randint(0, VOCAB, (len(PROMPTS), 1), generator=generator)
        ids, mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
        step = ours(new, attention_mask=mask, cache=cache)
        assert step.shape[1] == 1 and cache.length == ids.shape[1]
        assert_close_to_scale(step[:, 0], ours(ids, attention_mask=mask)[:, -1], rel=FORWARD_REL,
                              what=f"step at {ids.shape[1]} tokens")
    assert cache.keys[1].shape == (len(PROMPTS), 4, ids.shape[1], 8)  # [b, heads, tokens, hd]


def test_greedy_equals_hugging_face_generate(hf, reference):
    """The same weights, the same left-padded batch with its attention mask: HF's greedy
    `generate` and ours give the same tokens (with and without the cache)."""
    ids, mask = left_pad(PROMPTS, 0, "cpu")
    new = RUNS["greedy"][1]
    expected = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                           pad_token_id=0)[:, ids.shape[1]:].tolist()
    assert reference["greedy"]["tokens"] == expected
    assert reference["greedy_recompute"]["tokens"] == expected
    assert len({t for row in expected for t in row}) >= 6  # not one token repeated


def test_eos_stops_only_its_sequence(ours, reference):
    greedy = reference["greedy"]["tokens"]
    eod = greedy[0][3]
    first = greedy[0].index(eod)
    results = generate_tokens(StageRunner(ours, VOCAB), PROMPTS, max_new_tokens=10,
                              sampling=SamplingParams(greedy=True), eod=eod)
    for row, result in zip(greedy, results):
        stop = row.index(eod) if eod in row else len(row)
        assert result.token_ids == row[:stop]
        assert result.finish_reason == ("eos" if eod in row else "length")
    assert results[0].token_ids == greedy[0][:first]


def test_context_length_and_bad_prompts(ours):
    runner = StageRunner(ours, VOCAB)
    results = generate_tokens(runner, PROMPTS, max_new_tokens=10, context_length=12,
                              sampling=SamplingParams(greedy=True))
    assert [len(r.token_ids) for r in results] == [7, 3, 9]  # prompt + new <= 12
    assert all(r.finish_reason == "length" for r in results)
    with pytest.raises(PromptError, match="prompt 1 has 9 tokens; the context is 9"):
        generate_tokens(runner, PROMPTS, max_new_tokens=1, context_length=9,
                        sampling=SamplingParams(greedy=True))
    with pytest.raises(PromptError, match="prompt 0 has no tokens"):
        generate_tokens(runner, [[]], max_new_tokens=1, sampling=SamplingParams(greedy=True))


# ------------------------------------------------------------------------------------ sampling
def test_sampling_semantics():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0, 2.0]])
    assert top_k_filter(logits, 2).isinf().tolist() == [[False, True, False, True, False]]  # ties kept
    # Megatron's nucleus: keep up to and including the token that crosses top_p.
    probs = logits.softmax(-1)[0].sort(descending=True).values
    assert probs[0] < 0.6 < probs[0] + probs[1]
    kept = ~top_p_filter(logits, 0.6).isinf()
    assert kept.sum() == 2 and kept[0, 0]
    assert (~top_p_filter(logits, 1e-6).isinf()).sum() == 1  # always the best one
    assert sample(logits, SamplingParams(top_k=1), None).tolist() == [0]  # top_k 1 is greedy
    params = SamplingParams(temperature=0.7, seed=5)
    draws = [sample(logits.repeat(64, 1), params, torch.Generator().manual_seed(5)).tolist()
             for _ in range(2)]
    assert draws[0] == draws[1] and len(set(draws[0])) > 1
    for bad, message in (({"top_p": 1.5}, "top_p must be in"), ({"top_k": -1}, "top_k must be"),
                         ({"temperature": 0.0}, "temperature must be > 0"),
                         ({"top_k": 5, "top_p": 0.9}, "cannot both be set")):
        with pytest.raises(ValueError, match=message):
            SamplingParams(**bad)
    SamplingParams(greedy=True, temperature=0.0)  # temperature is unused by greedy


def test_seed_reproducible_and_logprobs(ours, reference):
    runner = StageRunner(ours, VOCAB)
    params, new = RUNS["top_p"]
    again = generate_tokens(runner, PROMPTS, max_new_tokens=new, sampling=params,
                            return_logprobs=True)
    assert [r.token_ids for r in again] == reference["top_p"]["tokens"]
    other = generate_tokens(runner, PROMPTS, max_new_tokens=new,
                            sampling=SamplingParams(temperature=0.9, top_p=0.95, seed=99))
    assert [r.token_ids for r in other] != reference["top_p"]["tokens"]
    assert all(lp <= 0 for r in again for lp in r.logprobs)
    assert len(again[0].logprobs) == len(again[0].token_ids)


class CharTokenizer:
    """ids 0..25 <-> 'a'..'z'; no EOD."""
    eod, pad, vocab_size = None, None, 26

    def encode_batch(self, texts):
        return [[ord(c) - 97 for c in text] for text in texts]

    def detokenize(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stop_strings_and_streaming(ours):
    runner = StageRunner(ours, 26)  # sample among the first 26 ids only
    tokenizer = CharTokenizer()
    prompts = ["hello", "abc"]
    plain = generate_text(runner, tokenizer, prompts, max_new_tokens=12,
                          sampling=SamplingParams(greedy=True))
    text = plain[1].text
    j = next(k for k in range(2, len(text)) if text[k] != text[k - 1])
    stop = text[j - 1:j + 1]  # where the second continuation first changes character
    assert stop not in plain[0].text
    pieces = {0: [], 1: []}
    stopped = generate_text(runner, tokenizer, prompts, max_new_tokens=12, stop=[stop, "#"],
                            sampling=SamplingParams(greedy=True),
                            stream=lambda i, text: pieces[i].append(text))
    assert stopped[1].text == text[:j - 1] and stopped[1].finish_reason == "stop"
    assert len(stopped[1].token_ids) == j + 1  # up to the token completing the stop string
    assert stopped[0].text == plain[0].text and stopped[0].finish_reason == "length"
    for i in (0, 1):
        assert "".join(pieces[i]) == stopped[i].text  # the streamed pieces add up to the text
        assert len(pieces[i]) > 1


# --------------------------------------------------------------------------- TP / PP processes
def launch(nproc, out, *args):
    run_torchrun("tests/dist/generation_worker.py", [*args, "--out", out], nproc, check=True)
    return [json.loads((out.parent / f"{out.name}.rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)], ids=["tp2", "tp2-pp2"])  # the second has the PP=2 p2p
def test_parallel_generation_equals_one_process(tmp_path, hf_weights, reference, tp, pp):
    """Greedy and seeded sampling: every rank holds the same tokens, equal to one process's;
    logprobs agree to fp32 rounding (assert_logprobs_close)."""
    reports = launch(tp * pp, tmp_path / "gen", "--tp", str(tp), "--pp", str(pp),
                     "--weights", str(hf_weights))
    for report in reports:
        for name in reference:
            assert report[name]["tokens"] == reference[name]["tokens"], name
        for name in RUNS:
            assert_logprobs_close(report[name]["logprobs"], reference[name]["logprobs"],
                                  what=name)


# ------------------------------------------------------------------ examples/bloom/generate_bloom.py
GENERATE = os.path.join(REPO_ROOT, "examples", "bloom", "generate_bloom.py")


@pytest.fixture(scope="module")
def checkpoint(corpus, tmp_path_factory):
    """A 3-iteration pretrain_bloom.py checkpoint (2 layers, hidden 64, seq 32, GPT-2 BPE),
    trained in this process by the trainer's pretrain() (what pretrain_bloom.py runs): no
    process to start, so the tests that only read it stay in the fast tier."""
    from ascendspeed import training
    from ascendspeed.arguments import PretrainConfig, parse_args

    save = tmp_path_factory.mktemp("generate") / "ckpt"
    args = parse_args(model_args(corpus, "--train-iters", "3", "--save", str(save)))
    result = training.pretrain(PretrainConfig.from_args(args, world_size=1), log=lambda line: None)
    assert result.iteration == 3 and (save / "latest_checkpointed_iteration.txt").read_text() == "3"
    return corpus[0], save


def generate_args(checkpoint, *extra):
    root, save = checkpoint
    return ["--load", str(save), "--use-checkpoint-args", "--tokenizer-type", "GPT2BPETokenizer",
            "--vocab-file", str(root / "vocab.json"), "--merge-file", str(root / "merges.txt"),
            "--max-new-tokens", "5", *extra]


@pytest.fixture(scope="module")
def generate_main():
    spec = importlib.util.spec_from_file_location("generate_bloom", GENERATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.multiprocess
def test_generate_script_end_to_end(checkpoint, generate_main, tmp_path, capsys):
    """--sample-input-file -> --sample-output-file JSON lines, in a batch of 2 with left padding
    (greedy: the same tokens as the prompt alone, streamed from --prompt); stdin when no prompt."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\n\nthe quick brown fox\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"
    result = run_python(GENERATE, generate_args(
        checkpoint, "--greedy", "--micro-batch-size", "2", "--sample-input-file", str(prompts),
        "--sample-output-file", str(output)), timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in records] == ["hello world", "the quick brown fox"]
    for record in records:
        assert set(record) == {"prompt", "text", "token_ids"}
        assert 0 < len(record["token_ids"]) <= 5 and record["text"] in result.stdout

    assert generate_main(generate_args(checkpoint, "--greedy", "--prompt", "hello world")) == 0
    streamed = capsys.readouterr().out
    from ascendspeed.data.tokenizer import GPT2BPETokenizer
    root = checkpoint[0]
    tokenizer = GPT2BPETokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    assert streamed == "hello world" + tokenizer.detokenize(records[0]["token_ids"]) + "\n"

    stdin = tmp_path / "stdin.txt"
    stdin.write_text("hello world\n", encoding="utf-8")
    with open(stdin, encoding="utf-8") as f:
        sys.stdin, saved = f, sys.stdin
        try:
            assert generate_main(generate_args(checkpoint, "--greedy")) == 0
        finally:
            sys.stdin = saved
    assert capsys.readouterr().out == streamed


@pytest.mark.parametrize("extra,message", [
    (("--max-new-tokens", "0"), "--max-new-tokens/--out-seq-length must be > 0"),
    (("--top_p", "1.5"), "--top_p must be in (0, 1]"),
    (("--top-k", "-1"), "--top_k must be >= 0"),
    (("--temperature", "0"), "--temperature must be > 0"),
    (("--prompt", "x" * 40), "prompt 1 ('xxxx"),
    (("--load", "/nonexistent/ckpt"), "--load /nonexistent/ckpt: no such directory"),
    (("--vocab-file", "/nonexistent/vocab.json"), "--vocab-file /nonexistent/vocab.json: file not found"),
    (("--sample-input-file", "BAD"), "line 2 is not valid UTF-8"),
    (("--sample-input-file", "/nonexistent/prompts.txt"), "cannot read"),
], ids=["max-new-tokens", "top-p", "top-k", "temperature", "prompt-too-long", "no-checkpoint",
        "no-tokenizer", "not-utf8", "no-prompt-file"])
def test_generate_script_bad_input(checkpoint, generate_main, tmp_path, capsys, extra, message):
    """One line on stderr naming the flag, file or prompt; exit status 2."""
    if "BAD" in extra:
        bad = tmp_path / "prompts.txt"
        bad.write_bytes(b"fine\n\xff\xfe not utf-8\n")
        extra = ("--sample-input-file", str(bad))
    argv = generate_args(checkpoint, *extra)
    if "--prompt" not in extra and "--sample-input-file" not in extra:
        argv += ["--prompt", "hello"]
    assert generate_main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith(" > ")]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    if "xxxx" in message:
        assert "has 40 tokens; the context (--seq-length) is 32" in err[0]


@pytest.mark.multiprocess
def test_7b1_generate_script_runs_on_a_tiny_checkpoint(checkpoint, tmp_path):
    """examples/bloom/generate_bloom_7b1.sh, published flags unchanged (TP from the environment):
    the checkpoint's shape and --layernorm-epsilon replace the 7B1 flags, fp16, --recompute."""
    from tokenizer_helpers import generated_docs, train_hf_tokenizer

    save = checkpoint[1]
    tokenizer_dir = train_hf_tokenizer(tmp_path / "hf_tokenizer", generated_docs(50), 300)
    # MASTER_PORT=0: the script's --master_port; the store binds a free port at run time
    env = launch_env(CHECKPOINT_PATH=str(save), TOKENIZER_PATH=tokenizer_dir, NPROC="1",
                     TP="1", BACKEND="gloo", MASTER_PORT="0")
    result = run_command(["bash", "examples/bloom/generate_bloom_7b1.sh", "--prompt", "hello",
                          "--max-new-tokens", "3"], env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout.startswith("hello")
    assert "--layernorm-epsilon: 1e-06 -> 1e-05" in result.stderr
    assert "--num-layers: 30 -> 2" in result.stderr


@pytest.mark.multiprocess
def test_generate_from_a_converted_hf_model_equals_hf_generate(checkpoint, tmp_path):
    """A random BloomForCausalLM through tools/convert_checkpoint.py (TP=2, release) and
    generate_bloom.py on 2 processes: greedy tokens equal HF `generate` on the same prompts."""
    import transformers

    from ascendspeed.data.tokenizer import GPT2BPETokenizer
    from test_convert_checkpoint import TO_OURS, converted

    root = checkpoint[0]
    tokenizer = GPT2BPETokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    config = transformers.BloomConfig(vocab_size=tokenizer.vocab_size + 3, hidden_size=HIDDEN,
                                      n_layer=LAYERS, n_head=HEADS)
    torch.manual_seed(5)
    model = transformers.BloomForCausalLM(config).eval()
    with torch.no_grad():  # away from HF's small init, so greedy does not repeat one token
        for name, param in model.named_parameters():
            if "word_embeddings.weight" not in name:
                param.add_(torch.randn_like(param) * 0.3)
    model.save_pretrained(tmp_path / "hf")
    converted(*TO_OURS, "--input", tmp_path / "hf", "--output", tmp_path / "ckpt",
              "--target-tp", 2)

    prompts = ["hello world", "the quick brown fox jumps"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"
    result = run_torchrun(
        GENERATE, generate_args((root, tmp_path / "ckpt"), "--greedy", "--micro-batch-size", "2",
                                "--tensor-model-parallel-size", "2", "--max-new-tokens", "8",
                                "--sample-input-file", str(tmp_path / "prompts.txt"),
                                "--sample-output-file", str(output)), 2, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in records] == prompts
    for record in records:
        ids = tokenizer.tokenize(record["prompt"])
        expected = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                  eos_token_id=tokenizer.eod, pad_token_id=tokenizer.eod)
        expected = expected[0, len(ids):].tolist()
        if tokenizer.eod in expected:  # ours stops there and leaves the EOS out
            expected = expected[:expected.index(tokenizer.eod)]
        assert record["token_ids"] == expected, record
