"""Opening cached features safely, by encoder name: a store is used only if it is complete
and was made by the weights the workspace holds now (no model code is imported here, so
surgery and evaluation start fast and never run an encoder).

A store (and the labels saved beside the features) is also refused when the test images it
was computed from have changed since: a replaced shard must not let evaluation report old
features against new labels. Where a checkpoint or the data is absent (only the stores were
pulled from a DVC remote, to run surgery on a laptop) the store is taken as recorded: the DVC
lock that brought both vouches for it.
"""
from __future__ import annotations

import functools
import json

import numpy as np
import torch

from cache import FeatureStore, leftovers, open_store
from pipeline import workspace
from pipeline.data import datasets
from pipeline.errors import PipelineError
from pipeline.models.checkpoints import fingerprint, load_state, read_metadata


def leftover_report() -> list[tuple[str, str]]:
    """What interrupted extractions left under features/, each with what becomes of it."""
    report = []
    for item in leftovers(workspace.FEATURES):
        if item.writer is not None:
            report.append((str(item.path), f"being written by process {item.writer} (a running extraction)"))
        else:
            report.append((str(item.path), "left by an interrupted extraction: the next `repsurgery extract` (or "
                                           "`dvc repro`) resumes the store if it is still wanted and removes the "
                                           "rest"))
    return report


def fix_hint(encoder: str) -> str:
    if encoder == "mtl":
        return "run `repsurgery mtl` (miniature world only)"
    return f"run `repsurgery extract {encoder.removeprefix('merged/')}` (or `dvc repro extract` for every encoder)"


@functools.lru_cache(maxsize=1)
def pretrained_fingerprint() -> str:
    """Hashed once per process: every task's pretrained store is checked against it."""
    path = workspace.pretrained_clip()
    state = load_state(path, hint=workspace.rebuild_hint(path))
    return fingerprint({k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")})


def checkpoint_fingerprint(encoder: str, task: str) -> str | None:
    """Fingerprint of the weights `encoder` names now (None: that checkpoint is not here)."""
    path = workspace.checkpoint(encoder, task)
    if path is None:
        return pretrained_fingerprint() if workspace.pretrained_clip().exists() else None
    return read_metadata(path, required=("fingerprint",))["fingerprint"] if path.exists() else None


@functools.lru_cache(maxsize=None)
def data_fingerprint(task: str) -> str | None:
    """Fingerprint of the task's test shards now (None: no data here); hashed once per process."""
    if not datasets.has_split(workspace.DATA, task, workspace.SPLIT):
        return None
    return datasets.dataset_fingerprint(workspace.DATA, task, workspace.SPLIT)


def open_features(encoder: str, task: str, deep: bool = False) -> FeatureStore:
    """A task's store of one encoder, refused unless made from the weights and data here now
    (`deep`: also reread every chunk against its checksum)."""
    expect = {"task": task, "split": workspace.SPLIT}
    fp = checkpoint_fingerprint(encoder, task)
    if fp is not None:
        expect["encoder_fingerprint"] = fp
    data_fp = data_fingerprint(task)
    if data_fp is not None:
        expect["dataset_fingerprint"] = data_fp
    return open_store(workspace.store(encoder, task), expect=expect, fix_hint=fix_hint(encoder), deep=deep)


def router_identity(cfg, tasks: list[str]) -> dict:
    """What the router's store depends on besides weights and images (params `router`, tasks)."""
    return {"split": "train", "tasks": tasks, "router_images": cfg.images, "router_seed": cfg.seed}


def open_router_store(encoder: str, tasks: list[str], cfg, deep: bool = False) -> FeatureStore:
    """A merge entry's store of the train images the router is fitted on, refused unless made
    by the weights here now for these tasks and params `router`. Its images are not hashed here
    (train splits can be large): `extract` checked them when it kept or wrote the store, and
    DVC re-runs it when the data change."""
    expect = router_identity(cfg, tasks)
    fp = checkpoint_fingerprint(encoder, tasks[0])
    if fp is not None:
        expect["encoder_fingerprint"] = fp
    return open_store(workspace.router_store(encoder), expect=expect, fix_hint=fix_hint(encoder), deep=deep)


def router_fit(encoder: str, tasks: list[str], cfg) -> list[torch.Tensor] | None:
    """The features the task router is fitted on, per task: a merge entry's router store
    (`router.split: train`), or None (fitted on some of the test features instead)."""
    if cfg.split != "train":
        return None
    store = open_router_store(encoder, tasks, cfg)
    return list(torch.from_numpy(store.to_numpy()).split(store.attrs["rows_per_task"]))


def read_features(encoder: str, tasks: list[str]) -> list[torch.Tensor]:
    """Every task's features of one encoder, in memory as float32 (N_t, d) tensors."""
    return [torch.from_numpy(open_features(encoder, t).to_numpy()) for t in tasks]


def write_labels(task: str, labels: np.ndarray, dataset_fingerprint: str) -> None:
    workspace.write_json(workspace.labels(task), {"task": task, "split": workspace.SPLIT,
                                                  "dataset_fingerprint": dataset_fingerprint,
                                                  "labels": [int(y) for y in labels]})


def read_labels(task: str) -> np.ndarray:
    """A task's test labels, as the extract stage saved them beside the features."""
    path = workspace.labels(task)
    if not path.exists():
        raise PipelineError(f"no labels for task {task!r} at {path}: {fix_hint('individual')}")
    saved = json.loads(path.read_text())
    if data_fingerprint(task) not in (None, saved.get("dataset_fingerprint")):
        raise PipelineError(f"the {workspace.SPLIT} images of task {task!r} under {workspace.DATA}/ changed after "
                            f"its features were extracted (labels at {path}): run `dvc repro extract` (or "
                            "`repsurgery extract`) to extract every encoder's features again")
    return np.asarray(saved["labels"], dtype=np.int64)
