"""Training-step throughput of our BloomModel vs Hugging Face BloomForCausalLM, same weights,
config, batch, threads and optimizer (AdamW), fp32, one process.

    python benchmarks/bench_train_step.py [--layers 4 --hidden 512 --heads 8 --vocab 32000 \
        --batch 4 --seq 512 --steps 6 --threads 2]

Both models are timed alternately, step by step, so machine noise hits both alike. Prints tokens/s
for each and the ratio ours / HF.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ascendspeed.model.bloom import BloomConfig, BloomModel  # noqa: E402
from ascendspeed.checkpoint.hf import shard_from_hf  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    hf_config = transformers.BloomConfig(vocab_size=args.vocab, hidden_size=args.hidden, n_layer=args.layers,
                                         n_head=args.heads, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    hf = transformers.BloomForCausalLM(hf_config).train()
    config = BloomConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                         num_attention_heads=args.heads)
    ours = BloomModel(config).train()
    ours.load_state_dict(shard_from_hf(hf.state_dict(), config, 0, 1))
    data = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))

    def hf_step(optimizer):
        loss = hf(data[:, :-1], labels=data[:, :-1]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def our_step(optimizer):
        loss = ours(data[:, :-1], labels=data[:, 1:]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    runs = {"hf": (hf_step, torch.optim.AdamW(hf.parameters(), lr=1e-4)),
            "ascendspeed": (our_step, torch.optim.AdamW(ours.parameters(), lr=1e-4))}
    seconds = {name: 0.0 for name in runs}
    for step in range(args.steps + 1):
        for name, (fn, optimizer) in runs.items():
            start = time.perf_counter()
            fn(optimizer)
            if step > 0:  # the first step warms caches and allocators
                seconds[name] += time.perf_counter() - start
    tokens = args.batch * args.seq * args.steps
    for name in runs:
        print(f"{name:>12}: {tokens / seconds[name]:8.1f} tokens/s")
    print(f"ratio ascendspeed / hf: {seconds['hf'] / seconds['ascendspeed']:.2f}x "
          f"({args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab {args.vocab}, "
          f"batch {args.batch}x{args.seq}, fp32, {args.threads} threads)")


if __name__ == "__main__":
    main()
