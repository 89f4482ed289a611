"""Stage `merge@KEY`: one entry of params `merge` -> models/merged/KEY.safetensors (+ .json)."""
from __future__ import annotations

import torch

from pipeline import workspace
from pipeline.benchmarks.measure import footprint
from pipeline.config import Params
from pipeline.data.checks import preflight
from pipeline.errors import PipelineError
from pipeline.merging import registry
from pipeline.merging.inputs import load_inputs
from pipeline.models.checkpoints import save_state
from stages.common import progress


def merge(key: str, params: Params, device: torch.device) -> None:
    entry = params.merge_entry(key)
    method = registry.get(entry.method)
    if "images" in method.needs:  # a learned merge: a long GPU job, so check what it reads first
        preflight(params, device)
    inputs = load_inputs(method, params.tasks, device=device, progress=progress)
    if "images" in method.needs and "split" in entry.params.model_fields:
        inputs.check_split(entry.params.split)  # before any learning: every task has the split
    if "images" in method.needs and "batch_size" in entry.params.model_fields:
        params.check_rows(dict(zip(params.tasks, map(len, inputs.datasets))), f"merge.{key}.batch_size",
                          entry.params.batch_size)
    try:
        with footprint(inputs.device) as cost:  # the method's own work: its inputs are loaded
            result = method.run(inputs, entry.params)  # checked before anything is written
    except PipelineError as exc:
        raise PipelineError(f"merge entry {key!r}: {exc}") from exc
    fp = save_state(workspace.merged_checkpoint(key), result.state, method=entry.method, key=key)
    workspace.write_json(workspace.merged_info(key), {
        "key": key, "method": entry.method, "label": entry.label, "params": entry.params.model_dump(),
        "tasks": params.tasks, "fingerprint": fp, **result.info})
    workspace.write_json(workspace.merge_cost(key), {**cost, "device": str(inputs.device)})
    print(f"{key} ({entry.label}), {len(params.tasks)} tasks, {cost['wall_s']:.1f} s -> "
          f"{workspace.merged_checkpoint(key)}\n  fingerprint {fp}; details in {workspace.merged_info(key)}, "
          f"cost in {workspace.merge_cost(key)}")
