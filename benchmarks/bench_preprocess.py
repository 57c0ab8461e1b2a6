"""Throughput of tools/preprocess_data.py against a straightforward per-document loop.

    python benchmarks/bench_preprocess.py            # the Shakespeare sample corpus + its tokenizer
    python benchmarks/bench_preprocess.py --input corpus.jsonl --tokenizer-dir TOKENIZER_DIR

The baseline is what a plain script does: for each line, json.loads, `tokenizer.tokenize(text)`
(HF `encode`), append the eod, `builder.add_item`. preprocess_data.py is timed with --workers 1
(batched Rust encode in this process; the Rust library may use several threads, and a row with
TOKENIZERS_PARALLELISM=false shows one thread) and with --workers 2 (two single-threaded encoder
processes). Every run writes --append-eod datasets, which must all be byte-identical. All runs share
one process; after one untimed warm-up round (imports, first tokenizer load), the rounds run every
variant in turn (so a slow spell on a shared machine hits them all; the order reversed every other
round) and each figure is the best round (`python -m benchmarks` reports the median). The
tokenizer load is part of every timing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from ascendspeed.arguments import TokenizerConfig  # noqa: E402
from ascendspeed.data.tokenizer import build_tokenizer  # noqa: E402
from megatron_ext.indexed_dataset import MMapIndexedDatasetBuilder, best_fitting_dtype  # noqa: E402
from tools import preprocess_data  # noqa: E402

SAMPLE_DIR = os.path.join(REPO_ROOT, "data", "shakespeare")


def ensure_sample(corpus: str, tokenizer_dir: str) -> None:
    """Build the sample corpus and tokenizer if they are not there yet (as the quick start does)."""
    from tools import prepare_sample_corpus, train_tokenizer

    if not os.path.exists(corpus):
        assert prepare_sample_corpus.main(["--output", corpus]) == 0
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        assert train_tokenizer.main(["--input", corpus, "--vocab-size", "8000",
                                     "--output-dir", tokenizer_dir]) == 0


def baseline(corpus: str, tokenizer_dir: str, prefix: str) -> None:
    tokenizer = build_tokenizer(TokenizerConfig("PretrainedFromHF", tokenizer_name_or_path=tokenizer_dir))
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=best_fitting_dtype(tokenizer.vocab_size))
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            ids = tokenizer.tokenize(json.loads(line)["text"])
            if ids:
                builder.add_item(np.array(ids + [tokenizer.eod]))
                builder.end_document()
    builder.finalize(prefix + ".idx")


def tool(corpus: str, tokenizer_dir: str, prefix: str, workers: int) -> None:
    args = preprocess_data.get_args(
        ["--input", corpus, "--output-prefix", prefix[:-len("_text_document")], "--append-eod",
         "--tokenizer-type", "PretrainedFromHF", "--tokenizer-name-or-path", tokenizer_dir,
         "--workers", str(workers), "--log-interval", "1000000000"])
    preprocess_data.preprocess(args)


def single_thread_tool(corpus: str, tokenizer_dir: str, prefix: str) -> None:
    """preprocess_data --workers 1 with TOKENIZERS_PARALLELISM=false (one thread)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        tool(corpus, tokenizer_dir, prefix, 1)
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


VARIANTS = {
    "per-document tokenize() loop + builder": lambda c, t, p: baseline(c, t, p),
    "preprocess_data --workers 1, one thread": single_thread_tool,
    "preprocess_data --workers 1": lambda c, t, p: tool(c, t, p, 1),
    "preprocess_data --workers 2": lambda c, t, p: tool(c, t, p, 2),
}


def measure_preprocess(corpus: str, tokenizer_dir: str, rounds: int,
                       variants=tuple(VARIANTS)) -> dict[str, list[float]]:
    """Seconds of each variant per round: one untimed warm-up round, then `rounds`, every
    variant in turn (the order reversed every other round). All outputs must be byte-identical."""
    from benchmarks.common import alternate

    with tempfile.TemporaryDirectory() as tmp:
        prefixes = {name: os.path.join(tmp, f"run{k}_text_document") for k, name in enumerate(variants)}
        runs = {name: (lambda name=name: VARIANTS[name](corpus, tokenizer_dir, prefixes[name]))
                for name in variants}
        times = alternate(runs, rounds, warmup=1)
        outputs = []
        for prefix in prefixes.values():
            with open(prefix + ".bin", "rb") as b, open(prefix + ".idx", "rb") as i:
                outputs.append((b.read(), i.read()))
        assert all(out == outputs[0] for out in outputs), "the runs wrote different datasets"
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default=os.path.join(SAMPLE_DIR, "shakespeare.jsonl"))
    parser.add_argument("--tokenizer-dir", default=os.path.join(SAMPLE_DIR, "tokenizer"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    ensure_sample(args.input, args.tokenizer_dir)
    with open(args.input, "rb") as f:
        docs = sum(1 for _ in f)
    size = os.path.getsize(args.input)
    print(f"{args.input}: {docs} documents, {size / 1e6:.2f} MB; tokenizer {args.tokenizer_dir}; "
          f"{os.cpu_count()} CPUs; best of {args.repeat} rounds", flush=True)
    times = measure_preprocess(args.input, args.tokenizer_dir, args.repeat)
    best = [min(t) for t in times.values()]
    print(f"{'':42s} {'seconds':>8s} {'docs/s':>8s} {'MB/s':>6s} {'speed-up':>8s}")
    for name, seconds in zip(times, best):
        print(f"{name:42s} {seconds:8.2f} {docs / seconds:8.1f} {size / seconds / 1e6:6.2f} "
              f"{best[0] / seconds:7.2f}x")
    print("all runs wrote byte-identical datasets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
