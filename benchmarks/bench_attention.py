"""Causal ALiBi attention, forward + backward: our fused kernel (ascendspeed.model.fused.alibi_attention)
vs F.scaled_dot_product_attention with the additive fp32 ALiBi + causal mask (the reference path
BloomModel uses today; that bias is built once, outside the timing, as the model shares it across
layers), same q/k/v (strided views of one qkv tensor, as in the model), threads.

    python benchmarks/bench_attention.py [--rounds 7 --threads 2] [--quick]

Rows: attention {fp32, bf16} seq512 (b=4, heads=8, hd=64) and seq2048 (b=1, heads=16, hd=64).
The two are timed alternately, round by round, so machine noise hits both alike (one warm-up
round each first); prints the median milliseconds of each and the ratio SDPA / fused.
`--quick`: a tiny smoke run (seq 128, 2 rounds).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ascendspeed.model import fused  # noqa: E402
from benchmarks.common import cpu_model  # noqa: E402
from ascendspeed.model.bloom import alibi_slopes  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(batch, heads, seq, head_dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, seq, heads, 3, head_dim, generator=generator).to(dtype).requires_grad_()
    grad = torch.randn(batch, seq, heads, head_dim, generator=generator).to(dtype)
    return qkv, grad


def step(fn, qkv, grad, slopes):
    qkv.grad = None
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(3))  # [b, heads, s, hd] views, as in the model
    context = fn(q, k, v, slopes)  # [b, s, heads, hd]
    context.backward(grad)


def bench_row(name, batch, heads, seq, head_dim, dtype, rounds):
    qkv, grad = make_inputs(batch, heads, seq, head_dim, dtype)
    slopes = alibi_slopes(heads)
    # The model builds its bias once per forward and shares it across layers: built outside the timing.
    bias = fused.alibi_bias(1, slopes, seq, seq)

    def sdpa(q, k, v, slopes):
        scale = 1.0 / math.sqrt(q.shape[-1])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale).transpose(1, 2)

    runs = {"fused": fused.alibi_attention, "sdpa": sdpa}
    times = {key: [] for key in runs}
    for r in range(rounds + 1):
        for key, fn in runs.items():
            start = time.perf_counter()
            step(fn, qkv, grad, slopes)
            if r > 0:  # the first round warms caches, allocators and kernel caches
                times[key].append(time.perf_counter() - start)
    ours, sdpa = (statistics.median(times[key]) * 1e3 for key in ("fused", "sdpa"))
    print(f"{name:<26} {ours:9.2f} {sdpa:9.2f} {sdpa / ours:7.2f}x   "
          f"(b={batch} h={heads} s={seq} hd={head_dim})", flush=True)
    return ours, sdpa


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not fused.fused_attention_available():
        raise SystemExit(f"fused attention kernel unavailable: {fused.kernel_info()}")
    print(f"CPU: {cpu_model()}, {args.threads} threads, torch {torch.__version__}, "
          f"kernel {fused.kernel_info()}, blocks {fused.BLOCK_Q}x{fused.BLOCK_K}")
    print(f"{'row (forward+backward)':<26} {'fused ms':>9} {'SDPA ms':>9} {'ratio':>8}")
    if args.quick:
        rows = [("attention fp32 seq128", 2, 4, 128, 64, "fp32"), ("attention bf16 seq128", 2, 4, 128, 64, "bf16")]
        rounds = 2
    else:
        rows = [("attention fp32 seq512", 4, 8, 512, 64, "fp32"), ("attention bf16 seq512", 4, 8, 512, 64, "bf16"),
                ("attention fp32 seq2048", 1, 16, 2048, 64, "fp32"),
                ("attention bf16 seq2048", 1, 16, 2048, 64, "bf16")]
        rounds = args.rounds
    for name, batch, heads, seq, head_dim, dtype in rows:
        bench_row(name, batch, heads, seq, head_dim, DTYPES[dtype], rounds)


if __name__ == "__main__":
    main()
