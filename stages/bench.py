"""`repsurgery bench` (the benchmark suite on the workspace's outputs -> results/bench.json),
`repsurgery bench-merges` (merge time and memory against the number of tasks) and
`repsurgery bench-real-size` (extraction and AdaMerging at ViT-B/32 and ViT-L/14 sizes ->
results/bench-realsize.json)."""
from __future__ import annotations

from pathlib import Path
from typing import get_args

from pipeline import workspace
from pipeline.benchmarks import decoding, merges, realsize
from pipeline.benchmarks.suite import machine, run_bench as _run
from pipeline.config import Decoder
from pipeline.errors import PipelineError
from pipeline.features.jobs import AUTOCAST
from pipeline.models import clip
from stages.common import progress


def run_bench(params, device, **options) -> dict:
    return _run(params, device, progress=progress, **options)


def bench_merges(params, device, params_file, keys: list[str], counts: list[int], steps: int, out) -> None:
    keys = keys or params.methods
    counts = sorted({min(n, len(params.tasks)) for n in counts})
    rows = merges.scaling(params_file, device, keys, counts, steps=steps, progress=progress)
    merges.write(rows, machine(device), out)


def bench_decode(device, arch: str, *, quick: bool = False, out: Path | None = None, **options) -> dict:
    """Decoding's images/s against loader workers, per decoder, and each decoder's pixels against PIL's."""
    out = out or workspace.BENCH_DECODE
    if quick:
        options.update(decoding.QUICK)
    bad = sorted(set(options.get("decode") or []) - set(get_args(Decoder)))
    if bad:
        raise PipelineError(f"unknown decoder {', '.join(bad)}: choose among {', '.join(get_args(Decoder))}")
    result = {"machine": machine(device), "arch": arch, "quick": quick,
              **decoding.run(clip.spec_from_open_clip(arch=arch), device, progress=progress, **options)}
    workspace.write_json(out, result)
    print(decoding.table(result))
    print(f"-> {out}")
    return result


def bench_real_size(device, archs: list[str] | None = None, *, autocast: str = "none", quick: bool = False,
                    out: Path | None = None, **options) -> dict:
    """Extraction and AdaMerging at the real encoders' sizes (random weights, generated JPEGs)."""
    if autocast not in AUTOCAST:
        raise PipelineError(f"unknown autocast {autocast!r}: choose among {', '.join(AUTOCAST)}")
    out = out or workspace.BENCH_REALSIZE
    if quick:
        options.update(realsize.QUICK)
    specs = {arch: clip.spec_from_open_clip(arch=arch) for arch in archs or realsize.ARCHS}
    result = {"machine": machine(device), "quick": quick,
              **realsize.run(specs, device, autocast=AUTOCAST[autocast], progress=progress, **options)}
    workspace.write_json(out, result)
    print(realsize.table(result))
    print(f"-> {out}")
    return result
