"""What every benchmark row shares: alternating timing with medians, the row record, machine info.

A row is a dict {"name", "ours", "baseline", "unit", "ratio"} (+ "target", "met", "detail"):
ratio > 1 means ours is better (baseline / ours for times and memory, ours / baseline for rates).
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# Units where more is better (ratio = ours / baseline); every other unit is a cost.
HIGHER_IS_BETTER = {"tokens/s", "fraction of GEMM peak"}


def alternate(runs: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each of `runs` per round: `warmup` untimed rounds, then `rounds` timed ones,
    every round running each callable once, the order reversed every other round (A B, B A, ...)
    so a slow spell of a shared machine and the cache left by the other hit both alike."""
    times = {name: [] for name in runs}
    items = list(runs.items())
    for r in range(warmup + rounds):
        for name, fn in (items if r % 2 == 0 else items[::-1]):
            start = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median(values) -> float:
    return statistics.median(values)


def row(name: str, ours: float, baseline: float, unit: str, target: float | None = None,
        detail: str = "", ratio: float | None = None, target_text: str | None = None) -> dict:
    """A result row; ratio > 1 means ours is better. `target`: the ratio the issue asks for."""
    if ratio is None:
        ratio = ours / baseline if unit in HIGHER_IS_BETTER else baseline / ours
    out = {"name": name, "ours": ours, "baseline": baseline, "unit": unit, "ratio": ratio}
    out["target"] = None if target is None else (target_text or f">= {target:g}x")
    out["met"] = None if target is None else bool(ratio >= target)
    out["detail"] = detail
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> dict[str, bool]:
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {"avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags,
            "amx": bool({"amx_tile", "amx_bf16", "amx_int8"} & flags)}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=REPO).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info(threads: int, command: str) -> dict:
    import torch

    cpu_family = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        cpu_family = (f"family {fields.get('CPU family', '?').strip()} model "
                      f"{fields.get('Model', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs")
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"cpu": cpu_model(), "cpu_detail": cpu_family, "flags": cpu_flags(),
            "torch": torch.__version__, "threads": threads, "cpus": os.cpu_count(),
            "commit": git_commit(), "command": command, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def profile_top(fn: Callable[[], object], n: int = 8) -> list[dict]:
    """One call of `fn` under torch.profiler (CPU): the `n` ops with the most self CPU time,
    each {"op", "self_ms", "share", "calls"} (share of the profiled self time in all)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = list(prof.key_averages())
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / total, "calls": e.count} for e in top]


def format_profile(top: list[dict]) -> str:
    lines = [f"    {'op':<44} {'self ms':>9} {'share':>6} {'calls':>6}"]
    for e in top:
        lines.append(f"    {e['op'][:44]:<44} {e['self_ms']:9.1f} {e['share']:6.1%} {e['calls']:6d}")
    return "\n".join(lines)
