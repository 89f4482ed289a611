"""Stage: train the per-task surgery adapters of one merge method from cached features only."""
from __future__ import annotations

import json

import torch

from pipeline.checkpoints import load_state, read_metadata, save_state
from pipeline.errors import PipelineError
from pipeline.surgery import Surgery, train
from stages.common import SURGERY, check_method, progress, tasks, write_json
from stages.features import open_features


def surgery_path(method: str):
    return SURGERY / f"{method}.safetensors"


def run_surgery(method: str, params: dict, device: torch.device) -> None:
    check_method(method)
    cfg = params["surgery"]
    if not isinstance(cfg["rank"], int) or cfg["rank"] <= 0:
        raise PipelineError(f"surgery.rank must be a positive integer, got {cfg['rank']!r} (params.yaml or -S)")
    names = tasks(params)
    merged = [torch.from_numpy(open_features(method, t).to_numpy()) for t in names]
    individual = [torch.from_numpy(open_features("individual", t).to_numpy()) for t in names]
    module, curve = train(merged, individual, rank=cfg["rank"], lr=cfg["lr"], steps=cfg["steps"],
                          batch_size=cfg["batch_size"], loss=cfg["loss"], seed=cfg["seed"], device=device,
                          progress=lambda it: progress(it, desc=f"surgery {method}", unit="step"))
    save_state(surgery_path(method), module.state_dict(), method=method, tasks=json.dumps(names))
    write_json(SURGERY / f"{method}.json", {"tasks": names, "rank": cfg["rank"], "loss_first": curve[0],
                                             "loss_last": curve[-1]})
    print(f"surgery {method}: {len(names)} tasks, rank {cfg['rank']}, loss {curve[0]:.4f} -> {curve[-1]:.4f}; "
          f"-> {surgery_path(method)}")


def load_surgery(method: str, names: list[str]) -> Surgery:
    path = surgery_path(method)
    state = load_state(path, hint=f"Run `repsurgery surgery {method}` first.")
    trained_on = json.loads(read_metadata(path)["tasks"])
    if trained_on != names:
        raise PipelineError(f"{path} was trained for tasks {trained_on}, params list {names}: "
                            f"re-run `repsurgery surgery {method}`")
    n_tasks, rank, dim = state["down"].shape
    module = Surgery(n_tasks, dim, rank)
    module.load_state_dict(state)
    return module.eval()
