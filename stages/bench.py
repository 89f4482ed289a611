"""`repsurgery bench`: the benchmark suite on the workspace's outputs -> results/bench.json."""
from __future__ import annotations

from pipeline.benchmarks.suite import run_bench as _run
from stages.common import progress


def run_bench(params, device, **options) -> dict:
    return _run(params, device, progress=progress, **options)
