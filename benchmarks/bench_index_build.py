"""Index building for a BLOOM-scale shard: ascendspeed vs a straightforward numpy implementation.

    python benchmarks/bench_index_build.py [--docs 10000000 --tokens 10000000000 --epochs 3 --seq-length 2048]

A synthetic `.idx` (only the sizes matter; the `.bin` is a sparse file) is built once; then each
implementation runs in a fresh process, building doc_idx / sample_idx / shuffle_idx and saving them
as .npy caches, and reports wall time and peak RSS. Prints the ratio baseline / ascendspeed.
With --rounds N each runs N times, alternating, and the median time is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_shard(prefix: str, docs: int, tokens: int) -> None:
    from megatron_ext.indexed_dataset import write_index

    rng = np.random.RandomState(0)
    mean = tokens // docs
    sizes = rng.randint(1, 2 * mean, size=docs).astype(np.int32)
    sizes[-1] += tokens - int(sizes.sum(dtype=np.int64))  # exactly `tokens` in all
    with open(prefix + ".idx", "wb") as f:
        write_index(f, np.uint16, sizes, np.arange(docs + 1))
    with open(prefix + ".bin", "wb") as f:
        f.truncate(2 * tokens)  # sparse: the token bytes are never read


def num_samples_for(tokens: int, epochs: int, seq_length: int) -> int:
    """A request that needs exactly `epochs` epochs (half-way into the last one)."""
    per_epoch = (tokens - 1) // seq_length
    return (epochs - 1) * per_epoch + per_epoch // 2


def run_ascendspeed(prefix, num_samples, seq_length, cache_dir):
    from ascendspeed.data.gpt_dataset import build_index_mappings
    from megatron_ext.indexed_dataset import MMapIndexedDataset

    sizes = MMapIndexedDataset(prefix).sizes
    documents = np.arange(len(sizes), dtype=np.int32)
    rss_before = peak_rss_gib()
    start = time.perf_counter()
    build_index_mappings("train", prefix, documents, sizes, num_samples, seq_length, 1234,
                         data_cache_path=cache_dir)
    return time.perf_counter() - start, rss_before


def run_numpy_baseline(prefix, num_samples, seq_length, cache_dir):
    """The steps as Megatron-DeepSpeed writes them in Python: mgrid doc_idx, RandomState.shuffle,
    a numpy sample index (cumsum + searchsorted), np.save."""
    from megatron_ext.indexed_dataset import MMapIndexedDataset

    sizes = MMapIndexedDataset(prefix).sizes
    documents = np.arange(len(sizes), dtype=np.int32)
    rss_before = peak_rss_gib()
    start = time.perf_counter()
    tokens = int(np.sum(sizes[documents], dtype=np.int64))
    epochs = 1
    while (epochs * tokens - 1) // seq_length < num_samples:
        epochs += 1
    before_last = ((epochs - 1) * tokens - 1) // seq_length
    per_epoch = (tokens - 1) // seq_length
    separate = epochs > 1 and num_samples - before_last < int(0.95 * per_epoch)
    rng = np.random.RandomState(1234)

    def doc_idx_for(n_epochs):
        grid = np.mgrid[0:n_epochs, 0:len(documents)][1]
        grid[:] = documents
        out = grid.reshape(-1).astype(np.int32)
        rng.shuffle(out)
        return out

    doc_idx = (np.concatenate([doc_idx_for(epochs - 1), doc_idx_for(1)]) if separate
               else doc_idx_for(epochs))
    total = (epochs * tokens - 1) // seq_length
    ends = np.cumsum(sizes[doc_idx], dtype=np.int64)
    positions = np.arange(1, total + 1, dtype=np.int64) * seq_length
    rows = np.searchsorted(ends, positions, side="right")
    sample_idx = np.zeros((total + 1, 2), dtype=np.int32)
    sample_idx[1:, 0] = rows
    sample_idx[1:, 1] = positions - (ends[rows] - sizes[doc_idx[rows]])
    del ends, positions, rows
    first = before_last if separate else total
    head = np.arange(first, dtype=np.uint32)
    rng.shuffle(head)
    if first < total:
        tail = np.arange(first, total, dtype=np.uint32)
        rng.shuffle(tail)
        head = np.concatenate([head, tail])
    for name, array in (("doc_idx", doc_idx), ("sample_idx", sample_idx), ("shuffle_idx", head)):
        np.save(os.path.join(cache_dir, f"baseline_{name}.npy"), array, allow_pickle=False)
    return time.perf_counter() - start, rss_before


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def child(which, prefix, num_samples, seq_length):
    import torch  # noqa: F401  (both sides pay the same import, as a trainer does)

    with tempfile.TemporaryDirectory(dir=os.path.dirname(prefix)) as cache_dir:
        run = run_ascendspeed if which == "ascendspeed" else run_numpy_baseline
        seconds, rss_before = run(prefix, num_samples, seq_length, cache_dir)
    print(json.dumps({"seconds": seconds, "peak_gib": peak_rss_gib(), "before_gib": rss_before}))


def run_child(which: str, prefix: str, num_samples: int, seq_length: int) -> dict:
    """One implementation in a fresh single-threaded process: {seconds, peak_gib, before_gib}."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", which, "--prefix",
                          prefix, "--num-samples", str(num_samples), "--seq-length",
                          str(seq_length)], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_index_build(*, docs: int, tokens: int, epochs: int, seq_length: int,
                        rounds: int = 1) -> dict:
    """Both implementations, `rounds` times each, alternating (numpy, ours, ours, numpy, ...),
    each run a fresh process: {"numpy": [results], "ascendspeed": [results], "num_samples"}."""
    num_samples = num_samples_for(tokens, epochs, seq_length)
    results = {"numpy": [], "ascendspeed": []}
    with tempfile.TemporaryDirectory() as workdir:
        prefix = os.path.join(workdir, "shard")
        make_shard(prefix, docs, tokens)
        order = list(results)
        for r in range(rounds):
            for which in (order if r % 2 == 0 else order[::-1]):
                results[which].append(run_child(which, prefix, num_samples, seq_length))
    results["num_samples"] = num_samples
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=10_000_000)
    parser.add_argument("--tokens", type=int, default=10_000_000_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each, alternating")
    parser.add_argument("--child", choices=["ascendspeed", "numpy"], help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--num-samples", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.prefix, args.num_samples, args.seq_length)
        return
    num_samples = num_samples_for(args.tokens, args.epochs, args.seq_length)
    print(f"shard: {args.docs:,} documents, {args.tokens:,} tokens; {num_samples:,} samples of "
          f"seq {args.seq_length} ({args.epochs} epochs); one thread each; median of {args.rounds}")
    runs = measure_index_build(docs=args.docs, tokens=args.tokens, epochs=args.epochs,
                               seq_length=args.seq_length, rounds=args.rounds)
    results = {}
    for which in ("numpy", "ascendspeed"):
        seconds = statistics.median(r["seconds"] for r in runs[which])
        peak = max(r["peak_gib"] for r in runs[which])
        before = min(r["before_gib"] for r in runs[which])
        results[which] = {"seconds": seconds, "peak_gib": peak}
        print(f"{which:>12}: {seconds:6.2f} s, peak RSS {peak:.2f} GiB "
              f"({peak - before:.2f} GiB above the {before:.2f} GiB after imports)")
    base, ours = results["numpy"], results["ascendspeed"]
    print(f"speed-up: {base['seconds'] / ours['seconds']:.2f}x; peak memory ratio "
          f"{base['peak_gib'] / ours['peak_gib']:.2f}x (baseline / ascendspeed)")


if __name__ == "__main__":
    main()
