"""Stages that produce merged image encoders: training-free merges and AdaMerging."""
from __future__ import annotations

import inspect
import itertools

import torch
from safetensors.torch import load_file

from pipeline import adamerging, clip_model, data, merging
from pipeline.checkpoints import StateDict, load_state, save_state
from pipeline.errors import PipelineError
from stages.common import (DATA, HEADS, MERGED, PRETRAINED, SPLIT, check_method, finetuned_path, merged_path,
                           progress, tasks, write_json)


def pretrained_and_finetuned(params: dict) -> tuple[torch.nn.Module, StateDict, list[StateDict]]:
    encoder = clip_model.image_encoder(PRETRAINED)
    pretrained = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    finetuned = [load_state(finetuned_path(t), like=pretrained, hint="Run `repsurgery prepare-finetuned` to create it.")
                 for t in tasks(params)]
    return encoder, pretrained, finetuned


def _method_params(method: str, cfg: dict | None, function) -> dict:
    cfg = dict(cfg or {})
    allowed = [p for p in inspect.signature(function).parameters if p not in ("pretrained", "vectors")]
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise PipelineError(f"params `merge.{method}` has unknown key(s) {unknown}; allowed: {allowed}")
    return cfg


def merge(method: str, params: dict) -> None:
    check_method(method, merging.METHODS)
    _, pretrained, finetuned = pretrained_and_finetuned(params)
    cfg = _method_params(method, params.get("merge", {}).get(method), getattr(merging, method))
    merged = merging.merge(method, pretrained, finetuned, **cfg)
    fp = save_state(merged_path(method), merged, method=method)
    print(f"{method}: merged {len(finetuned)} encoders -> {merged_path(method)} (fingerprint {fp})")


def _stream(dataset, batch_size: int, seed: int):
    """Endless shuffled batches of unlabeled images, reshuffled every epoch."""
    for epoch in itertools.count():
        yield from data.loader(dataset, batch_size, shuffle=True, seed=seed + epoch)


def adamerge(method: str, params: dict, device: torch.device) -> None:
    check_method(method, adamerging.METHODS)
    cfg = params["adamerging"][method]
    names = tasks(params)
    encoder, pretrained, finetuned = pretrained_and_finetuned(params)
    vectors = [merging.task_vector(ft, pretrained) for ft in finetuned]
    coeffs = adamerging.MergeCoefficients(pretrained, vectors, layer_wise=method == "lw_adamerging", init=cfg["init"])
    heads = load_file(str(HEADS))
    transform = clip_model.preprocess_for(clip_model.read_spec(PRETRAINED))
    per_task = cfg["batch_size"] * cfg["batches_per_task"]
    streams = [_stream(data.ImageDataset(DATA, t, SPLIT, transform), per_task, cfg["seed"] + 1000 * i)
               for i, t in enumerate(names)]
    curve = adamerging.learn(encoder, coeffs, [heads[t] for t in names], streams, steps=cfg["steps"], lr=cfg["lr"],
                             device=device, progress=lambda it: progress(it, desc=method, unit="step"))
    with torch.no_grad():
        merged = coeffs.merged()
    fp = save_state(merged_path(method), merged, method=method)
    lambdas = coeffs.clamped()
    write_json(MERGED / f"{method}.json", {
        "tasks": names, "keys": coeffs.keys if method == "lw_adamerging" else ["all"],
        "lambdas": lambdas.tolist(), "loss_first": curve[0], "loss_last": curve[-1],
    })
    print(f"{method}: entropy {curve[0]:.3f} -> {curve[-1]:.3f}, mean lambda {lambdas.mean():.3f}; "
          f"-> {merged_path(method)} (fingerprint {fp})")
