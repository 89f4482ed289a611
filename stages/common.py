"""What every stage shares: params.yaml, the output layout, progress bars, validation.

This is the only place that knows where things live on disk.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from pipeline.adamerging import METHODS as ADAMERGING_METHODS
from pipeline.errors import PipelineError
from pipeline.merging import METHODS as MERGE_METHODS

METHODS = MERGE_METHODS + ADAMERGING_METHODS
DATA = Path("data")
MODELS = Path("models")
PRETRAINED = MODELS / "pretrained"
FINETUNED = MODELS / "finetuned"
MERGED = MODELS / "merged"
SURGERY = MODELS / "surgery"
HEADS = MODELS / "heads.safetensors"
FEATURES = Path("features")
RESULTS = Path("results")
SPLIT = "test"  # merging, surgery and evaluation all use the unlabeled test split


def load_params(path: Path | str = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"no params file at {path.resolve()}: run from the project root or pass --params")
    params = yaml.safe_load(path.read_text()) or {}
    if not params.get("tasks"):
        raise PipelineError(f"{path}: `tasks` must list at least one task")
    return params


def is_world(params: dict) -> bool:
    """True for the miniature world, False when params `source` names real models and data."""
    return params.get("source", "world") == "world"


def check_method(method: str, allowed: tuple[str, ...] = METHODS) -> str:
    if method not in allowed:
        raise PipelineError(f"unknown merge method {method!r}: choose one of {', '.join(allowed)}")
    return method


def tasks(params: dict) -> list[str]:
    names = list(params["tasks"])
    for name in names:
        if not (DATA / name / "task.json").exists():
            known = sorted(p.name for p in DATA.glob("*") if (p / "task.json").exists())
            raise PipelineError(f"unknown task {name!r} in params `tasks`: no {DATA / name / 'task.json'}. "
                                f"Tasks available: {', '.join(known) or 'none (run `repsurgery prepare-data`)'}")
    return names


def finetuned_path(task: str) -> Path:
    return FINETUNED / f"{task}.safetensors"


def merged_path(method: str) -> Path:
    return MERGED / f"{method}.safetensors"


def store_path(encoder: str, task: str) -> Path:
    return FEATURES / encoder / f"{task}-{SPLIT}.zarr"


def progress(iterable=None, **kwargs):
    """A tqdm bar with rate and ETA on stderr; quiet when REPSURGERY_QUIET is set (tests)."""
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, disable=bool(os.environ.get("REPSURGERY_QUIET")), **kwargs)


def write_json(path: Path, data: Any) -> None:
    """Write via a temporary name so a crash never leaves a truncated file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def set_threads() -> None:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
