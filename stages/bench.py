"""`repsurgery bench` (the benchmark suite on the workspace's outputs -> results/bench.json),
`repsurgery bench-merges` (merge time and memory against the number of tasks),
`repsurgery bench-real-size` (extraction and AdaMerging at ViT-B/32 and ViT-L/14 sizes ->
results/bench-realsize.json), `repsurgery bench-decode` (decoding against loader workers, per
decoder -> results/bench-decode.json) and `repsurgery bench-table1` (the paper preset's whole run
at real sizes, projected -> results/bench-table1.json)."""
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


def check_decoders(names: list[str]) -> None:
    bad = sorted(set(names) - set(get_args(Decoder)))
    if bad:
        raise PipelineError(f"unknown decoder {', '.join(bad)}: choose among {', '.join(get_args(Decoder))}")


def bench_decode(device, arch: str, *, quick: bool = False, accuracy: list[str] | None = None,
                 out: Path | None = None, **options) -> dict:
    """Decoding's images/s against loader workers, per decoder, and each decoder's pixels against
    PIL's; with `accuracy` (the params' tasks), each decoder's accuracy on the workspace's images."""
    out = out or workspace.BENCH_DECODE
    if quick:
        options.update(decoding.QUICK)
    check_decoders(options.get("decode") or [])
    result = {"machine": machine(device), "arch": arch, "quick": quick,
              **decoding.run(clip.spec_from_open_clip(arch=arch), device, progress=progress, **options)}
    if accuracy:
        result["accuracy"] = decoding.accuracy_effect(accuracy, ["pil", "torchvision"])
    workspace.write_json(out, result)
    print(decoding.table(result))
    print(f"-> {out}")
    return result


def bench_real_size(device, archs: list[str] | None = None, *, autocast: str = "none", quick: bool = False,
                    out: Path | None = None, **options) -> dict:
    """Extraction and AdaMerging at the real encoders' sizes (random weights, generated JPEGs)."""
    if autocast not in AUTOCAST:
        raise PipelineError(f"unknown autocast {autocast!r}: choose among {', '.join(AUTOCAST)}")
    check_decoders([options.get("decode", "pil")])
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


def bench_table1(device, arch: str = "ViT-B-32-quickgelu", *, scale: float = 0.01, autocast: str = "none",
                 quick: bool = False, out: Path | None = None) -> dict:
    """The paper preset's whole run (every merge entry, extraction, surgery, evaluate) on a random
    tower of `arch` and generated splits of the real sizes x `scale`, projected to scale 1."""
    from pipeline.benchmarks import table1
    from stages.evaluate import entry_figures
    from stages.presets import ARCHS, paper_params

    if autocast not in AUTOCAST:
        raise PipelineError(f"unknown autocast {autocast!r}: choose among {', '.join(AUTOCAST)}")
    table1.check_scale(scale)  # before building anything
    out = out or workspace.BENCH_TABLE1
    # the preset of that architecture where there is one (the merge entries are the same in all)
    preset = next((f"paper-{key}" for key, (name, *_) in ARCHS.items() if name == arch), "paper-vit-b-32")
    spec = clip.spec_from_open_clip(arch=arch)
    result = {"machine": machine(device), "arch": arch, "preset": preset,
              **table1.run(paper_params(preset), spec, device, scale=scale, quick=quick,
                           autocast=AUTOCAST[autocast], entry_figures=entry_figures, progress=progress)}
    workspace.write_json(out, result)
    print(table1.table(result))
    print(f"-> {out}")
    return result
