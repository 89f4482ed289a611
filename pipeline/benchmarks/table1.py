"""`repsurgery bench-table1`: a dry run of the paper's Table 1 with surgery, at real sizes.

How long would the paper preset's whole run (every merge entry, extraction, surgery,
evaluation) take for a real architecture on this machine? Nothing is downloaded: the CLIP is
a random open_clip tower of the architecture, each "fine-tuned" encoder the pretrained one
plus small random task vectors, the heads random with each real task's class count, and the
test splits generated photo-sized JPEGs at the real split sizes times `scale` (a pool of
distinct JPEGs whose bytes repeat: decoding costs the same). Every stage runs the pipeline's
own code on them (the merge registry, `extract`, the surgery trainer, the evaluate stage's
per-entry figures), timed, and is projected to the real sizes:

- merge: every entry in a process of its own, as its stage: inputs read by the pipeline's
  loader, the method run through the registry, its weights saved. Learned entries (`steps` /
  `mask_steps`) run a warm-up step and a few measured ones, projected as their time outside
  the step loops (loading included) + time per step x the preset's steps; iteration counts
  without a step loop (WUDI's) likewise, timed by two runs. The others run in full (in
  `--quick`, the data-using ones read fewer images and are projected by the images they read,
  and one run times WUDI's iterations: rough figures).
- extract: every task through pretrained, its individual and every merged encoder (and the
  router's train images); each job's decode, forward and write time projected by its images,
  its fixed cost (building encoders, opening stores) as is.
- surgery and evaluate: the trainer at the preset's settings, then every entry's figures as the
  evaluate stage computes them, from feature stores of the real split sizes (the extracted rows
  repeated: their cost is in the rows, not in the values), so both are measured, not projected.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from queue import Empty
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from cache import open_store, open_writer
from pipeline import config, routing, workspace
from pipeline.benchmarks.measure import footprint, sync, timed
from pipeline.benchmarks.photos import PHOTO_SIZE, pool, write_split
from pipeline.benchmarks.realsize import random_task_vectors
from pipeline.config import Params
from pipeline.data import datasets
from pipeline.data.catalog import PAPER_TASKS, classnames_and_templates
from pipeline.data.importing import import_splits
from pipeline.errors import PipelineError
from pipeline.features import jobs as planning
from pipeline.features.extraction import Job, Target, Timings, extract, forget_built
from pipeline.merging import registry
from pipeline.merging.inputs import MergeInputs, load_inputs
from pipeline.models import clip
from pipeline.models.checkpoints import load_heads, save_state
from pipeline.reporting import metrics
from pipeline.surgery.training import train_groups
from pipeline.workspace import SPLIT

QUICK = {"images": 2, "steps": 1}  # images per task and split, measured steps of a learned merge
MEASURED_STEPS = 2  # measured steps of a learned merge, after its warm-up step
POOL = 64  # distinct JPEGs; the splits repeat their bytes
# Optimisation counts a method runs without a step loop of its own (WUDI's Adam iterations per
# matrix): cut like the learned schedules, timed by two runs (one in `--quick`).
ITERATIONS = ("iterations",)
HEAD_SCALE = 100.0  # CLIP's logit scale


def per_task_images(values: dict) -> int | None:
    """Images a data-using entry reads of each task: `images` in all, or `batch_size` x
    `batches_per_task` per step (learned merges); None for a data-free one."""
    if "images" in values:
        return values["images"]
    if "batch_size" in values:
        return values["batch_size"] * values.get("batches_per_task", 1)
    return None


def split_sizes(params: Params, scale: float, quick: bool) -> dict[str, dict[str, int]]:
    """Rows to generate per split and task: the real test sizes x `scale`, never fewer than a
    data-using entry reads of a task (so every merge reads what it reads at full size; train
    splits: only what the entries and the router read); `--quick`: QUICK images each."""
    need = {"test": 2}
    for key in params.methods:
        entry = params.merge_entry(key)
        values = entry.params.model_dump()
        if "images" in registry.get(entry.method).needs and per_task_images(values):
            split = values.get("split", SPLIT)
            need[split] = max(need.get(split, 0), per_task_images(values))
    if params.router.split == "train":
        need["train"] = max(need.get("train", 0), params.router.images)
    if quick:
        return {split: {t: QUICK["images"] for t in params.tasks} for split in need}
    sizes = {"test": {t: max(need["test"], round(PAPER_TASKS[t].test_images * scale)) for t in params.tasks}}
    if "train" in need:
        sizes["train"] = {t: need["train"] for t in params.tasks}
    return sizes


def write_data(workdir: Path, sizes: dict[str, dict[str, int]], progress: Callable) -> dict:
    """Every task's splits under `workdir`'s data folder, imported by the project's import (with
    its class names and templates) from generated parquet shards; returns what was written."""
    total = sum(n for rows in sizes.values() for n in rows.values())
    jpegs = pool(min(POOL, total))
    for task in progress(list(sizes["test"]), desc="write splits", unit="task"):
        classnames, templates = classnames_and_templates(task)
        for split, rows in sizes.items():
            write_split(workdir / "generated" / task, split, rows[task], len(classnames), jpegs)
        import_splits(workdir / "generated" / task, list(sizes), workdir / workspace.DATA / task, task, classnames,
                      templates, origin="generated")
    return {"pool_jpegs": len(jpegs), "mean_jpeg_kib": round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1)}


def write_models(spec: dict, workdir: Path, tasks: list[str]) -> dict:
    """In `workdir`'s workspace layout, as the stages leave it: a random CLIP of the spec
    (models/pretrained: clip.json, clip.safetensors), one fine-tuned image tower per task
    (pretrained + random task vector), a head per task with its real class count. Returns the
    tower's size."""
    model_dir = workdir / workspace.PRETRAINED
    model_dir.mkdir(parents=True)
    model = clip.build_clip(spec)
    (model_dir / "clip.json").write_text(json.dumps(spec))
    save_state(workdir / workspace.pretrained_clip(), model.state_dict())
    encoder = model.visual.eval().requires_grad_(False)
    pretrained = encoder.state_dict()
    for task, vector in zip(tasks, random_task_vectors(encoder, len(tasks))):
        save_state(workdir / workspace.finetuned_checkpoint(task),
                   {k: v + vector[k] if k in vector else v for k, v in pretrained.items()})
    generator = torch.Generator().manual_seed(1)
    save_state(workdir / workspace.HEADS, {
        t: F.normalize(torch.randn(len(classnames_and_templates(t)[0]), encoder.output_dim, generator=generator),
                       dim=-1) * HEAD_SCALE for t in tasks})
    return {"parameters": sum(p.numel() for p in encoder.parameters()), "feature_dim": encoder.output_dim}


class StepClock:
    """The progress bars a merge method draws, timed: when each item of each loop began (and
    when the loop ended), so that a learned merge's steps are timed inside one run."""

    def __init__(self, progress: Callable, device: torch.device):
        self.progress, self.device, self.loops = progress, device, []

    def __call__(self, iterable, **kwargs):
        marks: list[float] = []
        self.loops.append((kwargs.get("unit"), marks))
        return self._timed(self.progress(iterable, leave=False, **kwargs), marks)

    def _timed(self, iterable, marks: list[float]):
        for item in iterable:
            sync(self.device)
            marks.append(time.perf_counter())
            yield item
        sync(self.device)
        marks.append(time.perf_counter())

    def steps(self, count: int) -> list[float]:
        """The durations of the step loop that ran `count` steps ([] if none did)."""
        return next((np.diff(marks).tolist() for unit, marks in self.loops
                     if unit == "step" and len(marks) == count + 1), [])


def images_factor(values: dict, split: str, rows: dict[str, dict[str, int]]) -> float:
    """Images an entry reads at full size over those it read here (1 outside `--quick`): the
    real test splits, or train splits assumed to hold at least what it reads."""
    per = per_task_images(values)
    if per is None or split not in rows:
        return 1.0
    here = rows[split]
    full = {t: PAPER_TASKS[t].test_images if split == SPLIT else per for t in here}
    return sum(min(per, n) for n in full.values()) / sum(min(per, n) for n in here.values())


def merge_entry(key: str, params: Params, inputs: MergeInputs, clock: StepClock, *, quick: bool, steps: int,
                rows: dict[str, dict[str, int]], load_s: float = 0.0) -> dict:
    """Run one merge entry through the registry and save its weights as the merge stage does;
    time it and project it (`load_s`: what reading its inputs took, a fixed cost). Learned
    schedules run a warm-up and `steps` measured steps (timed by the step loop's progress
    bar); iteration counts without a loop of their own run once and, outside `--quick`, again
    with `steps` more, the difference timing one."""
    entry = params.merge_entry(key)
    method = registry.get(entry.method)
    preset = entry.params.model_dump()
    values = dict(preset)
    schedules = [name for name in registry.SCHEDULES if name in values]
    values.update({name: 1 + steps + i for i, name in enumerate(schedules)})  # distinct: each loop names its own
    counts = [name for name in ITERATIONS if not schedules and values.get(name, 0) > 1 + steps]
    values.update({name: 1 for name in counts})
    split = values.get("split", SPLIT)
    if "images" in method.needs and "split" in values:
        inputs.check_split(split)

    def run_with(changes: dict) -> tuple:  # (the method's result, its seconds)
        return timed(lambda: method.run(inputs, method.params.model_validate({**values, **changes})),
                     inputs.device)

    with footprint(inputs.device) as cost:
        merged, run_s = run_with({})
        save_state(workspace.merged_checkpoint(key), merged.state, method=entry.method, key=key)
    del merged
    factor = images_factor(preset, split, rows) if "images" in method.needs else 1.0
    row = {"key": key, "method": entry.method, "label": entry.label, "load_s": round(load_s, 4), **cost,
           "measured_s": round(load_s + cost["wall_s"], 4), "images_factor": round(factor, 3),
           "ran": {name: values[name] for name in schedules + counts},
           "schedule": {name: preset[name] for name in schedules + counts}}
    if schedules:
        loops = {name: clock.steps(values[name]) for name in schedules}
        per_step = {name: (sum(d[1:]) / len(d[1:]) if len(d) > 1 else run_s / values[name])
                    for name, d in loops.items()}
        fixed = load_s + max(0.0, cost["wall_s"] - sum(sum(d) for d in loops.values()))
        projected = fixed + sum(per_step[name] * preset[name] for name in schedules) * factor
        row.update(kind="learned", fixed_s=round(fixed, 4))
    elif counts:  # one run's time per iteration in --quick (an upper bound), else the difference
        more = {name: 1 + steps for name in counts}
        per_step = {name: run_s if quick else max(0.0, run_with(more)[1] - run_s) / steps for name in counts}
        projected = load_s + cost["wall_s"] + sum(per_step[name] * (preset[name] - 1) for name in counts)
        row.update(kind="iterations")
    else:
        per_step, projected = {}, load_s + cost["wall_s"] * factor
        row.update(kind="in full" if factor == 1 else "images scaled")
    row.update(s_per_step={name: round(s, 6) for name, s in per_step.items()}, projected_s=round(projected, 4))
    return row


def _merge_in_child(queue, raw: dict, key: str, workdir: str, device: str, options: dict, threads: int,
                    progress: Callable) -> None:
    """In a process of its own, as stage `merge@KEY` runs: its inputs read from the workspace in
    `workdir` by the pipeline's loader, then the entry run, timed and saved."""
    try:
        torch.set_num_threads(threads)  # the parent's setting
        os.chdir(workdir)
        params, device = config.validate(raw), torch.device(device)
        clock = StepClock(progress, device)
        inputs, load_s = timed(lambda: load_inputs(registry.get(params.merge_entry(key).method), params.tasks,
                                                   device=device, progress=clock), torch.device("cpu"))
        queue.put(merge_entry(key, params, inputs, clock, load_s=load_s, **options))
    except BaseException as exc:  # reported by the parent, with the entry
        queue.put({"error": str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"})


def run_merges(raw: dict, workdir: Path, *, device: torch.device, quick: bool, steps: int,
               rows: dict[str, dict[str, int]], progress: Callable) -> list[dict]:
    """Every merge entry of the params, in order, each in a fresh process like its stage: its
    memory is its own, and nothing one entry leaves weighs on the next. Forked from a server
    that imported the libraries once (and never ran torch's threads or CUDA)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "open_clip"])
    options = {"quick": quick, "steps": steps, "rows": rows}
    result = []
    for key in progress(list(raw["merge"]), desc="merge", unit="entry"):
        queue = context.Queue()
        child = context.Process(target=_merge_in_child, args=(queue, raw, key, str(workdir), str(device), options,
                                                              torch.get_num_threads(), progress))
        child.start()
        row = None
        while row is None:
            try:
                row = queue.get(timeout=1)
            except Empty:
                if not child.is_alive():  # killed (out of memory?) before it could report
                    row = {"error": f"its process ended with exit code {child.exitcode} and no result"
                                    + (" (killed: out of memory?)" if child.exitcode == -signal.SIGKILL else "")}
        child.join()
        if "error" in row:
            raise PipelineError(f"bench-table1: merge entry {key!r} failed: {row['error']}")
        result.append(row)
    return result


def extraction_jobs(params: Params, workdir: Path) -> list[tuple[Job, int]]:
    """The extract stage's own jobs (`pipeline.features.jobs`: per task its test images through
    pretrained, its individual and every merged encoder; the router's train images through every
    merged one) on the workspace in `workdir`, each with the rows it has at full size."""
    with contextlib.chdir(workdir):  # the stage's paths are the workspace's, relative
        encoders = planning.encoders(params, None)
        jobs = [*planning.jobs(params.tasks, encoders, params.extract), *planning.router_jobs(params, encoders)]
    full = {t: PAPER_TASKS[t].test_images for t in params.tasks}
    return [(dataclasses.replace(job, targets=[dataclasses.replace(t, path=workdir / t.path) for t in job.targets]),
             full.get(job.name, params.router.images * len(params.tasks))) for job in jobs]


def encoder_name(target: Target, workdir: Path) -> str:
    """`pretrained`, `individual` or `merged/KEY`: the folder of the target's store."""
    return str(target.path.parent.relative_to(workdir / workspace.FEATURES))


def run_extraction(jobs: list[tuple[Job, int]], *, dim: int, params: Params, device: torch.device,
                   autocast: torch.dtype | None, progress: Callable) -> list[dict]:
    """`extract()` job by job, with the decode workers each split gets at full size; per job:
    decode wait, forward and write projected by images, the rest (building encoders, opening
    stores, starting workers) as is."""
    out = []
    for job, full_rows in jobs:
        timings = Timings()
        started = time.perf_counter()
        extract([job], dim=dim, batch_size=params.extract.batch_size, device=device, dtype=params.extract.dtype,
                autocast=autocast, timings=timings, workers=datasets.loader_workers(full_rows),
                progress=lambda it, **kw: progress(it, leave=False, **kw))
        wall = time.perf_counter() - started
        other = max(0.0, wall - timings.total())
        factor = full_rows / job.n_rows
        out.append({"job": job.name, "encoders": len(job.targets), "images": job.n_rows, "full_images": full_rows,
                    "workers": datasets.loader_workers(full_rows), "wall_s": round(wall, 3),
                    "split_s": {"decode_wait": round(timings.decode, 3), "forward": round(timings.forward, 3),
                                "write": round(timings.write, 3), "other": round(other, 3)},
                    "projected_s": round(timings.total() * factor + other, 3)})
    return out


def read(path: Path) -> torch.Tensor:
    return torch.from_numpy(open_store(path).to_numpy())


def run_surgery(params: Params, names: list[str], features: Callable[[str], list[torch.Tensor]], *,
                device: torch.device, progress: Callable) -> tuple[dict, dict[str, dict]]:
    """The surgery stage's training (every entry side by side, once per seed) from stores of the
    real sizes: measured, projected as is (its steps cost the same whatever the split sizes;
    reading the stores and gathering their rows grow with them). Returns the adapters by entry."""
    cfg = params.surgery
    with footprint(device) as cost:
        merged, individual = [features(name) for name in names], features("individual")
        by_seed = {seed: train_groups(merged, individual, **params.training(cfg), seed=seed, device=device,
                                      progress=lambda it: progress(it, desc=f"{cfg.adapter}, seed {seed}", leave=False))
                   for seed in cfg.seeds}
    modules = {name: {seed: trained[i][0] for seed, trained in by_seed.items()} for i, name in enumerate(names)}
    return {"entries": len(names), "tasks": len(params.tasks), "steps": cfg.steps, "seeds": len(cfg.seeds), **cost,
            "projected_s": cost["wall_s"]}, modules


def real_size_stores(stores: dict[tuple[str, str], Path], folder: Path, progress: Callable
                     ) -> dict[tuple[str, str], Path]:
    """(encoder, task) -> a feature store of the task's real test-split size: the extracted rows
    repeated (the extracted store itself where it has that size; the router's as they are), so
    that surgery and evaluate read and compute what they would at full size."""
    out = {}
    for (name, task), path in progress(list(stores.items()), desc="stores at real size", unit="store", leave=False):
        store = open_store(path)
        rows = PAPER_TASKS[task].test_images if task in PAPER_TASKS else store.n_rows
        if rows == store.n_rows:
            out[name, task] = path
            continue
        out[name, task] = folder / name / f"{task}-{SPLIT}.zarr"
        writer = open_writer(out[name, task], n_rows=rows, dim=store.dim, dtype=store.dtype,
                             chunk_rows=store.chunk_rows, attrs={"task": task, "split": SPLIT, "encoder": name})
        writer.write(0, store.to_numpy()[np.arange(rows) % store.n_rows])
        writer.finalize()
    return out


def run_evaluate(params: Params, modules: dict[str, dict], features: Callable[[str], list[torch.Tensor]],
                 router_fit: Callable[[str], list[torch.Tensor] | None], heads: dict, labels: dict, *,
                 entry_figures: Callable, progress: Callable) -> dict:
    """The evaluate stage's figures (the baselines' accuracy, every entry's `entry_figures`,
    routed) from stores of the real sizes: measured, nothing to project."""
    tasks = params.tasks
    labels = {t: y[np.arange(PAPER_TASKS[t].test_images) % len(y)] for t, y in labels.items()}  # as the rows
    with footprint(torch.device("cpu")) as cost:
        individual = features("individual")
        for name in ("pretrained", "individual"):
            for z, t in zip(individual if name == "individual" else features(name), tasks):
                metrics.accuracy(z, heads[t], labels[t])
        for name in progress(list(modules), desc="evaluate", unit="entry", leave=False):
            merged = features(name)
            entry_figures(merged, individual, modules[name], tasks, heads, labels,
                          routing.route(merged, params.router, router_fit(name)))
    return {"entries": len(modules), "baselines": 2, "rows": sum(len(y) for y in labels.values()), **cost,
            "projected_s": cost["wall_s"]}


def check_scale(scale: float) -> None:
    if not scale > 0:
        raise PipelineError(f"scale must be above 0 (a share of the real test-split sizes, e.g. 0.01), got {scale}")


def quiet(iterable=None, **kwargs):
    """No progress bars (picklable: the merge processes get it)."""
    return iterable


def run(raw: dict, spec: dict, device: torch.device, *, scale: float = 0.01, quick: bool = False,
        autocast: torch.dtype | None = None, entry_figures: Callable, progress: Callable = quiet) -> dict:
    """Every stage of the run the params mapping `raw` describes (a paper preset's), on the
    generated stand-in, timed and projected to the real split sizes. `entry_figures`: the
    evaluate stage's per-entry figures (stages.evaluate.entry_figures), passed in by the stage
    that calls this; `progress`: picklable (the merge processes draw bars too)."""
    check_scale(scale)
    params = config.validate(raw)
    unknown = [t for t in params.tasks if t not in PAPER_TASKS]
    if unknown:
        raise PipelineError(f"{', '.join(unknown)}: not a task of the paper (known: {', '.join(PAPER_TASKS)})")
    steps = QUICK["steps"] if quick else MEASURED_STEPS
    started, load_before = time.perf_counter(), os.getloadavg()
    sizes = split_sizes(params, scale, quick)
    tasks = params.tasks
    settings = {"scale": scale, "quick": quick, "tasks": tasks, "measured_steps": steps, "image_size": list(PHOTO_SIZE),
                "test_images": sizes["test"], "train_images": sizes.get("train"), "autocast": str(autocast),
                "extract": params.extract.model_dump(), "surgery": params.surgery.model_dump(),
                "router": params.router.model_dump()}
    result: dict = {"settings": settings}
    workdir = Path(tempfile.mkdtemp(prefix="repsurgery-table1-"))  # a workspace, as the stages leave it
    forget_built()
    try:
        print(f"generating {sum(sizes['test'].values())} test images"
              + (f" and {sum(sizes['train'].values())} train images" if "train" in sizes else "")
              + f" ({PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEGs) for {len(tasks)} tasks")
        settings.update(write_data(workdir, sizes, progress))
        print(f"random {spec.get('arch') or 'CLIP'}: pretrained, {len(tasks)} fine-tuned encoders, heads")
        settings.update(write_models(spec, workdir, tasks))

        print(f"merge: {len(params.methods)} entries, each in its own process")
        merges = run_merges(raw, workdir, device=device, quick=quick, steps=steps, rows=sizes, progress=progress)

        jobs = extraction_jobs(params, workdir)
        print(f"extract: {len(jobs)} jobs, {sum(len(j.targets) for j, _ in jobs)} feature stores")
        extraction = run_extraction(jobs, dim=settings["feature_dim"], params=params, device=device, autocast=autocast,
                                    progress=progress)
        forget_built()

        stores = real_size_stores({(encoder_name(target, workdir), job.name): target.path
                                   for job, _ in jobs for target in job.targets}, workdir / "real-size", progress)

        def features(name: str) -> list[torch.Tensor]:  # an encoder's test features, every task
            return [read(stores[name, t]) for t in tasks]

        def router_fit(name: str) -> list[torch.Tensor] | None:  # the router's own store, as stores.router_fit
            if params.router.split != "train":
                return None
            store = open_store(stores[name, planning.ROUTER_JOB])
            return list(torch.from_numpy(store.to_numpy()).split(store.attrs["rows_per_task"]))

        merged = [workspace.merged_encoder(key) for key in params.methods]
        cfg = params.surgery
        print(f"surgery: {len(merged)} entries x {len(tasks)} tasks, {cfg.steps} steps, rank {cfg.rank}")
        surgery, modules = run_surgery(params, merged, features, device=device, progress=progress)
        print(f"evaluate: {len(merged)} entries and the 2 baselines")
        evaluate = run_evaluate(params, modules, features, router_fit, load_heads(workdir / workspace.HEADS, tasks),
                                {t: datasets.labels(workdir / workspace.DATA, t, SPLIT) for t in tasks},
                                entry_figures=entry_figures, progress=progress)
    finally:
        forget_built()
        shutil.rmtree(workdir, ignore_errors=True)
    stages = {"merge": sum(m["projected_s"] for m in merges), "extract": sum(e["projected_s"] for e in extraction),
              "surgery": surgery["projected_s"], "evaluate": evaluate["projected_s"]}
    result.update(merges=merges, extraction=extraction, surgery=surgery, evaluate=evaluate,
                  measured_s={"merge": round(sum(m["measured_s"] for m in merges), 3),
                              "extract": round(sum(e["wall_s"] for e in extraction), 3),
                              "surgery": surgery["wall_s"], "evaluate": evaluate["wall_s"]},
                  projected_s={k: round(v, 3) for k, v in stages.items()},
                  projected_total_s=round(sum(stages.values()), 3))
    result["load_average"] = {"before": [round(x, 2) for x in load_before],
                              "after": [round(x, 2) for x in os.getloadavg()]}
    result["total_s"] = round(time.perf_counter() - started, 1)
    return result


def duration(seconds: float) -> str:
    """A wall time as people read it: 42 s, 7 min 5 s, 2 h 03 min."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _what(m: dict) -> str:
    """What ran of a merge entry: its cut schedules (and time per step), or in full."""
    parts = [f"{m['ran'][n]} of {m['schedule'][n]} {n.replace('_', ' ')} ({m['s_per_step'][n]:.3g} s each)"
             for n in m["ran"]]
    parts += [f"images x{m['images_factor']:g}"] if m["images_factor"] != 1 else []
    return ", ".join(parts) or "in full"


def table(result: dict) -> str:
    """Every stage (and merge entry): what ran, measured and projected seconds; the total."""
    s = result["settings"]
    lines = ["| stage | what ran | measured s | projected s (scale 1) |", "|---|---|---|---|"]
    for m in result["merges"]:
        lines.append(f"| merge {m['key']} ({m['label']}) | {_what(m)} | {m['measured_s']:.1f} "
                     f"| {m['projected_s']:.1f} |")
    tests = [e for e in result["extraction"] if e["job"] != planning.ROUTER_JOB]
    router = [e for e in result["extraction"] if e["job"] == planning.ROUTER_JOB]
    extraction = (f"{len(tests)} tasks x {tests[0]['encoders']} encoders, {sum(e['images'] for e in tests):,} of "
                  f"{sum(e['full_images'] for e in tests):,} test images")
    if router:
        extraction += (f"; router: {router[0]['encoders']} encoders x {router[0]['images']:,} of "
                       f"{router[0]['full_images']:,} train images")
    su, ev = result["surgery"], result["evaluate"]
    rows = [("merge", f"all {len(result['merges'])} entries"), ("extract", extraction),
            ("surgery", f"{su['entries']} entries x {su['tasks']} tasks, {su['steps']} steps, rank {s['surgery']['rank']}, "
                        f"{su['seeds']} seed(s) (measured at real size, as is)"),
            ("evaluate", f"{ev['entries']} entries + {ev['baselines']} baselines, {ev['rows']:,} test rows per "
                         "encoder (measured at real size)")]
    for stage, what in rows:
        lines.append(f"| **{stage}** | {what} | {result['measured_s'][stage]:.1f} | {result['projected_s'][stage]:.1f} |")
    total = result["projected_total_s"]
    lines.append(f"| **total** | | {sum(result['measured_s'].values()):.1f} | {total:.1f} |")
    note = " (--quick: a smoke test, its projections are rough)" if s["quick"] else ""
    return "\n".join(lines) + f"\n\nprojected total wall time at scale 1: {duration(total)}{note}"
