"""`repsurgery bench`: what caching features buys, measured side by side -> results/bench.json.

Reads the pipeline's outputs (data, checkpoints, feature stores) and times each alternative
against the pipeline's way on the same work; see pipeline/benchmarks/bench.py for what each
figure is.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from pipeline import workspace
from pipeline.benchmarks import bench
from pipeline.config import Params
from pipeline.features import jobs as planning
from pipeline.features.extraction import Job, Ref, forget_built
from pipeline.features.stores import read_features
from pipeline.merging import registry
from pipeline.merging.inputs import load_inputs
from pipeline.merging.methods import adamerging

QUICK = {"steps": 4, "stage_steps": 4, "rows": None, "adamerging_steps": 1}


def first_rows(build, n: int):
    """The first n rows of a dataset (picklable, like the builders it wraps)."""
    dataset = build()
    return torch.utils.data.Subset(dataset, range(min(n, len(dataset))))


def bench_jobs(params: Params, rows: int | None, root: Path) -> list[Job]:
    """The extract stage's jobs (every encoder, every task) on the first `rows` images of each
    task, writing under `root` instead of features/."""
    out = []
    for job in planning.jobs(params.tasks, planning.encoders(params, None), params.extract):
        n = job.n_rows if rows is None else min(rows, job.n_rows)
        dataset = Ref(f"{job.dataset.key}:{n}", functools.partial(first_rows, job.dataset.build, n))
        targets = [dataclasses.replace(t, path=root / t.path.relative_to(workspace.FEATURES)) for t in job.targets]
        out.append(dataclasses.replace(job, dataset=dataset, n_rows=n, targets=targets))
    return out




def machine(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_bench(params: Params, device: torch.device, *, method: str = "ties_merging", steps: int = 100,
              stage_steps: int | None = None, rows: int | None = 256, adamerging_steps: int = 2,
              quick: bool = False, out: Path = workspace.RESULTS / "bench.json",
              progress: Callable = lambda it=None, **kw: it) -> dict:
    """Measure the five figures of the issue and write them (with their absolute times) to `out`."""
    params.merge_entry(method)
    if quick:
        steps, stage_steps, rows, adamerging_steps = QUICK["steps"], QUICK["stage_steps"], QUICK["rows"], \
            QUICK["adamerging_steps"]
    names = params.tasks
    cfg = {**params.surgery.model_dump(), "seed": params.surgery.seeds[0]}  # the paper's module, the first seed
    stage_steps = stage_steps or cfg["steps"]
    started = time.perf_counter()
    _bar = lambda desc: lambda it: progress(it, desc=desc, unit="step", leave=False)  # noqa: E731
    result = {"machine": machine(device), "method": method, "tasks": names, "quick": quick}

    print(f"bench 1-2: surgery live vs cached ({steps} steps), rank sweep {list(bench.RANKS)}")
    merged = read_features(workspace.merged_encoder(method), names)
    individual = read_features("individual", names)
    model_dir = str(workspace.PRETRAINED)
    merged_enc = planning.build_encoder(model_dir, str(workspace.merged_checkpoint(method)))
    individual_encs = [planning.build_encoder(model_dir, str(workspace.finetuned_checkpoint(t))) for t in names]
    datasets = [planning.build_dataset(str(workspace.DATA), t, workspace.SPLIT, model_dir) for t in names]
    result.update(bench.surgery_figures(merged_enc, individual_encs, datasets, merged, individual, cfg=cfg,
                                        steps=steps, device=device, progress=_bar))
    result["feature_dim"] = merged[0].shape[1]
    result["test_rows"] = {t: len(m) for t, m in zip(names, merged)}

    print(f"bench 5: surgery stage, tasks batched vs one after another ({stage_steps} steps)")
    result.update(bench.batching_figures(merged, individual, cfg=cfg, steps=stage_steps, device=device,
                                         progress=_bar))

    ext = params.extract
    print(f"bench 3: extraction ({rows or 'all'} rows per task, every encoder)")
    forget_built()
    result.update(bench.extraction_figures(
        lambda root: bench_jobs(params, rows, root), dim=merged[0].shape[1], batch_size=ext.batch_size,
        device=device, dtype=ext.dtype, autocast=planning.AUTOCAST[ext.autocast],
        progress=lambda it, **kw: progress(it, leave=False, **kw)))
    forget_built()

    ada = next((params.merge_entry(k).params for k in params.methods if params.merge_entry(k).method == "adamerging"),
               registry.get("adamerging").params())
    print(f"bench 4: layer-wise AdaMerging step, task by task vs all graphs alive ({adamerging_steps} steps)")
    inputs = load_inputs(registry.get("adamerging"), names, device=device, progress=progress)
    coeffs = adamerging.MergeCoefficients(inputs.pretrained, inputs.vectors, layer_wise=True, init=ada.init)
    per_task = ada.batch_size * ada.batches_per_task
    batches = [torch.stack([d[i] for i in range(min(per_task, len(d)))]) for d in datasets]
    result.update(bench.adamerging_figures(inputs.encoder, coeffs, inputs.heads, batches, steps=adamerging_steps,
                                           device=device))
    result["total_s"] = round(time.perf_counter() - started, 1)
    workspace.write_json(out, result)
    print(table(result))
    print(f"-> {out}")
    return result


FIGURES = [
    ("surgery_live_over_cached", "surgery: live encoders / cached features (same steps, batches)",
     lambda f: f"{f['live_s']:.2f} s / {f['cached_s']:.2f} s"),
    ("rank_sweep_over_one_live_run", "rank sweep 4..64 cached / one live surgery run",
     lambda f: f"{f['sweep_s']:.2f} s / {f['live_s']:.2f} s"),
    ("extract_overhead", "extraction / bare forward of the same encoders",
     lambda f: f"{f['extract_s']:.2f} s / {f['bare_forward_s']:.2f} s (decode {f['split_s']['decode']:.2f}, "
               f"forward {f['split_s']['forward']:.2f}, write {f['split_s']['write']:.2f}, "
               f"other {f['split_s']['other']:.2f})"),
    ("decode_once_speedup", "decode per encoder / decode once for all encoders",
     lambda f: f"{f['decode_per_encoder_s']:.2f} s / {f['decode_once_s']:.2f} s"),
    ("adamerging_memory_ratio", "AdaMerging peak memory: task by task / all graphs",
     lambda f: f"{f['task_by_task_bytes'] / 2**20:.1f} MiB / {f['all_graphs_bytes'] / 2**20:.1f} MiB"),
    ("adamerging_step_ratio", "AdaMerging step time: task by task / all graphs",
     lambda f: f"{f['task_by_task_step_s']:.3f} s / {f['all_graphs_step_s']:.3f} s"),
    ("adamerging_grouped_ratio", "AdaMerging step time as learned merges run it / all graphs",
     lambda f: f"{f['grouped_step_s']:.3f} s / {f['grouped_step_s'] / f['ratio']:.3f} s"),
    ("surgery_sequential_over_batched", "surgery stage: tasks one after another / batched",
     lambda f: f"{f['sequential_s']:.2f} s / {f['batched_s']:.2f} s"),
]


def table(result: dict) -> str:
    lines = ["| figure | ratio | measured |", "|---|---|---|"]
    lines += [f"| `{key}`: {label} | {result[key]['ratio']:.3g} | {detail(result[key])} |"
              for key, label, detail in FIGURES]
    return "\n".join(lines)
