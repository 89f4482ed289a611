"""What `repsurgery bench` measures. Every figure is a ratio of two runs that do the same work
(same steps, same batches, same encoders) one after the other in one process on one machine,
so the machine's speed cancels out and the ratio carries over to other hardware as far as
the balance between its parts (decode, forward, write) does.
"""
from __future__ import annotations

import dataclasses
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from pipeline.merging.methods import adamerging
from pipeline.surgery import training as surgery
from pipeline.features.extraction import Job, Timings, encode, encoder_on, extract, obtain
from pipeline.benchmarks.measure import peak_memory, sync, timed

RANKS = (4, 8, 16, 32, 64)


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b > 0 else float("nan")


# --- 1, 2 and 5: surgery -------------------------------------------------------------------

def live_fetch(merged: torch.nn.Module, individuals: list[torch.nn.Module], datasets: list, index: torch.Tensor,
               device: torch.device) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """Surgery's inputs the reference way: every step decodes the batch's images and runs the
    merged and the task's individual encoder on them (no gradient flows into either)."""

    @torch.no_grad()
    def fetch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        z, target = [], []
        for t, (individual, data) in enumerate(zip(individuals, datasets)):
            images = torch.stack([data[int(i)] for i in index[step, t]]).to(device)
            z.append(merged(images).float())
            target.append(individual(images).float())
        return torch.stack(z), torch.stack(target)

    return fetch


def surgery_figures(merged_enc: torch.nn.Module, individual_encs: list[torch.nn.Module], datasets: list,
                    merged: list[torch.Tensor], individual: list[torch.Tensor], *, cfg: dict, steps: int,
                    device: torch.device, progress: Callable) -> dict:
    """Live vs cached surgery on the same steps and batches, and a cached rank sweep."""
    common = dict(lr=cfg["lr"], steps=steps, loss=cfg["loss"], seed=cfg["seed"], device=device)
    index = surgery.plan([len(m) for m in merged], cfg["batch_size"], steps, cfg["seed"])
    fetch = live_fetch(merged_enc.to(device).eval(), [e.to(device).eval() for e in individual_encs], datasets,
                       index, device)
    fetch(0)  # warm-up outside the clocks: first forward passes, allocator
    surgery.train(merged, individual, rank=cfg["rank"], batch_size=cfg["batch_size"], **{**common, "steps": 1})
    (live, _), live_s = timed(lambda: surgery.fit(fetch, n_tasks=len(merged), dim=merged[0].shape[1],
                                                  rank=cfg["rank"], progress=progress("live surgery"), **common),
                              device)
    (cached, _), cached_s = timed(lambda: surgery.train(merged, individual, rank=cfg["rank"],
                                                        batch_size=cfg["batch_size"],
                                                        progress=progress("cached surgery"), **common), device)
    per_rank = {}
    for rank in RANKS:
        _, per_rank[rank] = timed(lambda: surgery.train(merged, individual, rank=rank, batch_size=cfg["batch_size"],
                                                        progress=progress(f"rank {rank}"), **common), device)
    sweep_s = sum(per_rank.values())
    agree = max((a - b).abs().max().item() for a, b in zip(live.state_dict().values(), cached.state_dict().values()))
    return {
        "surgery_live_over_cached": {"ratio": _ratio(live_s, cached_s), "live_s": round(live_s, 3),
                                     "cached_s": round(cached_s, 3), "steps": steps, "rank": cfg["rank"],
                                     "batch_size": cfg["batch_size"], "tasks": len(merged),
                                     "max_weight_difference_live_vs_cached": agree},
        "rank_sweep_over_one_live_run": {"ratio": _ratio(sweep_s, live_s), "sweep_s": round(sweep_s, 3),
                                         "live_s": round(live_s, 3), "ranks": list(RANKS), "steps": steps,
                                         "per_rank_s": {str(r): round(s, 3) for r, s in per_rank.items()}},
    }


def batching_figures(merged: list[torch.Tensor], individual: list[torch.Tensor], *, cfg: dict, steps: int,
                     device: torch.device, progress: Callable) -> dict:
    """The surgery stage as it runs (all tasks as one batched problem) vs. task after task."""
    common = dict(rank=cfg["rank"], lr=cfg["lr"], steps=steps, batch_size=cfg["batch_size"], loss=cfg["loss"],
                  seed=cfg["seed"], device=device)
    _, batched_s = timed(lambda: surgery.train(merged, individual, progress=progress("batched"), **common), device)
    _, sequential_s = timed(lambda: [surgery.train([m], [i], progress=progress(f"task {t}"), **common)
                                     for t, (m, i) in enumerate(zip(merged, individual))], device)
    return {"surgery_sequential_over_batched": {
        "ratio": _ratio(sequential_s, batched_s), "batched_s": round(batched_s, 3),
        "sequential_s": round(sequential_s, 3), "steps": steps, "tasks": len(merged),
        "steps_per_s_batched": round(steps / batched_s, 1), "steps_per_s_sequential": round(steps * len(merged)
                                                                                             / sequential_s, 1)}}


# --- 3: extraction ---------------------------------------------------------------------------

def _bare_forward(jobs: list[Job], *, batch_size: int, device: torch.device, autocast) -> float:
    """The encoders alone on the same preprocessed batches, decoded beforehand (not timed)."""
    total = 0.0
    for job in jobs:
        data = obtain(job.dataset)
        batches = [job.on_device(job.collate([data[i] for i in range(s, min(s + batch_size, job.n_rows))]), device)
                   for s in range(0, job.n_rows, batch_size)]
        encoders = [encoder_on(t.encoder, device) for t in job.targets]
        _, seconds = timed(lambda: [encode(e, x, autocast) for x in batches for e in encoders], device)
        total += seconds
    return total


def extraction_figures(make_jobs: Callable[[Path], list[Job]], *, dim: int, batch_size: int, device: torch.device,
                       dtype: str, autocast, progress: Callable) -> dict:
    """Extraction (decode, preprocess, forward, write) over the bare forward pass, with the
    split; and one decode per image for all encoders vs. one decode per encoder."""
    scratch = Path(tempfile.mkdtemp(prefix="repsurgery-bench-"))
    try:
        jobs = make_jobs(scratch / "warm")
        for job in jobs:  # build datasets and encoders, and run each once, before any clock starts
            data = obtain(job.dataset)
            images = job.on_device(job.collate([data[i] for i in range(min(batch_size, job.n_rows))]), device)
            [encode(encoder_on(t.encoder, device), images, autocast) for t in job.targets]
        kwargs = dict(dim=dim, batch_size=batch_size, device=device, dtype=dtype, autocast=autocast,
                      progress=progress)
        bare_s = _bare_forward(jobs, batch_size=batch_size, device=device, autocast=autocast)
        split = Timings()
        _, once_s = timed(lambda: extract(make_jobs(scratch / "once"), timings=split, **kwargs), device)
        per_encoder = [dataclasses.replace(j, targets=[t]) for j in make_jobs(scratch / "each") for t in j.targets]
        _, each_s = timed(lambda: extract(per_encoder, **kwargs), device)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = sum(j.n_rows for j in jobs)
    forwards = sum(j.n_rows * len(j.targets) for j in jobs)
    return {
        "extract_overhead": {"ratio": _ratio(once_s, bare_s), "extract_s": round(once_s, 3),
                             "bare_forward_s": round(bare_s, 3),
                             "split_s": {"decode": round(split.decode, 3), "forward": round(split.forward, 3),
                                         "write": round(split.write, 3),
                                         "other": round(once_s - split.total(), 3)},
                             "images": rows, "encoder_forwards": forwards, "batch_size": batch_size},
        "decode_once_speedup": {"ratio": _ratio(each_s, once_s), "decode_per_encoder_s": round(each_s, 3),
                                "decode_once_s": round(once_s, 3), "images": rows,
                                "decodes_per_encoder_run": forwards, "decodes_once": rows},
    }


# --- 4: AdaMerging ---------------------------------------------------------------------------

def adamerging_figures(encoder: torch.nn.Module, coeffs: adamerging.MergeCoefficients, heads: list[torch.Tensor],
                       batches: list[torch.Tensor], *, steps: int, device: torch.device) -> dict:
    """Task-by-task accumulation vs. the reference's all-graphs-alive step, and the learned merges'
    own grouping (`adamerging.Grouping`: on CUDA, as many tasks per graph as the memory holds):
    same batches."""
    encoder = encoder.to(device).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    coeffs = coeffs.to(device)
    heads = [h.to(device) for h in heads]
    batches = [b.to(device) for b in batches]
    persistent = [*encoder.parameters(), *encoder.buffers(), *coeffs.pretrained.values(),
                  *coeffs.vectors.values(), *batches, *heads]
    out = {}
    per_task = functools.partial(adamerging.step, grouping=adamerging.Grouping(graph_inputs=0))  # task by task
    grouped = functools.partial(adamerging.step, grouping=adamerging.Grouping.on(device))  # measured in the warm-up
    for name, fn in (("task_by_task", per_task), ("all_graphs", adamerging.step_all_graphs), ("grouped", grouped)):
        def one_step():
            coeffs.lambdas.grad = None
            fn(encoder, coeffs, heads, batches)

        one_step()  # warm-up (allocator, kernels)
        memory, method = peak_memory(one_step, device, persistent)
        sync(device)
        _, seconds = timed(lambda: [one_step() for _ in range(steps)], device)
        out[name] = {"peak_bytes": memory, "step_s": seconds / steps}
    mine, ref, grouped = out["task_by_task"], out["all_graphs"], out["grouped"]
    shared = {"tasks": len(batches), "images_per_task": len(batches[0]), "layer_wise": coeffs.lambdas.shape[1] > 1}
    return {
        "adamerging_memory_ratio": {"ratio": _ratio(mine["peak_bytes"], ref["peak_bytes"]),
                                    "task_by_task_bytes": mine["peak_bytes"], "all_graphs_bytes": ref["peak_bytes"],
                                    "measured_by": method, **shared},
        "adamerging_step_ratio": {"ratio": _ratio(mine["step_s"], ref["step_s"]),
                                  "task_by_task_step_s": round(mine["step_s"], 4),
                                  "all_graphs_step_s": round(ref["step_s"], 4), "steps": steps, **shared},
        # the step as learned merges run it (goal: within 1.3x of all graphs where memory allows)
        "adamerging_grouped_ratio": {"ratio": _ratio(grouped["step_s"], ref["step_s"]),
                                     "grouped_step_s": round(grouped["step_s"], 4),
                                     "grouped_bytes": grouped["peak_bytes"], **shared},
    }
