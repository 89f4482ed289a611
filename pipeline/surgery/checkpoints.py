"""A merge entry's trained adapters on disk: models/surgery/KEY.safetensors holds every seed's
weights (`<seed>.<weight>`), with the adapter, its params, the seeds and the tasks recorded."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline import workspace
from pipeline.errors import PipelineError
from pipeline.models.checkpoints import load_state, read_metadata, save_state
from pipeline.surgery import adapters
from pipeline.surgery.adapters import Adapter


def inputs_digest(**identity) -> str:
    """A short hash of everything a trained adapter depends on (features, tasks, settings)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def save_surgery(key: str, modules: dict[int, Adapter], *, tasks: list[str], inputs: str) -> Path:
    """One entry's adapters, one module per seed (all of one adapter)."""
    first = next(iter(modules.values()))
    path = workspace.surgery_checkpoint(key)
    state = {f"{seed}.{name}": w for seed, module in modules.items() for name, w in module.weights().items()}
    save_state(path, state, method=key, tasks=json.dumps(tasks), inputs=inputs, adapter=first.name,
               adapter_params=first.settings.model_dump_json(), seeds=json.dumps(list(modules)))
    return path


def trained_inputs(key: str) -> str | None:
    """The inputs digest a merge entry's saved adapters were trained from (None if there are none)."""
    path = workspace.surgery_checkpoint(key)
    try:
        return read_metadata(path).get("inputs") if path.exists() else None
    except PipelineError:  # damaged: train again (the new checkpoint replaces it atomically)
        return None


def load_surgery(key: str, tasks: list[str]) -> dict[int, Adapter]:
    """A merge entry's trained adapters by seed, refused if they were trained for other tasks."""
    path, hint = workspace.surgery_checkpoint(key), f"run `repsurgery surgery {key}`"
    state = load_state(path, hint=hint[0].upper() + hint[1:] + ".")
    meta = read_metadata(path, required=("tasks",))
    trained_on = json.loads(meta["tasks"])
    if trained_on != tasks:
        raise PipelineError(f"{path} was trained for tasks {trained_on}, params list {tasks}: {hint}")
    if "seeds" not in meta:
        raise PipelineError(f"{path} is from an older version of repsurgery (no seeds recorded): {hint}")
    cls, params = adapters.get(meta["adapter"]), json.loads(meta["adapter_params"])
    return {seed: cls.from_weights({n: state[f"{seed}.{n}"] for n in cls.WEIGHTS}, len(tasks), seed, **params).eval()
            for seed in json.loads(meta["seeds"])}
