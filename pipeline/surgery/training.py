"""Representation Surgery: per-task adapters z_hat = z - W_up ReLU(W_down z).

Trained only on cached features: the merged encoder's feature z and the task's individual
encoder feature as a constant target, unlabeled test images, Adam. The tasks' adapters are
independent, so all tasks are trained at once as one batched (T, ...) problem: Adam is
elementwise, so one optimiser over the stacked weights equals one optimiser per task.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.config import LOSSES
from pipeline.errors import PipelineError
from pipeline.surgery.adapters import Surgery


def loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-lane loss over (T, B, d): a (T,) vector of means over batch and dimension (the
    training objective is its sum, so each lane's adapter gets only its own gradient)."""
    if name == "l1":
        return lambda a, b: (a - b).abs().mean((1, 2))
    if name == "mse":
        return lambda a, b: (a - b).pow(2).mean((1, 2))
    if name == "smooth_l1":
        return lambda a, b: F.smooth_l1_loss(a, b, reduction="none").mean((1, 2))
    if name == "cosine":
        return lambda a, b: -F.cosine_similarity(a, b, dim=-1).mean(1)
    raise PipelineError(f"unknown surgery loss {name!r}: choose one of {', '.join(LOSSES)}")


def batch_indices(sizes: list[int], batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, T, B) row indices: each task walks its own reshuffled epochs independently."""
    generator = torch.Generator().manual_seed(seed)
    out = torch.empty(steps, len(sizes), batch_size, dtype=torch.long)
    for t, n in enumerate(sizes):
        need = steps * batch_size
        perms = [torch.randperm(n, generator=generator) for _ in range(math.ceil(need / n))]
        out[:, t] = torch.cat(perms)[:need].view(steps, batch_size)
    return out


def plan(sizes: list[int], batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """The (steps, T, B) rows a surgery run with this seed visits (live or cached, the same)."""
    return batch_indices(sizes, batch_size, steps, seed + 1)


def fit(fetch: Callable[[int], tuple[torch.Tensor, torch.Tensor]], *, n_tasks: int, dim: int, rank: int,
        lr: float, steps: int, loss: str = "l1", seed: int = 0, device: torch.device | str = "cpu",
        copies: int = 1, progress: Callable = lambda it: it,
        on_step: Callable[[int, Surgery], None] | None = None) -> tuple[Surgery, list[list[float]]]:
    """Train adapters on the (copies * T, B, d) feature pairs `fetch(step)` returns: from cached
    stores (`train`), or from running the encoders on images (the reference way, which the
    benchmark times against it). The loss is a sum of per-lane means and Adam is elementwise,
    so every lane trains exactly as it would alone. Returns the module and, per copy, the
    mean loss over its T lanes at every step."""
    criterion = loss_fn(loss)
    module = Surgery(n_tasks, dim, rank, seed, copies).to(device)
    optimiser = torch.optim.Adam(module.parameters(), lr=lr, betas=(0.9, 0.999))
    curve = []
    for step in progress(range(steps)):
        z, target = fetch(step)
        lanes = criterion(module(z), target)
        optimiser.zero_grad(set_to_none=True)
        lanes.sum().backward()
        optimiser.step()
        curve.append(lanes.detach().view(copies, n_tasks).sum(1) / n_tasks)
        if on_step is not None:
            on_step(step + 1, module)
    return module.cpu(), torch.stack(curve, 1).tolist()


Features = list[torch.Tensor]  # (N_t, d) per task


def train_groups(merged_sets: list[Features], individual: Features, *, rank: int, lr: float, steps: int, batch_size: int,
                 loss: str = "l1", seed: int = 0, device: torch.device | str = "cpu",
                 progress: Callable = lambda it: it, on_step: Callable[[int, list[Surgery]], None] | None = None
                 ) -> list[tuple[Surgery, list[float]]]:
    """Train several independent sets of adapters (one per merge method: its merged features)
    toward the same individual targets, as one batched problem. Each set comes out bitwise as
    if `train` had trained it alone, in a fraction of the time."""
    sizes = [len(i) for i in individual]
    for merged in merged_sets:
        if len(merged) != len(individual) or any(m.shape != i.shape for m, i in zip(merged, individual)):
            raise PipelineError("merged and individual features must have the same shape for every task")
    loss_fn(loss)  # an unknown loss is refused before any work
    index = plan(sizes, batch_size, steps, seed).to(device)
    # Every lane's rows gathered by one indexing op per step: the merged features of all sets
    # and tasks in one flat table (lane l = set g, task t), the shared targets in another.
    merged = torch.cat([m.to(device, torch.float32) for features in merged_sets for m in features])
    targets = torch.cat([i.to(device, torch.float32) for i in individual])
    starts = torch.tensor([0, *sizes[:-1]]).cumsum(0).to(device)
    lane_task = torch.arange(len(merged_sets) * len(sizes), device=device) % len(sizes)
    lane_start = (torch.arange(len(merged_sets), device=device).repeat_interleave(len(sizes)) * sum(sizes)
                  + starts[lane_task])

    def fetch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = index[step][lane_task]                      # (lanes, B) rows within each task
        shape = (len(lane_task), batch_size, merged.shape[1])
        return (merged[(rows + lane_start[:, None]).view(-1)].view(shape),
                targets[(rows + starts[lane_task][:, None]).view(-1)].view(shape))

    hook = None if on_step is None else (lambda step, module: on_step(step, module.split(len(merged_sets))))
    module, curves = fit(fetch, n_tasks=len(sizes), dim=merged.shape[1], rank=rank, lr=lr, steps=steps, loss=loss,
                        seed=seed, device=device, copies=len(merged_sets), progress=progress, on_step=hook)
    return list(zip(module.split(len(merged_sets)), curves))


def train(merged: Features, individual: Features, **settings) -> tuple[Surgery, list[float]]:
    """Train all tasks' adapters on cached features (lists of (N_t, d) tensors, one per task)."""
    return train_groups([merged], individual, **settings)[0]
