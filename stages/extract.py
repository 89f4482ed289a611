"""Stage `extract`: every encoder's features of every task, each image decoded once.

One stage covers all encoders (pretrained on every task, each individual encoder on its own
task, every merge entry on every task) so that each task's images are decoded and
preprocessed once and fed to all of them. Its outputs are `persist`ent in dvc.yaml: DVC does
not delete them before a re-run, and stores whose identity (weights, images, dtype, autocast,
code version) still matches are kept, so a change to one merge entry recomputes only its
stores. The task labels are saved beside the features, so later stages need no images. With
`router.split: train`, the merge entries also encode the train images the task router is
fitted on (`features/merged/KEY/router-train.zarr`).
"""
from __future__ import annotations

import shutil

import torch

from cache import clear_leftovers
from pipeline import workspace
from pipeline.config import Params
from pipeline.data import datasets
from pipeline.data.checks import preflight
from pipeline.features import jobs as planning
from pipeline.features.extraction import extract, is_done
from pipeline.features.stores import write_labels
from stages.common import progress


def prune(keep: set) -> None:
    """Drop stores of tasks and merge entries no longer in the params, and router stores no
    longer wanted (the outputs persist)."""
    stale = [p for p in sorted(workspace.FEATURES.glob("*/*.zarr"))
             if p.parent.name in workspace.REFERENCE_ENCODERS and p not in keep]
    stale += [p for p in sorted((workspace.FEATURES / "merged").glob("*/*.zarr")) if p not in keep]
    for path in stale:
        shutil.rmtree(path)
        print(f"removed {path}: its task, merge entry or router images are not in the params")
    for path in clear_leftovers(workspace.FEATURES):  # every wanted store is complete now
        print(f"removed {path}: left by an interrupted extraction")
    for folder in (workspace.FEATURES / "merged").glob("*"):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def extract_features(params: Params, device: torch.device, names: list[str] | None = None, *,
                     scheduler: str | None = None, workers: int | None = None) -> None:
    preflight(params, device, extra=planning.check_disk(params))
    cfg = params.extract
    chosen = planning.encoders(params, names)
    tests = planning.jobs(params.tasks, chosen, cfg)
    todo = tests + planning.router_jobs(params, chosen)
    stale = [t for job in todo for t in job.targets if not is_done(t, cfg.dtype)]
    print(f"extract: {len(stale)} feature stores to compute "
          f"({', '.join(sorted({str(t.path.parent.relative_to(workspace.FEATURES)) for t in stale})) or 'none'}), "
          f"{sum(len(j.targets) for j in todo) - len(stale)} up to date")
    kwargs = dict(dim=planning.feature_dim(), batch_size=cfg.batch_size, device=device, dtype=cfg.dtype,
                  autocast=planning.AUTOCAST[cfg.autocast], fix_hint=planning.hint, progress=progress)
    if scheduler or workers:
        from pipeline.features.scaleout import dask_client, extract_distributed

        with dask_client(scheduler, workers) as client:
            paths = extract_distributed(todo, client, **kwargs)
    else:
        paths = extract(todo, **kwargs)
    for job in tests:
        write_labels(job.name, datasets.labels(workspace.DATA, job.name, workspace.SPLIT),
                     job.targets[0].attrs["dataset_fingerprint"])
    if not names:
        prune({t.path for job in todo for t in job.targets})
    print(f"{len(paths)} feature stores of {len(chosen)} encoders ready under {workspace.FEATURES}/; labels under "
          f"{workspace.LABELS}/")
