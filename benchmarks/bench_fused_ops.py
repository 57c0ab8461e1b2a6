"""The fused elementwise ops and the optimizer step against their references, forward + backward,
at the train-step config's shapes (micro-batch 4 x seq 512, hidden 512, MLP 2048, vocab 5120):

- `bias_gelu fp32|bf16`: ascendspeed.model.bias_gelu (ATen's tanh GeLU, saving only its input)
  vs the written-out BLOOM formula after the bias add (bloom.bloom_gelu(y + b));
- `cross entropy fp32|bf16`: the chunked vocab-parallel cross entropy (no fp32 copy of the logits)
  vs the reference (fp32 logits, softmax saved);
- `optimizer step`: fused AdamW + the one-kernel unscale/inf check vs foreach AdamW + the
  per-gradient check, over the 6-layer model's parameter sizes (fp32 master weights).

    python benchmarks/bench_fused_ops.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import alternate, median, row  # noqa: E402
from ascendspeed.core.tensor_parallel.cross_entropy import (  # noqa: E402
    reference_vocab_parallel_cross_entropy, vocab_parallel_cross_entropy)
from ascendspeed.model.bias_gelu import bias_gelu  # noqa: E402
from ascendspeed.model.bloom import bloom_gelu  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _forward_backward(function, *inputs):
    leaves = [x.detach().requires_grad_() for x in inputs]

    def run():
        out = function(*leaves)
        out.backward(torch.ones_like(out))
        for leaf in leaves:
            leaf.grad = None
    return run


def bias_gelu_row(dtype_name: str, quick: bool = False) -> dict:
    dtype = DTYPES[dtype_name]
    tokens, ffn = (256, 512) if quick else (4 * 512, 2048)
    y = torch.randn(tokens, ffn).to(dtype)
    bias = torch.randn(ffn).to(dtype)
    times = alternate({"ours": _forward_backward(bias_gelu, y, bias),
                       "reference": _forward_backward(lambda a, b: bloom_gelu(a + b), y, bias)},
                      rounds=3 if quick else 15)
    return row(f"bias_gelu {dtype_name}", 1000 * median(times["ours"]),
               1000 * median(times["reference"]), "ms", detail=f"[{tokens}, {ffn}] fwd+bwd")


def cross_entropy_row(dtype_name: str, quick: bool = False) -> dict:
    dtype = DTYPES[dtype_name]
    tokens, vocab = (256, 1024) if quick else (4 * 512, 5120)
    logits = torch.randn(tokens, vocab).to(dtype)
    target = torch.randint(0, vocab, (tokens,))
    times = alternate({
        "ours": _forward_backward(lambda x: vocab_parallel_cross_entropy(x, target), logits),
        "reference": _forward_backward(lambda x: reference_vocab_parallel_cross_entropy(x, target),
                                       logits)}, rounds=3 if quick else 15)
    return row(f"cross entropy {dtype_name}", 1000 * median(times["ours"]),
               1000 * median(times["reference"]), "ms",
               detail=f"[{tokens}, {vocab}] logits fwd+bwd, TP=1")


def optimizer_row(quick: bool = False) -> dict:
    """Fused AdamW + fused unscale/inf check vs foreach AdamW + per-gradient check (the steps'
    own work: the gradient buffers and masters already exist)."""
    layers, hidden, vocab = (1, 128, 1024) if quick else (6, 512, 5120)
    shapes = [(vocab, hidden)] + [(3 * hidden, hidden), (3 * hidden,), (hidden, hidden), (hidden,),
                                  (4 * hidden, hidden), (4 * hidden,), (hidden, 4 * hidden),
                                  (hidden,), (hidden,), (hidden,), (hidden,), (hidden,)] * layers

    def make(fused: bool):
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
        for p in params:
            p.grad = torch.randn(p.shape)
        optimizer = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if fused else
                                                          {"foreach": True}))
        grads = [p.grad for p in params]
        found, inverse = torch.zeros(1), torch.ones(1)

        def step():
            if fused:
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inverse)
            else:
                flag = torch.zeros(1)
                for grad in grads:
                    flag = torch.maximum(flag, (~torch.isfinite(grad)).any().float())
            optimizer.step()
        return step

    times = alternate({"ours": make(True), "reference": make(False)}, rounds=3 if quick else 15)
    count = sum(torch.Size(s).numel() for s in shapes)
    return row("optimizer step", 1000 * median(times["ours"]), 1000 * median(times["reference"]),
               "ms", detail=f"{count / 1e6:.1f} M fp32 parameters, AdamW + inf check")


def rows(quick: bool = False) -> list[dict]:
    return [bias_gelu_row("fp32", quick), bias_gelu_row("bf16", quick),
            cross_entropy_row("fp32", quick), cross_entropy_row("bf16", quick),
            optimizer_row(quick)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for result in rows(args.quick):
        print(f"{result['name']:>20}: ours {result['ours']:8.2f} {result['unit']}  reference "
              f"{result['baseline']:8.2f}  ratio {result['ratio']:.2f}x  ({result['detail']})")


if __name__ == "__main__":
    main()
