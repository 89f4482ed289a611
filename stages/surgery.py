"""Stage `surgery`: every merge entry's per-task adapters, trained on cached features only,
side by side in one process (each entry's adapters exactly as if trained alone). The outputs persist: an entry whose features, tasks and surgery settings are
unchanged keeps its adapters, so changing one merge entry retrains only that entry."""
from __future__ import annotations

import torch

from pipeline import provenance, workspace
from pipeline.config import Params
from pipeline.errors import PipelineError
from pipeline.features.stores import open_features, read_features
from pipeline.surgery.adapters import inputs_digest, save_surgery, trained_inputs
from pipeline.surgery.training import train_groups
from stages.common import progress


def inputs_of(keys: list[str], params: Params) -> dict[str, str]:
    """What each entry's adapters depend on: both encoders' stores, the tasks, the settings and
    the code that trains them."""
    def stores(encoder: str) -> dict[str, str]:
        return {f"{encoder}/{t}": open_features(encoder, t).attrs["sha256"] for t in params.tasks}

    shared = {"tasks": params.tasks, "surgery": params.surgery.model_dump(), "code": provenance.digest([__name__])}
    individual = stores("individual")
    return {key: inputs_digest(**shared, stores={**stores(workspace.merged_encoder(key)), **individual})
            for key in keys}


def run_surgery(params: Params, device: torch.device, keys: list[str] | None = None) -> None:
    keys = keys or params.methods
    unknown = [k for k in keys if k not in params.merge]
    if unknown:
        raise PipelineError(f"unknown merge entry {unknown[0]!r}: the entries of params `merge` are "
                            f"{', '.join(params.methods)}")
    cfg = params.surgery
    params.check_rows({t: open_features("individual", t).n_rows for t in params.tasks}, "surgery.batch_size",
                      cfg.batch_size)
    stale = []
    for key, digest in inputs_of(keys, params).items():
        if trained_inputs(key) == digest:
            print(f"surgery {key}: up to date ({workspace.surgery_checkpoint(key)})")
        else:
            stale.append((key, digest))
    if stale:
        merged = [read_features(workspace.merged_encoder(key), params.tasks) for key, _ in stale]
        trained = train_groups(merged, read_features("individual", params.tasks), **cfg.model_dump(), device=device,
                               progress=lambda it: progress(it, desc=f"surgery of {len(stale)} entries"))
        for (key, digest), (module, curve) in zip(stale, trained):
            path = save_surgery(key, module, tasks=params.tasks, inputs=digest)
            workspace.write_json(workspace.surgery_info(key), {"tasks": params.tasks, "rank": cfg.rank,
                                                               "loss_first": curve[0], "loss_last": curve[-1]})
            print(f"surgery {key}: {len(params.tasks)} tasks, rank {cfg.rank}, loss {curve[0]:.4f} -> {curve[-1]:.4f}"
                  f"\n  -> {path}")
    prune(params)


def prune(params: Params) -> None:
    """Drop adapters of merge entries no longer in the params (the outputs persist)."""
    for path in sorted(workspace.SURGERY.glob("*.safetensors")):
        if path.stem not in params.merge:
            path.unlink()
            workspace.surgery_info(path.stem).unlink(missing_ok=True)
            print(f"removed {path}: its merge entry is not in the params")

