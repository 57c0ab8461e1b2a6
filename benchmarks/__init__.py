"""AscendSpeed's benchmarks: `python -m benchmarks [--quick] [--only NAME...]` runs every row
(benchmarks/rows.py) and writes benchmarks/results.json; each bench_*.py also runs on its own."""
