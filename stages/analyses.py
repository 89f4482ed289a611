"""Stage `analyses`: the paper's analyses on cached features -> results/analyses/NAME/.

One process runs them all; each analysis records a digest of its inputs and is recomputed only
when they changed, so `-S surgery.rank=64` recomputes the analyses that train with the rank
(and the t-SNE panels with surgery) while the rank sweep and the baselines are kept."""
from __future__ import annotations

import time

import torch

from pipeline.config import Params
from pipeline.errors import PipelineError
from pipeline.reporting import analyses
from stages.common import progress


def analyze(name: str, params: Params, device: torch.device | str = "cpu", force: bool = False) -> None:
    """Run one analysis (or `all`, baselines first); print where it went and how long it took."""
    if name not in (*analyses.ANALYSES, "all"):
        raise PipelineError(f"unknown analysis {name!r}: choose one of {', '.join(analyses.ANALYSES)} or all")
    ctx = analyses.Context(params, device, progress)
    for each in analyses.ANALYSES if name == "all" else (name,):
        start = time.perf_counter()
        out, computed = analyses.run(each, ctx, force=force or name != "all")
        if not computed:
            print(f"analysis {each}: up to date ({out}/)")
            continue
        print(f"analysis {each}: {time.perf_counter() - start:.1f} s -> {out}/")
        if (out / "table.md").exists():
            print((out / "table.md").read_text())
