"""The paper's surgery analyses on cached features: sweeps of one setting (rank, loss), the
available-data ratio (Table 4), online surgery (Table 5) and accuracy against training steps
(Fig. 7/9). Pure functions over in-memory feature tensors; they reuse the batched trainer of
`pipeline.surgery`, so a sweep point with the pipeline's settings equals the pipeline's run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pipeline.reporting import metrics
from pipeline.errors import PipelineError
from pipeline.surgery.adapters import Adapter
from pipeline.surgery.adapters.surgery import Surgery
from pipeline.surgery.training import adam, loss_fn, train_groups


@dataclass
class TaskSet:
    """One merge method's cached features for every task, plus what evaluation needs."""
    merged: list[torch.Tensor]      # (N_t, d) per task
    individual: list[torch.Tensor]  # (N_t, d) per task: surgery's target
    heads: list[torch.Tensor]       # zero-shot head per task
    labels: list[np.ndarray]        # test labels per task (evaluation only, never training)


def correct(data: TaskSet, module: Adapter | None = None) -> list[torch.Tensor]:
    """Per task, whether each test image is classified right (with `module`'s surgery if given)."""
    out = []
    for t, (z, head, labels) in enumerate(zip(data.merged, data.heads, data.labels)):
        if module is not None:
            with torch.no_grad():
                z = module(z.to(next(module.parameters()).device), t).cpu()
        out.append(metrics.correct(z, head, labels))
    return out


def accuracies(data: TaskSet, module: Adapter | None = None) -> list[float]:
    """Top-1 accuracy (%) per task on the full test features, with `module`'s surgery if given."""
    return [metrics.percent(c) for c in correct(data, module)]


def trained(datas: list[TaskSet], settings: dict, on_step=None) -> list[Adapter]:
    """Every method's adapters under `settings` (rank, lr, steps, batch_size, loss, seed),
    trained side by side (each exactly as alone)."""
    return [module for module, _ in train_groups([d.merged for d in datas], datas[0].individual, on_step=on_step,
                                                 **settings)]


def surgery_accuracies(datas: list[TaskSet], settings: dict) -> list[list[float]]:
    """Per method, accuracy per task after surgery trained with `settings`."""
    return [accuracies(d, m) for d, m in zip(datas, trained(datas, settings))]


def sweep(datas: list[TaskSet], base: dict, key: str, values: list) -> dict:
    """Per value of one surgery setting (the others fixed at `base`): per method, accuracy per task."""
    if key not in base:
        raise PipelineError(f"cannot sweep {key!r}: not a surgery setting ({', '.join(base)})")
    return {value: surgery_accuracies(datas, {**base, key: value}) for value in values}


def subset_rows(n: int, ratio: float, seed: int) -> torch.Tensor:
    """The rows surgery may see at a given data ratio: a seeded random subset of
    max(1, round(ratio * n)) rows, sorted; the same seed gives nested subsets for growing ratios."""
    if not 0 < ratio <= 1:
        raise PipelineError(f"data ratio must be in (0, 1], got {ratio}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:max(1, round(ratio * n))].sort().values


def data_ratio(datas: list[TaskSet], base: dict, ratios: list[float], seed: int) -> dict:
    """Table 4: surgery trained on a fraction of each task's test images (the same images for
    every method), evaluated on all of them. Per ratio: per method, accuracy per task."""
    out = {}
    for ratio in ratios:
        rows = [subset_rows(len(z), ratio, seed + t) for t, z in enumerate(datas[0].merged)]
        seen = [TaskSet([z[r] for z, r in zip(d.merged, rows)], [z[r] for z, r in zip(d.individual, rows)],
                        d.heads, d.labels) for d in datas]
        out[ratio] = [accuracies(d, m) for d, m in zip(datas, trained(seen, base))]
    return out


def curve(datas: list[TaskSet], base: dict, eval_every: int) -> list[dict[int, list[float]]]:
    """Fig. 7/9: per method, accuracy per task every `eval_every` steps of one ordinary surgery
    run (step 0 = no surgery; the last step always included, equal to the final accuracy)."""
    if eval_every <= 0:
        raise PipelineError(f"analyses.curve.eval_every must be a positive integer, got {eval_every}")
    points = [{0: accuracies(d)} for d in datas]

    def on_step(step: int, modules: list[Adapter]) -> None:
        if step % eval_every == 0 or step == base["steps"]:
            for d, module, out in zip(datas, modules, points):
                out[step] = accuracies(d, module)

    trained(datas, base, on_step=on_step)
    return points


def online_counts(n: int, fractions: list[float]) -> list[int]:
    """Samples seen at each checkpoint fraction of a task's n samples (at least one)."""
    if any(not 0 < f <= 1 for f in fractions):
        raise PipelineError(f"online checkpoints must be fractions in (0, 1], got {fractions}")
    return [max(1, math.ceil(f * n - 1e-9)) for f in fractions]


def online(datas: list[TaskSet], *, rank: int, lr: float, loss: str, seed: int, fractions: list[float],
           progress: Callable = lambda it, **kw: it,
           visit: Callable[[int, int, int], None] | None = None) -> list[dict]:
    """Table 5: online surgery. A task's test samples arrive in a seeded random order (the same
    for every method), one at a time (batch 1), and each is used for exactly one Adam step.
    Each method and task has its own adapter and optimiser (as in the batched trainer), starting
    from `Surgery(T, d, rank, seed)`'s initialisation, so training them one after another or
    side by side is the same computation: every (method, task) lane whose task has equally many
    samples is stepped side by side as one batched problem (the sum of per-lane losses gives
    each adapter only its own gradient).

    Returns, per method, {fraction: accuracy per task}, each task evaluated on its full test
    set after it has seen that fraction of its samples. `visit(method, task, row)` is told
    every sample used.
    """
    criterion = loss_fn(loss)
    first = datas[0]
    init = Surgery(len(first.merged), first.merged[0].shape[1], rank, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    orders = [torch.randperm(len(z), generator=generator) for z in first.merged]
    out = [{f: [0.0] * len(first.merged) for f in fractions} for _ in datas]
    groups: dict[int, list[tuple[int, int]]] = {}
    for t, z in enumerate(first.merged):
        groups.setdefault(len(z), []).extend((m, t) for m in range(len(datas)))
    for n, lanes in groups.items():
        adapt = init.select([t for _, t in lanes])
        optimiser = adam(adapt.parameters(), lr)
        z = torch.stack([datas[m].merged[t] for m, t in lanes]).float()       # (L, n, d)
        target = torch.stack([datas[m].individual[t] for m, t in lanes]).float()
        order = torch.stack([orders[t] for _, t in lanes], 1)                  # (n, L)
        lane = torch.arange(len(lanes))
        counts = online_counts(n, fractions)
        at = {}
        for seen in progress(range(1, n + 1), desc=f"online, {len(lanes)} lane(s) of {n} samples", unit="sample",
                             leave=False):
            rows = order[seen - 1]
            if visit is not None:
                for l, (m, t) in enumerate(lanes):
                    visit(m, t, int(rows[l]))
            value = criterion(adapt(z[lane, rows].unsqueeze(1)), target[lane, rows].unsqueeze(1)).sum()
            optimiser.zero_grad(set_to_none=True)
            value.backward()
            optimiser.step()
            if seen in counts:
                with torch.no_grad():
                    adapted = adapt(z)
                at[seen] = [metrics.accuracy(adapted[l], datas[m].heads[t], datas[m].labels[t])
                            for l, (m, t) in enumerate(lanes)]
        for count, fraction in zip(counts, fractions):
            for l, (m, t) in enumerate(lanes):
                out[m][fraction][t] = at[count][l]
    return out
