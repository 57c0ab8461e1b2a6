"""Per-rank memory of data-parallel training (DP=2, two CPU processes): plain DP vs ZeRO-1
(--use-distributed-optimizer), each with and without full activation recompute.

    python benchmarks/bench_memory.py [--layers 8 --hidden 512 --heads 8 --vocab 32000 \
        --micro-batch 2 --seq 256 --microbatches 2 --steps 2 --bf16]

Each configuration runs in fresh processes (torchrun, gloo): a few training steps of a BLOOM of
about 40M parameters through the gradient buffers and the (distributed) optimizer. Reported per
rank: peak RSS (getrusage; includes the interpreter, torch and activations) and the exact bytes of
model parameters + fp32 gradient buffers + optimizer state (fp32 master copies that are not the
model's own tensors, exp_avg, exp_avg_sq), measured from the tensors. Ratios are against plain DP
measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CONFIGS = {"dp2": dict(zero=False, recompute=False),
           "dp2 + recompute": dict(zero=False, recompute=True),
           "dp2 + zero1": dict(zero=True, recompute=False),
           "dp2 + zero1 + recompute": dict(zero=True, recompute=True)}


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from ascendspeed.core import parallel_state as ps
    from ascendspeed.core.tensor_parallel import model_parallel_seed
    from ascendspeed.model.bloom import BloomConfig, BloomModel
    from ascendspeed.optimizer import build_optimizer, get_param_groups

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(1, 1)
    model_parallel_seed(1234)
    setting = CONFIGS[args.config]
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = BloomModel(BloomConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
        num_attention_heads=args.heads, params_dtype=dtype,
        recompute_granularity="full" if setting["recompute"] else None)).train()
    optimizer = build_optimizer([model], get_param_groups(model, 0.1),
                                lambda groups: torch.optim.AdamW(groups, lr=1e-4),
                                params_dtype=dtype, clip_grad=1.0,
                                use_distributed_optimizer=setting["zero"])
    generator = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(args.steps):
        optimizer.zero_grad(args.microbatches)
        for _ in range(args.microbatches):
            ids = torch.randint(0, args.vocab, (args.micro_batch, args.seq + 1), generator=generator)
            loss = model(ids[:, :-1], labels=ids[:, 1:]).mean() / args.microbatches
            optimizer.scale_loss(loss).backward()
        optimizer.step()

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    params = nbytes(model.parameters())
    if setting["zero"]:  # the parameters live in (padded) flat buffers
        params = nbytes(b.param_data for b in optimizer.grads.buffers)
    grads = nbytes(b.grad_data for b in optimizer.grads.buffers)
    stepped = [p for g in optimizer.param_groups for p in g["params"]]
    masters = 0 if dtype == torch.float32 else nbytes(stepped)  # fp32 models step themselves
    state = nbytes(t for s in optimizer.optimizer.state.values() for t in s.values()
                   if torch.is_tensor(t) and t.dim() > 0)
    result = {"params": params, "grads": grads, "optimizer": masters + state,
              "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    with open(f"{args.out}.{dist.get_rank()}", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def run(config: str, args, out: str) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.abspath(__file__), "--worker", "--config", config, "--out", out]
    for name in ("layers", "hidden", "heads", "vocab", "micro_batch", "seq", "microbatches", "steps"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    command += ["--bf16"] if args.bf16 else []
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    if result.returncode:
        sys.exit(f"{config} failed:\n{result.stderr[-3000:]}")
    ranks = []
    for rank in range(2):
        with open(f"{out}.{rank}") as f:
            ranks.append(json.load(f))
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    mib = 2 ** 20
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, config in enumerate(CONFIGS):
            results[config] = run(config, args, os.path.join(tmp, f"run{i}"))
    base = results["dp2"]
    base_state = max(r["params"] + r["grads"] + r["optimizer"] for r in base)
    base_rss = max(r["peak_rss"] for r in base)
    print(f"BLOOM {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
          f"{'bf16' if args.bf16 else 'fp32'}; DP=2, {args.microbatches} micro-batches of "
          f"{args.micro_batch}x{args.seq}; per rank (max over the 2 ranks):")
    print(f"{'configuration':>24} | {'params':>8} | {'grads':>8} | {'optimizer':>9} | "
          f"{'p+g+o MiB':>9} | {'ratio':>5} | {'peak RSS MiB':>12} | {'ratio':>5}")
    for config, ranks in results.items():
        worst = max(ranks, key=lambda r: r["params"] + r["grads"] + r["optimizer"])
        state = worst["params"] + worst["grads"] + worst["optimizer"]
        rss = max(r["peak_rss"] for r in ranks)
        print(f"{config:>24} | {worst['params'] / mib:8.1f} | {worst['grads'] / mib:8.1f} | "
              f"{worst['optimizer'] / mib:9.1f} | {state / mib:9.1f} | {state / base_state:5.2f} | "
              f"{rss / mib:12.1f} | {rss / base_rss:5.2f}")


if __name__ == "__main__":
    main()
