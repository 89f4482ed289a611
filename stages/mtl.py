"""Stage `mtl` (miniature worlds only): Traditional MTL, the upper reference of the analysis
tables. Trains one encoder jointly on all tasks, through the heads every other encoder is
evaluated with (frozen: the zero-shot heads, or in the text world the fine-tuned ones), then
caches its test features once, like any other encoder, so the analyses read its accuracy from
features/mtl/ without running it."""
from __future__ import annotations

import json

import torch

from pipeline import workspace
from pipeline.config import Params
from pipeline.features import jobs as planning
from pipeline.features.extraction import extract
from pipeline.models import encoders
from pipeline.models.checkpoints import load_heads, save_state
from pipeline.reporting import published
from pipeline.world import shipped
from pipeline.world.finetune import train_inputs
from pipeline.world.mtl import train_multitask
from stages.common import progress


def build_mtl(params: Params, device: torch.device, from_scratch: bool = False) -> None:
    names = params.tasks
    if not params.is_world:  # the real setting: the published figure is quoted instead (metrics.json, tables)
        workspace.write_json(workspace.MTL / "train.json", {"skipped": "Traditional MTL: miniature world only"})
        workspace.write_json(workspace.FEATURES / "mtl" / "skipped.json", {"skipped": "miniature world only"})
        quoted = published.rows(params.source.family, params.source.pretrained.arch).get("mtl", {}).get("avg")
        print("Traditional MTL: skipped (miniature world only" + (f"; {quoted} published for this setting)"
                                                                  if quoted is not None else ")"))
        return
    if from_scratch or not shipped.install("mtl", params):
        train(params, device)
    ext = params.extract
    todo = planning.jobs(names, ["mtl"], ext)
    extract(todo, dim=planning.feature_dim(), batch_size=ext.batch_size, device=device, dtype=ext.dtype,
            autocast=planning.AUTOCAST[ext.autocast], fix_hint=planning.hint, progress=progress)
    print(f"Traditional MTL features -> {workspace.FEATURES / 'mtl'}/")


def train(params: Params, device: torch.device) -> None:
    names, cfg = params.tasks, params.mtl
    heads = load_heads(workspace.HEADS, names)
    loaded = [train_inputs(workspace.DATA, t, workspace.PRETRAINED)
              for t in progress(names, desc="read train splits", unit="task")]
    state, curve = train_multitask(
        encoders.encoder(workspace.PRETRAINED), [heads[t] for t in names], [x for x, _ in loaded], [y for _, y in loaded],
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
        warmup=cfg.warmup, seed=params.world.seed, device=device,
        progress=lambda it: progress(it, desc="multi-task fine-tune", unit="step"))
    save_state(workspace.MTL_ENCODER, state, tasks=json.dumps(names))
    workspace.write_json(workspace.MTL / "train.json", {"tasks": names, "steps": cfg.steps, "loss_first": curve[0],
                                                        "loss_last": sum(curve[-10:]) / len(curve[-10:])})
    print(f"Traditional MTL encoder -> {workspace.MTL_ENCODER} (loss {curve[0]:.3f} -> {curve[-1]:.3f})")
