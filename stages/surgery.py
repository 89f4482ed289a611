"""Stage `surgery`: every merge entry's adapters (params `surgery.adapter`), once per seed,
trained on cached features only, side by side in one process (each entry's adapters exactly
as if trained alone). The outputs persist: an entry whose features, tasks and surgery settings
are unchanged keeps its adapters, so changing one merge entry retrains only that entry."""
from __future__ import annotations

import torch

from pipeline import provenance, workspace
from pipeline.config import Params
from pipeline.errors import PipelineError
from pipeline.features.stores import open_features
from pipeline.surgery.checkpoints import inputs_digest, save_surgery, trained_inputs
from pipeline.surgery.training import train_groups
from stages.common import progress


def inputs_of(stores: dict[str, list], individual: list, params: Params) -> dict[str, str]:
    """What each entry's adapters depend on: both encoders' stores (opened), the tasks, the
    settings and the code that trains them."""
    def named(encoder: str, opened: list) -> dict[str, str]:
        return {f"{encoder}/{t}": store.attrs["sha256"] for t, store in zip(params.tasks, opened)}

    shared = {"tasks": params.tasks, "surgery": params.surgery.model_dump(),
              "adapter": params.adapter_params(params.surgery.adapter), "code": provenance.digest([__name__])}
    targets = named("individual", individual)
    return {key: inputs_digest(**shared, stores={**named(workspace.merged_encoder(key), opened), **targets})
            for key, opened in stores.items()}


def run_surgery(params: Params, device: torch.device, keys: list[str] | None = None) -> None:
    keys = keys or params.methods
    unknown = [k for k in keys if k not in params.merge]
    if unknown:
        raise PipelineError(f"unknown merge entry {unknown[0]!r}: the entries of params `merge` are "
                            f"{', '.join(params.methods)}")
    cfg = params.surgery
    individual = [open_features("individual", t) for t in params.tasks]  # opened (and checked) once
    params.check_rows({t: store.n_rows for t, store in zip(params.tasks, individual)}, "surgery.batch_size",
                      cfg.batch_size)
    stores = {key: [open_features(workspace.merged_encoder(key), t) for t in params.tasks] for key in keys}
    stale = []
    for key, digest in inputs_of(stores, individual, params).items():
        if trained_inputs(key) == digest:
            print(f"surgery {key}: up to date ({workspace.surgery_checkpoint(key)})")
        else:
            stale.append((key, digest))
    if stale:
        def read(opened: list) -> list[torch.Tensor]:
            return [torch.from_numpy(store.to_numpy()) for store in opened]

        merged, targets = [read(stores[key]) for key, _ in stale], read(individual)
        by_seed = {seed: train_groups(merged, targets, **params.training(cfg), seed=seed, device=device,
                                      progress=lambda it: progress(it, desc=f"{cfg.adapter} of {len(stale)} entries"
                                                                   + (f", seed {seed}" if len(cfg.seeds) > 1 else "")))
                   for seed in cfg.seeds}
        for i, (key, digest) in enumerate(stale):
            path = save_surgery(key, {seed: trained[i][0] for seed, trained in by_seed.items()}, tasks=params.tasks,
                                inputs=digest)
            curves = {seed: trained[i][1] for seed, trained in by_seed.items()}
            workspace.write_json(workspace.surgery_info(key), {
                "tasks": params.tasks, "adapter": cfg.adapter, "rank": cfg.rank,
                "loss": {seed: {"first": c[0], "last": c[-1]} for seed, c in curves.items()}})
            losses = ", ".join(f"{c[0]:.4f} -> {c[-1]:.4f}" for c in curves.values())
            print(f"surgery {key}: {cfg.adapter}, {len(params.tasks)} tasks, rank {cfg.rank}, "
                  f"{'loss' if len(curves) == 1 else 'losses by seed'} {losses}\n  -> {path}")
    prune(params)


def prune(params: Params) -> None:
    """Drop adapters of merge entries no longer in the params (the outputs persist)."""
    for path in sorted(workspace.SURGERY.glob("*.safetensors")):
        if path.stem not in params.merge:
            path.unlink()
            workspace.surgery_info(path.stem).unlink(missing_ok=True)
            print(f"removed {path}: its merge entry is not in the params")

