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

    python benchmarks/bench_memory.py --layouts [--quick] [--layout NAME ...]

The equivalence-matrix layouts instead (tests/test_pipeline_parallel.py's matrix with
tests/test_pretrain.py's two-process layouts): each runs the real trainer (pretrain_bloom.py's
flags through training.pretrain, under torchrun, gloo, one thread per rank) for --train-iters 2
of a 4-layer BLOOM (hidden 512, padded vocab 32000, seq 256, micro-batch 2, global batch 8, fp32,
about 29M parameters; --quick: hidden 64, vocab 512, seq 32, one iteration), and reports each
rank's peak RSS (getrusage) and the bytes of its model parameters. The baseline of a layout is
plain data parallelism on the same number of processes (dp2 for the two-process layouts, dp4 for
the four-process ones), measured in the same run: ratio = baseline peak / layout peak, the max
over the ranks of each (so the plain-DP rows have ratio 1.0). Layouts that differ from another
only in communication (--no-overlap-grad-reduce, --ddp-bucket-size) are left out: their memory is
the same layout's.

    python benchmarks/bench_memory.py --bloom176b-scaled [--fp32]

BLOOM-176B's layout scaled down to run on a CPU: its vocabulary (250880, the embedding that
dominates a rank's parameters at small hidden sizes) and head dim (128), hidden 1024, 8 heads,
4 layers, TP=2 x PP=2 on 4 processes, bf16 (--fp32: fp32). Each rank's peak RSS (getrusage)
after the trainer's model build alone (training.initialize_distributed + build_model), and after
one training iteration of the real trainer (4 micro-batches of 1 x 128 through 1F1B).
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


# ------------------------------------------------------------------ the equivalence-matrix layouts
TP2, PP2 = ["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]
INTERLEAVED = ["--num-layers-per-virtual-pipeline-stage", "1"]
LAYOUTS = {  # name: (processes, pretrain_bloom.py flags)
    "dp2": (2, []),
    "dp2 zero1": (2, ["--use-distributed-optimizer"]),
    "tp2": (2, TP2),
    "tp2 recompute": (2, TP2 + ["--checkpoint-activations"]),
    "tp2 sequence-parallel": (2, TP2 + ["--sequence-parallel"]),
    "pp2": (2, PP2),
    "pp2 interleaved": (2, PP2 + INTERLEAVED),
    "dp4": (4, []),
    "pp2 dp2": (4, PP2),
    "tp2 dp2": (4, TP2),
    "tp2 pp2": (4, TP2 + PP2),
    "tp2 pp2 interleaved sequence-parallel": (4, TP2 + PP2 + INTERLEAVED + ["--sequence-parallel"]),
    "pp2 dp2 zero1 recompute": (4, PP2 + ["--use-distributed-optimizer", "--checkpoint-activations"]),
}
PLAIN_DP = {2: "dp2", 4: "dp4"}  # each layout's baseline: plain DP on as many processes


def baseline_layout(name: str) -> str:
    return PLAIN_DP[LAYOUTS[name][0]]


def layout_model_flags(corpus, quick: bool) -> list[str]:
    from benchmarks.bench_train_step import pretrain_flags

    if quick:
        return pretrain_flags(corpus, layers=4, hidden=64, heads=4, seq=32, micro_batch=2,
                              global_batch=8, vocab=512, train_iters=1, log_interval=1000)
    return pretrain_flags(corpus, layers=4, hidden=512, heads=8, seq=256, micro_batch=2,
                          global_batch=8, vocab=32000, train_iters=2, log_interval=1000)


def trainer_rank(out: str, flags: list[str]) -> None:
    """One torchrun rank: the real trainer on `flags`, then this rank's peak RSS and parameter
    bytes into `out`.RANK."""
    from ascendspeed.arguments import PretrainConfig, parse_args
    from ascendspeed.training import pretrain

    config = PretrainConfig.from_args(parse_args(flags), world_size=int(os.environ["WORLD_SIZE"]))
    report_rank(out, pretrain(config, log=lambda line: None).model)


def build_rank(out: str, flags: list[str]) -> None:
    """One torchrun rank: only the trainer's model build on `flags` (process groups, then
    training.build_model), then this rank's peak RSS and parameter bytes into `out`.RANK."""
    from ascendspeed.arguments import PretrainConfig, parse_args
    from ascendspeed.data.tokenizer import build_tokenizer
    from ascendspeed.training import build_model, initialize_distributed, padded_vocab_size

    config = PretrainConfig.from_args(parse_args(flags), world_size=int(os.environ["WORLD_SIZE"]))
    initialize_distributed(config)
    padded_vocab = padded_vocab_size(config, build_tokenizer(config.tokenizer))
    report_rank(out, build_model(config, padded_vocab))


def report_rank(out: str, model_chunks) -> None:
    import torch.distributed as dist

    params = sum(p.numel() * p.element_size() for chunk in model_chunks for p in chunk.parameters())
    rank = dist.get_rank() if dist.is_initialized() else 0
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                   "params": params}, f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_layout(name: str, model_flags: list[str], out: str, timeout: float = 900) -> list[dict]:
    """Peak RSS and parameter bytes of each rank of `name`, from fresh torchrun processes."""
    nproc, extra = LAYOUTS[name]
    return run_ranks(nproc, "--trainer-rank", [*model_flags, *extra], out, name, timeout)


def run_ranks(nproc: int, entry: str, flags: list[str], out: str, name: str,
              timeout: float = 900) -> list[dict]:
    """Each rank's report of `entry` (--trainer-rank or --build-rank) on `flags`, from fresh
    torchrun processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", os.path.abspath(__file__), entry, out, "--", *flags]
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=timeout)
    if result.returncode:
        raise RuntimeError(f"memory layout {name} failed:\n{result.stdout[-2000:]}\n"
                           f"{result.stderr[-3000:]}")
    ranks = []
    for rank in range(nproc):
        with open(f"{out}.{rank}") as f:
            ranks.append(json.load(f))
    return ranks


def measure_layouts(names, quick: bool = False, with_baselines: bool = True) -> dict[str, list[dict]]:
    """Per-rank results of each layout in `names` (and of their plain-DP baselines)."""
    from benchmarks.bench_train_step import write_corpus

    wanted = list(dict.fromkeys(([baseline_layout(n) for n in names] if with_baselines else [])
                                + list(names)))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        flags = layout_model_flags(write_corpus(tmp), quick)
        for i, name in enumerate(wanted):
            results[name] = run_layout(name, flags, os.path.join(tmp, f"layout{i}"))
    return results


# BLOOM-176B: 70 layers, hidden 14336, 112 heads (head dim 128), padded vocab 250880.
BLOOM_176B_SCALED = dict(layers=4, hidden=1024, heads=8, vocab=250880, seq=128, micro_batch=1,
                         global_batch=4)


def measure_bloom176b_scaled(bf16: bool = True) -> dict[str, list[dict]]:
    """Per-rank reports of the scaled-down 176B layout (TP=2 x PP=2): "build" (the model build
    alone) and "iteration" (the trainer through one iteration)."""
    from benchmarks.bench_train_step import pretrain_flags, write_corpus

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        flags = pretrain_flags(write_corpus(tmp), train_iters=1, log_interval=1000, bf16=bf16,
                               **BLOOM_176B_SCALED) + TP2 + PP2
        for i, (what, entry) in enumerate((("build", "--build-rank"),
                                           ("iteration", "--trainer-rank"))):
            results[what] = run_ranks(4, entry, flags, os.path.join(tmp, f"bloom{i}"),
                                      f"bloom176b-scaled {what}")
    return results


def print_bloom176b_scaled(results: dict[str, list[dict]], bf16: bool) -> None:
    mib = 2 ** 20
    shape = BLOOM_176B_SCALED
    print(f"BLOOM-176B scaled: {shape['layers']} layers, hidden {shape['hidden']}, "
          f"{shape['heads']} heads, vocab {shape['vocab']}, TP=2 x PP=2, "
          f"{'bf16' if bf16 else 'fp32'}; peak RSS MiB per rank (params MiB)")
    for what, ranks in results.items():
        cells = "  ".join(f"rank {r}: {x['peak_rss'] / mib:7.1f} ({x['params'] / mib:6.1f})"
                          for r, x in enumerate(ranks))
        print(f"{what:>10} | {cells}")


def print_layouts(results: dict[str, list[dict]]) -> None:
    mib = 2 ** 20
    print(f"{'layout':>40} | {'procs':>5} | {'params MiB':>10} | {'peak RSS MiB':>12} | "
          f"{'plain DP':>8} | {'ratio':>5}")
    for name, ranks in results.items():
        base = results.get(baseline_layout(name))
        peak = max(r["peak_rss"] for r in ranks)
        base_peak = max(r["peak_rss"] for r in base) if base else float("nan")
        print(f"{name:>40} | {len(ranks):>5} | {max(r['params'] for r in ranks) / mib:10.1f} | "
              f"{peak / mib:12.1f} | {base_peak / mib:8.1f} | {base_peak / peak:5.2f}")


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
    parser.add_argument("--layouts", action="store_true",
                        help="the equivalence-matrix layouts through the real trainer instead")
    parser.add_argument("--layout", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS),
                        help="with --layouts: these only (and their plain-DP baselines)")
    parser.add_argument("--quick", action="store_true", help="with --layouts: a tiny model")
    parser.add_argument("--bloom176b-scaled", action="store_true",
                        help="the scaled-down BLOOM-176B layout's per-rank peaks instead")
    parser.add_argument("--fp32", action="store_true", help="with --bloom176b-scaled: fp32")
    for entry, rank_main in (("--trainer-rank", trainer_rank), ("--build-rank", build_rank)):
        if entry in sys.argv:  # a torchrun rank: ENTRY OUT -- FLAGS
            i = sys.argv.index(entry)
            return rank_main(sys.argv[i + 1], sys.argv[sys.argv.index("--") + 1:])
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.bloom176b_scaled:
        return print_bloom176b_scaled(measure_bloom176b_scaled(not args.fp32), not args.fp32)
    if args.layouts:
        return print_layouts(measure_layouts(args.layout, args.quick))

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
