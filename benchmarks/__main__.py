"""Run every benchmark row, print a table and write the results as JSON.

    python -m benchmarks                       # the full measurement -> benchmarks/results.json
    python -m benchmarks --quick               # every row tiny: a smoke run (asserts no speed)
    python -m benchmarks --only "train fp32" "attention*" --output /tmp/r.json
    python -m benchmarks --list
    python -m benchmarks --markdown benchmarks/results.json   # the table, for docs/performance.md

Rows (benchmarks/rows.py; the bench_*.py scripts hold the code and still run on their own):
train fp32|bf16 [seq2048] (our train_step vs HF BloomForCausalLM + AdamW), mfu fp32|bf16 (model
FLOPs/s of our step over the measured GEMM rate), attention fp32|bf16 seq512|seq2048 (fused
ALiBi kernel vs SDPA), bias_gelu fp32|bf16, cross entropy fp32|bf16 and optimizer step
(benchmarks/bench_fused_ops.py's fused ops vs their references, where that script is there; no
targets), generation fp32|bf16 (KV-cache decoding vs HF generate), index build (vs
numpy), preprocess (vs a per-document loop), memory <layout> (peak RSS per rank of the
equivalence-matrix layouts through the real trainer vs plain DP on as many processes). Ours and
the baseline run in the same process (or in processes the row starts), alternating, after a
warm-up, and the medians are reported (memory rows: one fresh run of each layout, a peak being
a high-water mark rather than a timing).

The JSON is a list: first {"machine": {cpu, flags, torch, threads, commit, command, ...}}, then
one row per benchmark: {"name", "ours", "baseline", "unit", "ratio", "target", "met", "detail"}
(ratio > 1 means ours is better: baseline / ours for times and memory, ours / baseline for
tokens/s; for mfu rows ours is the fraction of the GEMM rate, baseline 1.0, ratio = ours).
Train rows of a full run (and of --quick with --profile) also carry "profile": the top 8 ops by
self CPU time of one more step of ours under torch.profiler, taken after the timing.

Only a full run of every row writes benchmarks/results.json (the committed record); --quick or
--only without --output write to a file in the temp dir, so a smoke run never replaces the record.
`--only` takes row names or shell patterns (fnmatch, case-insensitive).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import sys
import tempfile
import time
import traceback

from benchmarks.common import REPO, load_average, machine_info

RESULTS = os.path.join(REPO, "benchmarks", "results.json")


def select(names: list[str], patterns: list[str] | None) -> list[str]:
    if not patterns:
        return names
    chosen = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatch(n.lower(), pattern.lower())]
        if not hits:
            raise SystemExit(f"--only {pattern!r} matches no row; rows: {', '.join(names)}")
        chosen += [h for h in hits if h not in chosen]
    return [n for n in names if n in chosen]  # table order


def fmt(value: float) -> str:
    if value == 0 or 0.01 <= abs(value) < 1e5:
        return f"{value:.4g}" if abs(value) >= 1 else f"{value:.3f}"
    return f"{value:.3e}"


def print_table(rows: list[dict], out=sys.stdout) -> None:
    width = max([len(r["name"]) for r in rows] + [4])
    print(f"\n{'row':<{width}}  {'ours':>10}  {'baseline':>10}  {'unit':<21}  {'ratio':>7}  "
          f"{'target':>8}  met", file=out)
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<{width}}  FAILED: {r['error']}", file=out)
            continue
        met = "-" if r.get("met") is None else ("yes" if r["met"] else "NO")
        print(f"{r['name']:<{width}}  {fmt(r['ours']):>10}  {fmt(r['baseline']):>10}  "
              f"{r['unit']:<21}  {r['ratio']:6.2f}x  {r.get('target') or '':>8}  {met}", file=out)


def markdown_table(entries: list[dict]) -> str:
    """A results.json (machine entry + rows) as a Markdown table."""
    lines = ["| row | ours | baseline | unit | ratio | target | met |",
             "|---|---:|---:|---|---:|---|---|"]
    for r in entries:
        if "machine" in r:
            continue
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | | |")
            continue
        met = "" if r.get("met") is None else ("met" if r["met"] else "**not met**")
        lines.append(f"| {r['name']} | {fmt(r['ours'])} | {fmt(r['baseline'])} | {r['unit']} | "
                     f"{r['ratio']:.2f}x | {r.get('target') or ''} | {met} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from benchmarks.rows import Context, all_rows

    rows = all_rows()
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every row tiny: a smoke run")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these rows (names or patterns)")
    parser.add_argument("--output", help=f"the JSON file (default: {os.path.relpath(RESULTS)} for "
                                         f"a full run of every row, else a temp file)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true",
                        help="profile one step of ours in every train row (a full run always does)")
    parser.add_argument("--list", action="store_true", help="print the row names and exit")
    parser.add_argument("--markdown", metavar="JSON", help="print JSON's table as Markdown and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(rows))
        return 0
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown_table(json.load(f)))
        return 0
    names = select(list(rows), args.only)
    output = args.output
    if output is None:
        output = (RESULTS if not args.quick and not args.only else
                  os.path.join(tempfile.gettempdir(), "ascendspeed-benchmarks"
                               + ("-quick" if args.quick else "") + ".json"))

    import torch

    torch.set_num_threads(args.threads)
    command = "python -m benchmarks" + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:]))
    machine = machine_info(args.threads, command)
    machine["load_before"] = load_average()
    flags = ", ".join(k for k, v in machine["flags"].items() if v) or "none"
    print(f"{machine['cpu']} ({machine['cpu_detail']}; {flags}), torch {machine['torch']}, "
          f"{args.threads} threads, commit {machine['commit']}, load {load_average()}"
          f"{', QUICK' if args.quick else ''}", flush=True)
    ctx = Context(quick=args.quick, threads=args.threads, profile=args.profile,
                  log=lambda line: print(line, flush=True))
    results = []
    failed = 0
    start = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        print(f"-- {name} ...", flush=True)
        try:
            r = rows[name](ctx, name)
        except Exception as error:  # noqa: BLE001  (one broken row must not lose the others)
            traceback.print_exc()
            r = {"name": name, "error": f"{type(error).__name__}: {error}"}
            failed += 1
        r["seconds"] = round(time.perf_counter() - t0, 2)
        results.append(r)
        if "error" not in r:
            print(f"   {name}: ours {fmt(r['ours'])} {r['unit']}, baseline {fmt(r['baseline'])}, "
                  f"ratio {r['ratio']:.2f}x ({r['seconds']:.1f} s; {r['detail']})", flush=True)
    machine["seconds"] = round(time.perf_counter() - start, 1)
    machine["load_after"] = load_average()
    machine["quick"] = args.quick
    print_table(results)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump([{"machine": machine}] + results, f, indent=1)
        f.write("\n")
    print(f"\n{len(results)} rows in {machine['seconds']:.0f} s -> {output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
