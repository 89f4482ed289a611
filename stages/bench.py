"""`repsurgery bench` (the benchmark suite on the workspace's outputs -> results/bench.json) and
`repsurgery bench-merges` (merge time and memory against the number of tasks)."""
from __future__ import annotations

from pipeline.benchmarks import merges
from pipeline.benchmarks.suite import machine, run_bench as _run
from stages.common import progress


def run_bench(params, device, **options) -> dict:
    return _run(params, device, progress=progress, **options)


def bench_merges(params, device, params_file, keys: list[str], counts: list[int], steps: int, out) -> None:
    keys = keys or params.methods
    counts = sorted({min(n, len(params.tasks)) for n in counts})
    rows = merges.scaling(params_file, device, keys, counts, steps=steps, progress=progress)
    merges.write(rows, machine(device), out)
