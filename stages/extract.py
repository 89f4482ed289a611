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


def _run(task: str, named: dict[str, tuple[torch.nn.Module, str]], spec: dict, params: dict,
         device: torch.device) -> list[Path]:
    """Extract `task` with every named (encoder, its fingerprint) from one decode of the images."""
    cfg = params["extract"]
    dataset = data.ImageDataset(DATA, task, SPLIT, clip_model.preprocess_for(spec))
    attrs = {"task": task, "split": SPLIT, "dataset_fingerprint": data.dataset_fingerprint(DATA, task, SPLIT),
             "preprocess": spec.get("preprocess") or spec.get("arch")}
    targets = [Target(enc, store_path(name, task), {"encoder_fingerprint": fp, **attrs})
               for name, (enc, fp) in named.items()]
    return extract(targets, dataset, batch_size=cfg["batch_size"], device=device, dtype=cfg["dtype"],
                   autocast=AUTOCAST[cfg.get("autocast", "none")], fix_hint=fix_hint(next(iter(named))),
                   progress=lambda it, **kw: progress(it, desc=f"extract {task}", unit="batch", **kw))


def extract_reference(params: dict, device: torch.device) -> None:
    """Pretrained features on every task and each individual encoder on its own task,
    computed once and shared by every merge method; both see the same decoded batches."""
    model, spec = clip_model.load_clip(PRETRAINED)
    pretrained = model.visual
    reference = (pretrained, fingerprint(pretrained.state_dict()))
    for task in tasks(params):
        individual = copy.deepcopy(pretrained)
        state = load_state(finetuned_path(task), like=pretrained.state_dict(),
                           hint="Run `repsurgery finetune` to create it.")
        individual.load_state_dict(state)
        named = {"pretrained": reference, "individual": (individual, fingerprint(state))}
        paths = _run(task, named, spec, params, device)
        print(f"{task}: " + ", ".join(map(str, paths)))


def extract_merged(method: str, params: dict, device: torch.device) -> None:
    check_method(method)
    model, spec = clip_model.load_clip(PRETRAINED)
    encoder = model.visual
    state = load_state(merged_path(method), like=encoder.state_dict(),
                       hint=f"Run `repsurgery merge {method}` (or adamerge) first.")
    encoder.load_state_dict(state)
    named = {method: (encoder, fingerprint(state))}
    for task in tasks(params):
        print(f"{method} / {task}: {_run(task, named, spec, params, device)[0]}")
