"""Generation throughput of our KV-cache decoding (generate_tokens) vs Hugging Face
BloomForCausalLM.generate on the same model, batch, threads and length, greedy, one process.

    python benchmarks/bench_generation.py [--layers 6 --hidden 768 --heads 12 --vocab 32000 \
        --prompt-lengths 16,32,48,64 --new-tokens 64 --repeats 4 --threads 2 --dtype fp32]

A random BloomForCausalLM of a small but realistic shape; our BloomModel (TP=1) gets the same
weights through shard_from_hf. The batch is left-padded (prompts of different lengths, with an
attention mask); both generate exactly --new-tokens per prompt (no EOS). The two are run
alternately (the order reversed every other round), --repeats times after one warm-up each, so
machine noise hits both alike; the median time of each gives tokens/s (batch x new tokens /
seconds). Greedy tokens must be the same for
both: in fp32 the run fails if they differ; in bf16 (where the two round differently) the share of
identical tokens is printed.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ascendspeed.generation import SamplingParams, StageRunner, generate_tokens  # noqa: E402
from ascendspeed.generation.generate import left_pad  # noqa: E402
from ascendspeed.model.bloom import BloomConfig, BloomModel  # noqa: E402
from ascendspeed.checkpoint.hf import shard_from_hf  # noqa: E402
from benchmarks.common import alternate, median  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measure_generation(*, layers=6, hidden=768, heads=12, vocab=32000, prompt_lengths=(16, 32, 48, 64),
                       new_tokens=64, repeats=4, dtype="fp32") -> dict:
    """Our generate_tokens and HF generate on the same model and prompts, run alternately
    (`repeats` timed runs each after one warm-up): median seconds, tokens per second
    (batch x new tokens / seconds) and how many greedy tokens agree."""
    import transformers

    torch_dtype = DTYPES[dtype]
    hf_config = transformers.BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=layers,
                                         n_head=heads, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    hf = transformers.BloomForCausalLM(hf_config).eval()
    config = BloomConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                         num_attention_heads=heads, params_dtype=torch_dtype)
    ours = BloomModel(config)
    ours.load_state_dict(shard_from_hf(hf.state_dict(), config, 0, 1))
    hf.to(torch_dtype)
    hf.generation_config.eos_token_id = None  # always the full length
    runner = StageRunner(ours, vocab)

    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, vocab, (n,), generator=generator).tolist() for n in prompt_lengths]
    ids, mask = left_pad(prompts, 0, "cpu")
    new = new_tokens
    tokens = {}

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                              min_new_tokens=new, pad_token_id=0)
        tokens["hf"] = out[:, ids.shape[1]:].tolist()

    def run_ours():
        results = generate_tokens(runner, prompts, max_new_tokens=new,
                                  sampling=SamplingParams(greedy=True))
        tokens["ascendspeed"] = [r.token_ids for r in results]

    seconds = alternate({"hf": run_hf, "ascendspeed": run_ours}, repeats, warmup=1)
    same = sum(a == b for x, y in zip(tokens["hf"], tokens["ascendspeed"]) for a, b in zip(x, y))
    total = len(prompts) * new
    assert all(len(t) == new for t in tokens["hf"] + tokens["ascendspeed"]), "a short generation"
    med = {name: median(s) for name, s in seconds.items()}
    return {"seconds": seconds, "median": med, "tokens_per_s": {k: total / v for k, v in med.items()},
            "same": same, "total": total}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt-lengths", default="16,32,48,64",
                        help="comma-separated: one prompt of each length (the batch)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    r = measure_generation(layers=args.layers, hidden=args.hidden, heads=args.heads,
                           vocab=args.vocab,
                           prompt_lengths=[int(n) for n in args.prompt_lengths.split(",")],
                           new_tokens=args.new_tokens, repeats=args.repeats, dtype=args.dtype)
    for name in ("hf", "ascendspeed"):
        spread = ", ".join(f"{s:.2f}" for s in r["seconds"][name])
        print(f"{name:>12}: {r['tokens_per_s'][name]:8.1f} tokens/s  (median {r['median'][name]:.2f} s; "
              f"runs {spread})")
    print(f"same greedy tokens: {r['same']}/{r['total']}")
    print(f"ratio ours/HF tokens/s: {r['median']['hf'] / r['median']['ascendspeed']:.2f}x "
          f"({args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab {args.vocab}, "
          f"prompts {args.prompt_lengths} left-padded, {args.new_tokens} new tokens, greedy, {args.dtype}, "
          f"{args.threads} threads, median of {args.repeats})")
    if args.dtype == "fp32" and r["same"] != r["total"]:
        sys.exit("greedy tokens differ from Hugging Face's in fp32")


if __name__ == "__main__":
    main()
