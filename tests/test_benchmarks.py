"""`python -m benchmarks` runs end to end: a --quick smoke run of two rows writes well-formed
rows (it asserts nothing about speed)."""
import json
import math

import pytest

from launch import run_python


@pytest.mark.multiprocess
def test_quick_benchmark_rows(tmp_path):
    output = tmp_path / "results.json"
    result = run_python("-m benchmarks", ["--quick", "--only", "train fp32", "attention fp32 seq512",
                                          "--output", str(output)], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    entries = json.loads(output.read_text())
    machine, rows = entries[0]["machine"], entries[1:]
    assert machine["quick"] is True and machine["torch"] and machine["cpu"]
    assert [r["name"] for r in rows] == ["train fp32", "attention fp32 seq512"]
    for r in rows:
        assert {"name", "ours", "baseline", "unit", "ratio"} <= set(r), r
        for key in ("ours", "baseline", "ratio"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert rows[0]["unit"] == "ms/iteration" and rows[1]["unit"] == "ms"
