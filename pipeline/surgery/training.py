"""Training surgery adapters (any registered one: pipeline/surgery/adapters/).

Trained only on cached features: the merged encoder's feature z and the task's individual
encoder feature as a constant target, unlabeled test images, Adam. The tasks' adapters are
independent, so all tasks are trained at once as one batched (T, ...) problem: Adam is
elementwise, so one optimiser over the stacked weights equals one optimiser per task.

`optimiser: shared` trains as the authors' code ran (and their published "+ Surgery" rows
used): tasks take turns, two batches each per iteration, with ONE Adam over every task's
module whose `zero_grad` (torch 1.8) left zero gradients rather than none, so each step also
moved the other tasks' modules with their stale momentum and decayed their second moments.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.config import LOSSES
from pipeline.errors import PipelineError
from pipeline.surgery import adapters
from pipeline.surgery.adapters import Adapter


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
        out[:, t] = _reshuffled(n, steps * batch_size, generator).view(steps, batch_size)
    return out


def _reshuffled(n: int, need: int, generator: torch.Generator) -> torch.Tensor:
    """`need` row indices in [0, n): one shuffle after another (epochs), cut at `need`."""
    return torch.cat([torch.randperm(n, generator=generator) for _ in range(math.ceil(need / n))])[:need]


def plan(sizes: list[int], batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """The (steps, T, B) rows a surgery run with this seed visits (live or cached, the same)."""
    return batch_indices(sizes, batch_size, steps, seed + 1)


VISIT = 2  # batches a task takes per turn in the reference's loop (`if i > 0: break`)


def visit_plan(sizes: list[int], batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """The (steps, T, B) rows of the reference's loop: every turn of a task reshuffles its
    rows (a new shuffled DataLoader) and takes the first VISIT batches (a task with fewer rows
    than that, e.g. at a small data ratio, continues into another shuffle: batches stay full)."""
    generator = torch.Generator().manual_seed(seed + 1)
    out = torch.empty(steps, len(sizes), batch_size, dtype=torch.long)
    for turn in range(math.ceil(steps / VISIT)):
        for t, n in enumerate(sizes):
            rows = _reshuffled(n, VISIT * batch_size, generator).view(VISIT, batch_size)
            take = min(VISIT, steps - turn * VISIT)
            out[turn * VISIT:turn * VISIT + take, t] = rows[:take]
    return out


class SharedAdam:
    """One torch 1.8 Adam over every lane's weights (lanes along dim 0), after
    `zero_grad()`: a lane with no gradient yet is skipped, as a parameter whose .grad is None;
    once it has had one, every step updates it, with a zero gradient when another lane is the
    one being trained, each lane counting its own steps."""

    def __init__(self, params: list[torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.count = torch.zeros(len(params[0]), dtype=torch.float64, device=params[0].device)  # steps per lane

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        """`active`: the lanes the last backward reached; the other lanes' gradients are zero.
        A lane never reached keeps m = v = 0, so its update is exactly zero."""
        b1, b2 = self.betas
        self.count += (self.count > 0) | active
        steps = self.count.clamp(min=1)
        for p, m, v in zip(self.params, self.m, self.v):
            shape = (-1,) + (1,) * (p.dim() - 1)
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v.sqrt() / (1 - b2 ** steps).sqrt().to(p.dtype).view(shape)).add_(self.eps)
            p.sub_((self.lr / (1 - b1 ** steps)).to(p.dtype).view(shape) * m / denom)
            p.grad = None


def adam(params, lr: float) -> torch.optim.Adam:
    """torch's Adam as the reference ran it (betas 0.9, 0.999), its fused kernel: the same
    update, a quarter of the time of the default one on the many small surgery lanes."""
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=True)


def fit(fetch: Callable[[int], tuple[torch.Tensor, torch.Tensor]], *, n_tasks: int, dim: int, rank: int,
        lr: float, steps: int, loss: str = "l1", seed: int = 0, device: torch.device | str = "cpu",
        copies: int = 1, optimiser: str = "per_task", adapter: str = "surgery", adapter_params: dict | None = None,
        progress: Callable = lambda it: it, on_step: Callable[[int, Adapter], None] | None = None
        ) -> tuple[Adapter, list[list[float]]]:
    """Train adapters on the (copies * T, B, d) feature pairs `fetch(step)` returns: from cached
    stores (`train`), or from running the encoders on images (the reference way, which the
    benchmark times against it). The loss is a sum of per-lane means and Adam is elementwise,
    so every lane trains exactly as it would alone. Returns the module and, per copy, the
    mean loss over its T lanes at every step."""
    criterion = loss_fn(loss)
    module = adapters.get(adapter)(n_tasks, dim, rank, seed, copies, **(adapter_params or {})).to(device)
    if optimiser == "shared":
        return _fit_shared(module, fetch, criterion, n_tasks=n_tasks, lr=lr, steps=steps, copies=copies,
                           progress=progress, on_step=on_step)
    optimiser = adam(module.parameters(), lr)
    curve = []
    for step in progress(range(steps)):
        z, target = fetch(step)
        lanes = module.loss(z, target, criterion)
        optimiser.zero_grad(set_to_none=True)
        lanes.sum().backward()
        optimiser.step()
        curve.append(lanes.detach().view(copies, n_tasks).sum(1) / n_tasks)
        if on_step is not None:
            on_step(step + 1, module)
    return module.cpu(), torch.stack(curve, 1).tolist()


def _fit_shared(module: Adapter, fetch, criterion, *, n_tasks: int, lr: float, steps: int, copies: int, progress,
                on_step) -> tuple[Adapter, list[list[float]]]:
    """The reference's loop: per turn, each task in order takes VISIT steps, and every step is
    one SharedAdam step over all lanes. Each copy (merge method) is still its own problem: its
    lanes are stepped exactly as if it were trained alone."""
    adam = SharedAdam(list(module.parameters()), lr)
    lane_task = torch.arange(copies * n_tasks, device=adam.params[0].device) % n_tasks
    losses = torch.zeros(copies, steps)
    turns = math.ceil(steps / VISIT)
    for turn in progress(range(turns)):
        for t in range(n_tasks):
            active = lane_task == t
            for step in range(turn * VISIT, min((turn + 1) * VISIT, steps)):
                z, target = fetch(step)
                lanes = module.loss(z[active], target[active], criterion, lanes=active)
                lanes.sum().backward()
                adam.step(module.rows(active))
                losses[:, step] += lanes.detach().cpu() / n_tasks
        if on_step is not None:
            on_step(min((turn + 1) * VISIT, steps), module)
    return module.cpu(), losses.tolist()


Features = list[torch.Tensor]  # (N_t, d) per task


def train_groups(merged_sets: list[Features], individual: Features, *, rank: int, lr: float, steps: int, batch_size: int,
                 loss: str = "l1", seed: int = 0, optimiser: str = "per_task", adapter: str = "surgery",
                 adapter_params: dict | None = None, device: torch.device | str = "cpu",
                 progress: Callable = lambda it: it, on_step: Callable[[int, list[Adapter]], None] | None = None
                 ) -> list[tuple[Adapter, list[float]]]:
    """Train several independent sets of adapters (one per merge method: its merged features)
    toward the same individual targets, as one batched problem. Each set comes out bitwise as
    if `train` had trained it alone, in a fraction of the time."""
    sizes = [len(i) for i in individual]
    for merged in merged_sets:
        if len(merged) != len(individual) or any(m.shape != i.shape for m, i in zip(merged, individual)):
            raise PipelineError("merged and individual features must have the same shape for every task")
    loss_fn(loss)  # an unknown loss is refused before any work
    index = (visit_plan if optimiser == "shared" else plan)(sizes, batch_size, steps, seed).to(device)
    # Every lane's rows gathered by one indexing op per step: the merged features of all sets
    # and tasks in one flat table (lane l = set g, task t), the shared targets in another.
    merged = torch.cat([m.to(device, torch.float32) for features in merged_sets for m in features])
    targets = torch.cat([i.to(device, torch.float32) for i in individual])
    starts = torch.tensor([0, *sizes[:-1]]).cumsum(0).to(device)
    lane_task = torch.arange(len(merged_sets) * len(sizes), device=device) % len(sizes)
    lane_start = (torch.arange(len(merged_sets), device=device).repeat_interleave(len(sizes)) * sum(sizes)
                  + starts[lane_task])

    # (steps, lanes * B) rows of the flat tables, computed once
    merged_rows = (index[:, lane_task] + lane_start[None, :, None]).flatten(1)
    target_rows = (index + starts[None, :, None]).flatten(1)  # every set shares the tasks' targets
    shape = (len(merged_sets), len(sizes), batch_size, merged.shape[1])

    def fetch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        target = targets.index_select(0, target_rows[step]).view(shape[1:])
        return (merged.index_select(0, merged_rows[step]).view(-1, *shape[2:]),
                target.expand(shape).reshape(-1, *shape[2:]))

    hook = None if on_step is None else (lambda step, module: on_step(step, module.split(len(merged_sets))))
    module, curves = fit(fetch, n_tasks=len(sizes), dim=merged.shape[1], rank=rank, lr=lr, steps=steps, loss=loss,
                        seed=seed, device=device, copies=len(merged_sets), optimiser=optimiser, adapter=adapter,
                        adapter_params=adapter_params, progress=progress, on_step=hook)
    return list(zip(module.split(len(merged_sets)), curves))


def train(merged: Features, individual: Features, **settings) -> tuple[Adapter, list[float]]:
    """Train all tasks' adapters on cached features (lists of (N_t, d) tensors, one per task)."""
    return train_groups([merged], individual, **settings)[0]
