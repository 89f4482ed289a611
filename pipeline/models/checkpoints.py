"""Image-encoder state dicts on disk: safetensors with a content fingerprint.

The fingerprint (a hash of every tensor's name, dtype, shape and bytes) ties feature
stores to the exact weights that produced them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from cache.files import atomic_path
from pipeline import workspace
from pipeline.errors import PipelineError

StateDict = dict[str, torch.Tensor]


def fingerprint(state: StateDict) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def save_state(path: Path, state: StateDict, **metadata: str) -> str:
    """Write atomically (temp name, then rename) and return the fingerprint."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    fp = fingerprint(state)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"fingerprint": fp, **{k: str(v) for k, v in metadata.items()}})
        _sort_header(tmp)
    return fp


def _sort_header(path: Path) -> None:
    """safetensors writes its JSON header (metadata included) in hash order, which differs between
    processes; sorting it in place makes identical checkpoints identical files (stable dvc.lock)."""
    with open(path, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        handle.seek(8)
        handle.write(text.ljust(size, b" "))


def read_metadata(path: Path, *, required: tuple[str, ...] = ()) -> dict[str, str]:
    """A checkpoint's metadata; one clear error for a damaged file or one this project did not write."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise PipelineError(f"checkpoint {path} cannot be read ({exc}). {workspace.rebuild_hint(path)}") from exc
    missing = [key for key in required if key not in metadata]
    if missing:
        raise PipelineError(f"checkpoint {path} lacks this project's metadata ({', '.join(missing)}): it was not "
                            f"written by the pipeline's stages. {workspace.rebuild_hint(path)}")
    return metadata


def load_state(path: Path, *, like: StateDict | None = None, hint: str = "") -> StateDict:
    """Load a checkpoint; with `like`, insist on exactly the same tensor names and shapes."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"checkpoint {path} does not exist. {hint}".strip())
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise PipelineError(f"checkpoint {path} cannot be read ({exc}). {hint}".strip()) from exc
    if like is not None:
        check_compatible(state, like, where=str(path))
    return state


def check_compatible(state: StateDict, reference: StateDict, *, where: str) -> None:
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        raise PipelineError(
            f"checkpoint {where} does not fit the architecture: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}. "
            "Was it made for another model? Convert or re-create it for this architecture."
        )
    for name, tensor in reference.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise PipelineError(
                f"checkpoint {where}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                f"the architecture needs {tuple(tensor.shape)}. Was it made for another model?"
            )


def load_heads(path: Path, tasks: list[str]) -> StateDict:
    """The zero-shot heads of `tasks` (one (classes, dim) tensor per task)."""
    heads = load_state(path, hint="Run `repsurgery heads` (or `dvc repro heads`).")
    missing = [t for t in tasks if t not in heads]
    if missing:
        raise PipelineError(f"{path} has no head for task(s) {missing}: run `repsurgery heads` for the current tasks")
    return heads
