"""Opening cached features safely: a store is used only if it is complete and was made by
the encoder the params name now (no model code is imported here: surgery and evaluation
start fast and never run an encoder)."""
from __future__ import annotations

import functools

from safetensors.torch import load_file

from cache import FeatureStore, open_store
from pipeline.checkpoints import fingerprint, read_metadata
from stages.common import PRETRAINED, SPLIT, finetuned_path, merged_path, store_path


def fix_hint(encoder: str) -> str:
    return f"run `repsurgery extract {encoder}` (or `dvc repro extract` for every encoder)"


@functools.lru_cache(maxsize=1)
def pretrained_fingerprint() -> str:
    """Hashed once per process: every task's pretrained store is checked against it."""
    return fingerprint(pretrained_visual_state())


def pretrained_visual_state() -> dict:
    """The pretrained image tower's tensors, read straight from the CLIP checkpoint."""
    state = load_file(str(PRETRAINED / "clip.safetensors"))
    return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}


def checkpoint_fingerprint(encoder: str, task: str) -> str:
    """Fingerprint of the weights that `encoder` names now: what a store must have been made from."""
    if encoder == "pretrained":
        return pretrained_fingerprint()
    path = finetuned_path(task) if encoder == "individual" else merged_path(encoder)
    return read_metadata(path)["fingerprint"]


def open_features(encoder: str, task: str) -> FeatureStore:
    expect = {"encoder_fingerprint": checkpoint_fingerprint(encoder, task), "task": task, "split": SPLIT}
    return open_store(store_path(encoder, task), expect=expect, fix_hint=fix_hint(encoder))
