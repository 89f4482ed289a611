"""`repsurgery bench-merges`: wall time and peak memory of merge entries against the number of
tasks merged -> results/bench-merges.json.

Each (entry, task count) runs in a fresh process (spawned), so its peak memory is its own:
on CPU the growth of the process's peak resident set while the method runs (over the peak
after its inputs were loaded: the encoders, heads and the datasets it reads), on CUDA
torch.cuda.max_memory_allocated over the same span. Learned schedules (`steps`,
`mask_steps`) are cut to `steps`, since a step's memory does not depend on how many follow;
the time per step is reported beside the wall time. Merged weights are computed, not saved.
"""
from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Callable

import torch

from pipeline import config, workspace
from pipeline.benchmarks.measure import footprint
from pipeline.merging import registry
from pipeline.merging.inputs import load_inputs


def _measure(key: str, params_file: Path, n: int, device: str, steps: int, threads: int) -> dict:
    """In the child process: load one entry's inputs for the first `n` tasks, run it, report time
    and memory."""
    torch.set_num_threads(threads)  # the parent's setting
    params = config.load(params_file)
    tasks = params.tasks[:n]
    device = torch.device(device)
    entry = params.merge_entry(key)
    method = registry.get(entry.method)
    values = entry.params.model_dump()
    values.update({name: min(values[name], steps) for name in registry.SCHEDULES if name in values})
    inputs = load_inputs(method, tasks, device=device, progress=lambda it, **kw: it)
    if "images" in method.needs:  # the datasets it reads, opened before the baseline reading
        for t in range(len(tasks)):
            inputs.dataset(t, values.get("split", "test"))
    with footprint(device) as cost:
        method.run(inputs, method.params.model_validate(values))
    scheduled = {name: values[name] for name in registry.SCHEDULES if name in values}
    return {"key": key, "method": entry.method, "tasks": len(tasks), **cost, "schedule": scheduled,
            "s_per_step": round(cost["wall_s"] / sum(scheduled.values()), 4) if scheduled else None}


def _child(queue, *args) -> None:
    try:
        queue.put(_measure(*args))
    except BaseException as exc:  # reported by the parent, with the entry and task count
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def scaling(params_file: Path, device: torch.device, keys: list[str], counts: list[int], *, steps: int,
            progress: Callable = lambda it=None, **kw: it) -> list[dict]:
    """Every entry of `keys` on the first n tasks of the params in `params_file`, for each n of
    `counts` (the file is read again by each child: the params' method models do not pickle)."""
    params = config.load(params_file)
    for key in keys:
        params.merge_entry(key)
    context = multiprocessing.get_context("spawn")
    rows = []
    for key, n in progress([(k, n) for k in keys for n in counts], desc="merges x task counts", unit="run"):
        queue = context.Queue()
        child = context.Process(target=_child, args=(queue, key, params_file, n, str(device), steps,
                                                             torch.get_num_threads()))
        child.start()
        row = queue.get()
        child.join()
        if "error" in row:
            raise RuntimeError(f"bench-merges: {key} on {n} tasks failed: {row['error']}")
        rows.append(row)
        print(f"{key}, {n} tasks: {row['wall_s']} s, peak +{row['peak_mib']} MiB")
    return rows


def write(rows: list[dict], machine: dict, out=workspace.RESULTS / "bench-merges.json") -> None:
    workspace.write_json(out, {"machine": machine, "runs": rows})
    print(f"merge scaling -> {out}")
