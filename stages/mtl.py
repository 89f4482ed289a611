"""Stage (miniature world only): Traditional MTL, the upper reference of the analysis tables.
Trains one encoder jointly on all tasks, then caches its test features once, like any
other encoder, so the analyses read its accuracy from features/mtl/ without running it."""
from __future__ import annotations

import functools
import json

import torch
from safetensors.torch import load_file

from cache import FeatureStore, open_store
from pipeline import clip_model, data
from pipeline.checkpoints import read_metadata, save_state
from pipeline.errors import PipelineError
from pipeline.extraction import Job, Ref, Target, extract
from pipeline.world.mtl import train_multitask
from stages.common import (DATA, HEADS, MODELS, PRETRAINED, SPLIT, is_world, progress, store_path, tasks,
                           write_json)
from stages.extract import AUTOCAST, build_dataset, build_encoder
from stages.world import train_images

MTL = MODELS / "mtl"
MTL_ENCODER = MTL / "encoder.safetensors"
FIX_HINT = "run `repsurgery mtl` (miniature world only)"


def build_mtl(params: dict, device: torch.device) -> None:
    if not is_world(params):  # the real setting has no training data here: the paper's number is quoted instead
        write_json(MTL / "train.json", {"skipped": "Traditional MTL is built for the miniature world only"})
        store_path("mtl", "none").parent.mkdir(parents=True, exist_ok=True)
        (store_path("mtl", "none").parent / "skipped.txt").write_text("miniature world only\n")
        print("Traditional MTL: skipped (miniature world only; the paper reports 88.9 for ViT-B/32)")
        return
    cfg, names = params["mtl"], tasks(params)
    model, spec = clip_model.load_clip(PRETRAINED)
    heads = load_file(str(HEADS))
    loaded = [train_images(t, spec) for t in progress(names, desc="decode train images", unit="task")]
    state, curve = train_multitask(
        model.visual, [heads[t] for t in names], [x for x, _ in loaded], [y for _, y in loaded],
        steps=cfg["steps"], batch_size=cfg["batch_size"], lr=cfg["lr"], weight_decay=cfg["weight_decay"],
        warmup=cfg["warmup"], seed=params["world"]["seed"], device=device,
        progress=lambda it: progress(it, desc="multi-task fine-tune", unit="step"))
    fp = save_state(MTL_ENCODER, state, tasks=json.dumps(names))
    write_json(MTL / "train.json", {"tasks": names, "steps": cfg["steps"], "loss_first": curve[0],
                                    "loss_last": sum(curve[-10:]) / len(curve[-10:])})
    encoder_ref = Ref(f"encoder:{fp}", functools.partial(build_encoder, str(PRETRAINED.resolve()),
                                                         str(MTL_ENCODER.resolve())))
    jobs = []
    for task in names:
        data_fp = data.dataset_fingerprint(DATA, task, SPLIT)
        attrs = {"encoder_fingerprint": fp, "task": task, "split": SPLIT, "dataset_fingerprint": data_fp,
                 "preprocess": spec.get("preprocess") or spec.get("arch")}
        dataset = Ref(f"data:{data_fp}", functools.partial(build_dataset, str(DATA.resolve()), task, SPLIT,
                                                            str(PRETRAINED.resolve())))
        jobs.append(Job(dataset, n_rows=len(data.labels(DATA, task, SPLIT)), name=f"mtl {task}",
                        targets=[Target(encoder_ref, store_path("mtl", task), attrs)]))
    ext = params["extract"]
    extract(jobs, dim=model.visual.output_dim, batch_size=ext["batch_size"], device=device, dtype=ext["dtype"],
            autocast=AUTOCAST[ext.get("autocast", "none")], fix_hint=lambda target: FIX_HINT, progress=progress)
    print(f"Traditional MTL encoder -> {MTL_ENCODER} (loss {curve[0]:.3f} -> {curve[-1]:.3f}); "
          f"features -> {store_path('mtl', names[0]).parent}/")


def open_mtl_features(task: str) -> FeatureStore:
    """The MTL encoder's cached features of `task`, refused if made by another MTL encoder."""
    if not MTL_ENCODER.exists():
        raise PipelineError(f"no Traditional MTL encoder at {MTL_ENCODER}: {FIX_HINT}")
    expect = {"encoder_fingerprint": read_metadata(MTL_ENCODER)["fingerprint"], "task": task, "split": SPLIT}
    return open_store(store_path("mtl", task), expect=expect, fix_hint=FIX_HINT)
