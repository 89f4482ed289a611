"""Stages that cache encoder features in feature stores (the only stages that run encoders
after merging): the reference encoders once, and each merged encoder on every task."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from pipeline import clip_model, data
from pipeline.checkpoints import fingerprint, load_state
from pipeline.extraction import Target, extract
from stages.common import (DATA, PRETRAINED, SPLIT, check_method, finetuned_path, merged_path, progress, store_path,
                           tasks)
from stages.features import fix_hint

AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _attrs(encoder: torch.nn.Module, task: str, spec: dict, dataset_fp: str) -> dict:
    return {"encoder_fingerprint": fingerprint(encoder.state_dict()), "task": task, "split": SPLIT,
            "dataset_fingerprint": dataset_fp, "preprocess": spec.get("preprocess") or spec.get("arch")}


def _run(task: str, named: dict[str, torch.nn.Module], spec: dict, params: dict, device: torch.device) -> list[Path]:
    cfg = params["extract"]
    dataset = data.ImageDataset(DATA, task, SPLIT, clip_model.preprocess_for(spec))
    dataset_fp = data.dataset_fingerprint(DATA, task, SPLIT)
    targets = [Target(enc, store_path(name, task), _attrs(enc, task, spec, dataset_fp)) for name, enc in named.items()]
    return extract(targets, dataset, batch_size=cfg["batch_size"], device=device, dtype=cfg["dtype"],
                   autocast=AUTOCAST[cfg.get("autocast", "none")], fix_hint=fix_hint(next(iter(named))),
                   progress=lambda it, **kw: progress(it, desc=f"extract {task}", unit="batch", **kw))


def extract_reference(params: dict, device: torch.device) -> None:
    """Pretrained features on every task and each individual encoder on its own task,
    computed once and shared by every merge method; both see the same decoded batches."""
    model, spec = clip_model.load_clip(PRETRAINED)
    pretrained = model.visual
    for task in tasks(params):
        individual = copy.deepcopy(pretrained)
        individual.load_state_dict(load_state(finetuned_path(task), like=pretrained.state_dict(),
                                              hint="Run `repsurgery finetune` to create it."))
        paths = _run(task, {"pretrained": pretrained, "individual": individual}, spec, params, device)
        print(f"{task}: " + ", ".join(map(str, paths)))


def extract_merged(method: str, params: dict, device: torch.device) -> None:
    check_method(method)
    model, spec = clip_model.load_clip(PRETRAINED)
    encoder = model.visual
    encoder.load_state_dict(load_state(merged_path(method), like=encoder.state_dict(),
                                       hint=f"Run `repsurgery merge {method}` (or adamerge) first."))
    for task in tasks(params):
        print(f"{method} / {task}: {_run(task, {method: encoder}, spec, params, device)[0]}")
