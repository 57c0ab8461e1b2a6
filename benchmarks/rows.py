"""The rows of `python -m benchmarks`, each a function of a shared Context (measurements that
several rows use, such as a training run that both `train fp32` and `mfu fp32` read, are made
once and kept). Every row measures ours and its baseline in this process (or in processes it
starts), alternating, after a warm-up, medians; `--quick` shrinks every row to a smoke run.
"""
from __future__ import annotations

import json
import os
import random
import tempfile

import torch

from benchmarks.common import format_profile, median, profile_top, row

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Context:
    def __init__(self, quick: bool, threads: int, profile: bool = False, log=print):
        self.quick, self.threads, self.profile, self.log = quick, threads, profile, log
        self._memo: dict = {}

    def once(self, key, fn):
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]


# ------------------------------------------------------------------------------ training
# name: (dtype, seq, micro-batch, target ratio HF / ours)
TRAIN = {"train fp32": ("fp32", 512, 4, 1.3), "train bf16": ("bf16", 512, 4, 1.5),
         "train fp32 seq2048": ("fp32", 2048, 1, 1.3), "train bf16 seq2048": ("bf16", 2048, 1, 1.5)}
TRAIN_MODEL = dict(layers=6, hidden=512, heads=8, vocab=5120)
TRAIN_QUICK_MODEL = dict(layers=2, hidden=64, heads=4, vocab=512)


def train_shape(ctx: Context, name: str) -> dict:
    dtype, seq, micro_batch, _ = TRAIN[name]
    if ctx.quick:
        return dict(TRAIN_QUICK_MODEL, seq=128 if seq > 512 else 64,
                    micro_batch=1 if seq > 512 else 2, bf16=dtype == "bf16")
    return dict(TRAIN_MODEL, seq=seq, micro_batch=micro_batch, bf16=dtype == "bf16")


def measure_train_row(ctx: Context, name: str) -> dict:
    def run():
        from benchmarks.bench_train_step import TrainBench

        shape = train_shape(ctx, name)
        bench = TrainBench(**shape)
        try:
            r = bench.measure(rounds=2 if ctx.quick else 5, warmup=1)
            r.update(shape=shape, config=bench.config, padded_vocab=bench.padded_vocab,
                     global_batch=bench.global_batch)
            if ctx.profile or not ctx.quick:  # after the timing: one more step of ours
                r["profile"] = profile_top(bench.ours_step)
            return r
        finally:
            bench.close()
    return ctx.once(("train", name), run)


def train_row(ctx: Context, name: str) -> dict:
    r = measure_train_row(ctx, name)
    s = r["shape"]
    ours_loss, hf_loss = r["first_losses"]
    detail = (f"{s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads, vocab "
              f"{r['padded_vocab']}, batch {s['micro_batch']}x{s['seq']}, "
              f"{'bf16 (HF: fp32 weights + autocast)' if s['bf16'] else 'fp32'}; "
              f"tokens/s ours {s['micro_batch'] * s['seq'] / r['ours_s']:.0f}, "
              f"HF {s['micro_batch'] * s['seq'] / r['hf_s']:.0f}; first loss ours {ours_loss:.5f}, "
              f"HF {hf_loss:.5f}")
    out = row(name, r["ours_s"] * 1e3, r["hf_s"] * 1e3, "ms/iteration", target=TRAIN[name][3],
              detail=detail)
    if "profile" in r:
        out["profile"] = r["profile"]
        ctx.log(f"  profile of our step ({name}), top ops by self CPU time:\n"
                f"{format_profile(r['profile'])}")
    return out


# ------------------------------------------------------------------------------ MFU
def gemm_rate(ctx: Context, dtype: str, m: int, k: int, n: int) -> float:
    """FLOP/s of an [m, k] x [k, n] matmul in `dtype` at this process's threads: the median
    of 9 timed samples (each several products into a preallocated output) after a warm-up."""
    def run():
        import time

        generator = torch.Generator().manual_seed(0)
        a = torch.randn(m, k, generator=generator).to(DTYPES[dtype])
        b = torch.randn(k, n, generator=generator).to(DTYPES[dtype])
        c = torch.empty(m, n, dtype=DTYPES[dtype])
        flop = 2.0 * m * k * n
        reps = max(1, int(2e9 // flop))  # about 2 GFLOP per sample
        for _ in range(3):
            torch.mm(a, b, out=c)
        samples = []
        for _ in range(9):
            start = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=c)
            samples.append((time.perf_counter() - start) / reps)
        return flop / median(samples)
    return ctx.once(("gemm", dtype, m, k, n), run)


def mfu_row(ctx: Context, name: str) -> dict:
    from ascendspeed.training_log import model_flops_per_iteration

    dtype = name.split()[1]
    r = measure_train_row(ctx, f"train {dtype}")
    config, s = r["config"], r["shape"]
    flops = model_flops_per_iteration(config.model, r["global_batch"], config.model.seq_length,
                                      r["padded_vocab"])
    achieved = flops / r["ours_s"]
    m, k, n = s["micro_batch"] * s["seq"], s["hidden"], 4 * s["hidden"]
    peak = gemm_rate(ctx, dtype, m, k, n)
    fraction = achieved / peak
    detail = (f"model FLOPs {flops / 1e9:.1f} GFLOP/iteration / our {r['ours_s'] * 1e3:.0f} ms = "
              f"{achieved / 1e9:.1f} GFLOP/s; GEMM [{m}, {k}] x [{k}, {n}] {dtype} "
              f"{peak / 1e9:.1f} GFLOP/s")
    return row(name, fraction, 1.0, "fraction of GEMM peak", target=0.5, detail=detail,
               ratio=fraction, target_text=">= 0.5")


# ------------------------------------------------------------------------------ attention
# name: (batch, heads, seq, head_dim, dtype, target)
ATTENTION = {"attention fp32 seq512": (4, 8, 512, 64, "fp32", 1.5),
             "attention bf16 seq512": (4, 8, 512, 64, "bf16", 1.5),
             "attention fp32 seq2048": (1, 16, 2048, 64, "fp32", 2.0),
             "attention bf16 seq2048": (1, 16, 2048, 64, "bf16", 2.0)}


def attention_row(ctx: Context, name: str) -> dict:
    from ascendspeed.model import fused
    from benchmarks.bench_attention import bench_row

    if not fused.fused_attention_available():
        raise RuntimeError(f"fused attention kernel unavailable: {fused.kernel_info()}")
    batch, heads, seq, head_dim, dtype, target = ATTENTION[name]
    if ctx.quick:
        batch, heads, seq = 2, 4, 128
    ours, sdpa = bench_row(name, batch, heads, seq, head_dim, DTYPES[dtype], 2 if ctx.quick else 7)
    return row(name, ours, sdpa, "ms", target=target,
               detail=f"forward+backward, b={batch} h={heads} s={seq} hd={head_dim} {dtype}; "
                      f"baseline SDPA + fp32 ALiBi/causal bias; kernel {fused.kernel_info()}")


# ------------------------------------------------------------------------------ generation
def generation_row(ctx: Context, name: str) -> dict:
    from benchmarks.bench_generation import measure_generation

    dtype = name.split()[1]
    if ctx.quick:
        shape = dict(layers=2, hidden=64, heads=4, vocab=512, prompt_lengths=(4, 8), new_tokens=8,
                     repeats=2)
    else:
        shape = dict(layers=6, hidden=768, heads=12, vocab=32000, prompt_lengths=(16, 32, 48, 64),
                     new_tokens=64, repeats=4)
    r = measure_generation(dtype=dtype, **shape)
    ours, hf = r["tokens_per_s"]["ascendspeed"], r["tokens_per_s"]["hf"]
    out = row(name, ours, hf, "tokens/s", target=2.0,
              detail=f"{shape['layers']} layers, hidden {shape['hidden']}, {shape['heads']} heads, "
                     f"vocab {shape['vocab']}, prompts {shape['prompt_lengths']} left-padded, "
                     f"{shape['new_tokens']} new tokens, greedy, {dtype}; same greedy tokens "
                     f"{r['same']}/{r['total']}")
    if dtype == "fp32" and r["same"] != r["total"]:
        raise RuntimeError(f"greedy tokens differ from Hugging Face's in fp32 "
                           f"({r['same']}/{r['total']})")
    return out


# ------------------------------------------------------------------------------ data
def index_build_row(ctx: Context, name: str) -> dict:
    from benchmarks.bench_index_build import measure_index_build

    shape = (dict(docs=10_000, tokens=10_000_000, epochs=3, seq_length=2048) if ctx.quick else
             dict(docs=10_000_000, tokens=10_000_000_000, epochs=3, seq_length=2048))
    r = measure_index_build(rounds=1 if ctx.quick else 3, **shape)
    ours = median(x["seconds"] for x in r["ascendspeed"])
    base = median(x["seconds"] for x in r["numpy"])
    peak = {k: max(x["peak_gib"] for x in r[k]) for k in ("ascendspeed", "numpy")}
    return row(name, ours, base, "s",
               detail=f"{shape['docs']:,} documents, {shape['tokens']:,} tokens, "
                      f"{r['num_samples']:,} samples of seq {shape['seq_length']} "
                      f"({shape['epochs']} epochs), doc/sample/shuffle idx + .npy saves, one "
                      f"thread, fresh processes; baseline: Megatron-DeepSpeed's steps in numpy; "
                      f"peak RSS ours {peak['ascendspeed']:.2f} GiB, numpy {peak['numpy']:.2f} GiB")


def _synthetic_corpus(root: str, docs: int = 200) -> tuple[str, str]:
    """A tiny JSON-lines corpus of random words and a BPE tokenizer trained on it (--quick)."""
    from tools import train_tokenizer

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 8)))
             for _ in range(500)]
    corpus = os.path.join(root, "corpus.jsonl")
    with open(corpus, "w") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(100))}) + "\n")
    tokenizer_dir = os.path.join(root, "tokenizer")
    assert train_tokenizer.main(["--input", corpus, "--vocab-size", "400",
                                 "--output-dir", tokenizer_dir]) == 0
    return corpus, tokenizer_dir


def preprocess_row(ctx: Context, name: str) -> dict:
    from benchmarks.bench_preprocess import ensure_sample, measure_preprocess

    base_name, ours_name = "per-document tokenize() loop + builder", "preprocess_data --workers 1"
    one_thread = "preprocess_data --workers 1, one thread"
    with tempfile.TemporaryDirectory() as tmp:
        if ctx.quick:
            corpus, tokenizer_dir = _synthetic_corpus(tmp)
            what = "synthetic 200 documents, tokenizer of 400"
        else:  # the quick-start sample: Shakespeare, a tokenizer of 8000 trained on it
            corpus = os.path.join(tmp, "shakespeare.jsonl")
            tokenizer_dir = os.path.join(tmp, "tokenizer")
            ensure_sample(corpus, tokenizer_dir)
            what = "Shakespeare sample corpus, tokenizer of 8000"
        with open(corpus, "rb") as f:
            docs = sum(1 for _ in f)
        size = os.path.getsize(corpus)
        times = measure_preprocess(corpus, tokenizer_dir, 1 if ctx.quick else 3,
                                   (base_name, ours_name, one_thread))
    ours, base, single = (median(times[k]) for k in (ours_name, base_name, one_thread))
    return row(name, ours, base, "s",
               detail=f"{what} ({docs} documents, {size / 1e6:.2f} MB), --append-eod, tokenizer "
                      f"load included, byte-identical outputs; ours = {ours_name} "
                      f"({size / ours / 1e6:.2f} MB/s); one thread {single:.2f} s "
                      f"({base / single:.2f}x)")


# ------------------------------------------------------------------------------ memory
def memory_row(ctx: Context, name: str) -> dict:
    from benchmarks import bench_memory

    layout = name[len("memory "):]
    baseline = bench_memory.baseline_layout(layout)

    base_ranks = ctx.once(("memory", baseline), lambda: _one_layout(ctx, baseline))
    ranks = ctx.once(("memory", layout), lambda: _one_layout(ctx, layout))
    mib = 2 ** 20
    peak = max(r["peak_rss"] for r in ranks) / mib
    base_peak = max(r["peak_rss"] for r in base_ranks) / mib
    params = max(r["params"] for r in ranks) / mib
    model = ("quick model (4 layers, hidden 64)" if ctx.quick else
             "4 layers, hidden 512, vocab 32000, seq 256, micro-batch 2, global 8, fp32")
    return row(name, peak, base_peak, "MiB",
               detail=f"peak RSS per rank (max over {len(ranks)} ranks), real trainer, {model}; "
                      f"baseline {baseline} (plain DP, as many processes); params "
                      f"{params:.1f} MiB/rank")


def _one_layout(ctx: Context, layout: str) -> list[dict]:
    from benchmarks import bench_memory

    return bench_memory.measure_layouts([layout], quick=ctx.quick, with_baselines=False)[layout]


def _memory_rows() -> dict:
    from benchmarks.bench_memory import LAYOUTS

    return {f"memory {layout}": memory_row for layout in LAYOUTS}


# ------------------------------------------------------------------------------ fused ops
def _fused_op_rows() -> dict:
    """benchmarks/bench_fused_ops.py's rows, where that script is there (no targets)."""
    import importlib.util

    if importlib.util.find_spec("benchmarks.bench_fused_ops") is None:
        return {}

    def fused_op_row(ctx: Context, name: str) -> dict:
        from benchmarks import bench_fused_ops

        if name == "optimizer step":
            return bench_fused_ops.optimizer_row(ctx.quick)
        kind, dtype = name.rsplit(" ", 1)
        make = bench_fused_ops.bias_gelu_row if kind == "bias_gelu" else bench_fused_ops.cross_entropy_row
        return make(dtype, ctx.quick)

    names = ["bias_gelu fp32", "bias_gelu bf16", "cross entropy fp32", "cross entropy bf16",
             "optimizer step"]
    return {name: fused_op_row for name in names}


# ------------------------------------------------------------------------------ the table
def all_rows() -> dict:
    """Row name -> function(ctx, name) -> row dict, in table order."""
    rows = {}
    rows.update({name: train_row for name in TRAIN})
    rows.update({"mfu fp32": mfu_row, "mfu bf16": mfu_row})
    rows.update({name: attention_row for name in ATTENTION})
    rows.update(_fused_op_rows())
    rows.update({"generation fp32": generation_row, "generation bf16": generation_row})
    rows.update({"index build": index_build_row, "preprocess": preprocess_row})
    rows.update(_memory_rows())
    return rows
