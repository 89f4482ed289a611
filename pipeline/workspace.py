"""Where everything lives on disk: the one module that knows the workspace layout.

Paths are relative to the project root (the working directory of every stage, as DVC runs
them). Encoders are named as their feature folders: `pretrained`, `individual` (each task's
fine-tuned encoder on its own task), `mtl` (Traditional MTL, miniature world) and
`merged/<key>` for each entry of params `merge`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cache.files import write_text

SPLIT = "test"  # merging, surgery and evaluation all use the unlabeled test split

DATA = Path("data")
MODELS = Path("models")
PRETRAINED = MODELS / "pretrained"
FINETUNED = MODELS / "finetuned"
MERGED = MODELS / "merged"
SURGERY = MODELS / "surgery"
HEADS = MODELS / "heads.safetensors"
FINETUNED_HEADS = FINETUNED / "_heads.safetensors"  # a text encoder's heads, fine-tuned with it (stage heads reads them)
MTL = MODELS / "mtl"
MTL_ENCODER = MTL / "encoder.safetensors"
FEATURES = Path("features")
LABELS = FEATURES / "labels"
TSNE_CACHE = FEATURES / "tsne"  # t-SNE embeddings by input digest (analysis-tsne)
RESULTS = Path("results")
SOURCES = RESULTS / "sources.json"  # where the models and data came from (stage check)
FINGERPRINTS = RESULTS / "fingerprints"  # the code each merge entry and each stage runs (stage check)
MERGE_COSTS = RESULTS / "merge-costs"  # each merge entry's wall time and peak memory (stage merge@KEY)
METRICS = RESULTS / "metrics.json"  # every figure, per task
SUMMARY = RESULTS / "summary.json"  # the averages: what `dvc metrics` and `dvc exp show` show
ACCURACY_TABLE = RESULTS / "accuracy.md"
ANALYSES = RESULTS / "analyses"
BENCH_REALSIZE = RESULTS / "bench-realsize.json"  # `repsurgery bench-real-size`
BENCH_TABLE1 = RESULTS / "bench-table1.json"  # `repsurgery bench-table1`
BENCH_DECODE = RESULTS / "bench-decode.json"  # `repsurgery bench-decode`
REFERENCE_ENCODERS = ("pretrained", "individual")


def merged_encoder(key: str) -> str:
    return f"merged/{key}"


def pretrained_clip() -> Path:
    return PRETRAINED / "clip.safetensors"


def finetuned_checkpoint(task: str) -> Path:
    return FINETUNED / f"{task}.safetensors"


def merged_checkpoint(key: str) -> Path:
    return MERGED / f"{key}.safetensors"


def merge_fingerprint(key: str) -> Path:
    """The digest of the code merge entry `key` runs: stage `merge@KEY` depends on it."""
    return FINGERPRINTS / f"{key}.json"


def command_fingerprint(command: str) -> Path:
    """The digest of the code `repsurgery COMMAND` runs: the stages that run it depend on it."""
    return FINGERPRINTS / "commands" / f"{command}.json"


def merge_cost(key: str) -> Path:
    """What merge entry `key`'s method took (wall time, peak memory, device): a measurement, kept
    apart from its checkpoint and info so that a re-timed merge re-runs nothing after it."""
    return MERGE_COSTS / f"{key}.json"


def merged_info(key: str) -> Path:
    """What the merge computed or learned (coefficients, masks, norms), beside its checkpoint."""
    return MERGED / f"{key}.json"


def rebuild_hint(path: Path | str) -> str:
    """How to write `path` again, for error messages about a damaged or foreign file."""
    path = Path(path)
    commands = {PRETRAINED: "repsurgery prepare-pretrained", FINETUNED: "repsurgery prepare-finetuned",
                MERGED: f"repsurgery merge {path.stem}", SURGERY: "repsurgery surgery", MTL: "repsurgery mtl",
                HEADS.parent: "repsurgery heads"}
    command = next((c for folder, c in commands.items() if path.parent.resolve() == folder.resolve()), None)
    if command is None:
        return "Write it again with the stage that made it, or convert it with `repsurgery convert`."
    return f"Delete it and run `{command}` to write it again."


def surgery_checkpoint(key: str) -> Path:
    return SURGERY / f"{key}.safetensors"


def surgery_info(key: str) -> Path:
    return SURGERY / f"{key}.json"


def checkpoint(encoder: str, task: str) -> Path | None:
    """The weights an encoder name means for a task (None: the pretrained CLIP's own tower)."""
    if encoder == "pretrained":
        return None
    if encoder == "individual":
        return finetuned_checkpoint(task)
    if encoder == "mtl":
        return MTL_ENCODER
    return merged_checkpoint(encoder.removeprefix("merged/"))


def store(encoder: str, task: str) -> Path:
    return FEATURES / encoder / f"{task}-{SPLIT}.zarr"


def router_store(encoder: str) -> Path:
    """A merge entry's features of the train images the task router is fitted on, every task's
    in one store (params `router.split: train`)."""
    return FEATURES / encoder / "router-train.zarr"


def labels(task: str) -> Path:
    """A task's test labels, saved beside the features so surgery and evaluation need no images."""
    return LABELS / f"{task}-{SPLIT}.json"


def analysis(name: str) -> Path:
    return ANALYSES / name


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2) + "\n")
