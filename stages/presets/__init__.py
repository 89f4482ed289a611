"""Params presets: the miniature world (the default params.yaml) and the paper's setting.

The paper presets are derived from the world preset, so every section a stage reads is
present; only tasks, `source` and the merge entries differ: every learned schedule is the
method's registered default (the recipe's, where the world runs 100 steps), and entries that
read a file of the miniature world (the Traditional MTL checkpoint) are left out.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from cache.files import write_text
from pipeline import workspace
from pipeline.data.catalog import PAPER_TASKS
from pipeline.errors import PipelineError
from pipeline.merging import registry

SCHEDULES = ("steps", "mask_steps")  # the params the world shortens

# preset -> (open_clip architecture, name in tanganke/clip-vit-*_<task> model ids)
PAPER_MODELS = {
    "paper-vit-b-32": ("ViT-B-32-quickgelu", "clip-vit-base-patch32"),
    "paper-vit-b-16": ("ViT-B-16-quickgelu", "clip-vit-base-patch16"),
    "paper-vit-l-14": ("ViT-L-14-quickgelu", "clip-vit-large-patch14"),
}
PRESETS = ("world", *PAPER_MODELS)

PAPER_HEADER = """\
# The paper's setting ({name}): OpenAI CLIP {arch}, the eight fine-tuned task encoders and the
# eight test splits from the Hugging Face Hub. Written by `repsurgery preset {name}`.
# 1. `repsurgery fetch` downloads everything named in `source` into `source.cache` (online, once).
# 2. `dvc repro` then runs offline. Entries of `source.finetuned` / `source.datasets` may also be
#    local paths (checkpoint files or model folders; parquet shards or one folder per class).
# Data-using merges (Fisher, RegMean, Concrete, AdaMerging++) read the test splits (`split: auto`
# finds no train split here): the transductive setting of the AdaMerging and Concrete papers.
# Surgery on a merged encoder made elsewhere: add `mine: {{method: checkpoint, path: FILE}}` to `merge`.
# The sections world, model, pretrain and finetune are unused with a real source (dvc.yaml names them).
"""


def world_text() -> str:
    return resources.files("stages.presets").joinpath("world.yaml").read_text()


def paper_params(name: str) -> dict:
    arch, model_name = PAPER_MODELS[name]
    params = yaml.safe_load(world_text())
    params["tasks"] = list(PAPER_TASKS)
    params["source"] = {
        "cache": "~/.cache/repsurgery",
        "pretrained": {"arch": arch, "weights": "openai"},
        "finetuned": {t: f"hf://tanganke/{model_name}_{hub_task}" for t, (_, hub_task, _) in PAPER_TASKS.items()},
        "datasets": {t: f"hf://{repo}" for t, (repo, _, _) in PAPER_TASKS.items()},
    }
    params["merge"] = {key: paper_entry(key, entry) for key, entry in params["merge"].items()
                       if not str(entry.get("path", "")).startswith(str(workspace.MTL))}
    return params


def paper_entry(key: str, entry: dict) -> dict:
    """A world merge entry with the recipe's schedules: its method's registered defaults."""
    fields = registry.get(entry.get("method", key)).params.model_fields
    return {name: fields[name].default if name in SCHEDULES else value for name, value in entry.items()}


def preset_text(name: str) -> str:
    if name == "world":
        return world_text()
    if name not in PAPER_MODELS:
        raise PipelineError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    arch = PAPER_MODELS[name][0]
    return PAPER_HEADER.format(name=name, arch=arch) + yaml.safe_dump(paper_params(name), sort_keys=False)


def write_preset(name: str, path: Path) -> None:
    """Write the preset; a different params file already there is kept beside it as `.bak`."""
    text = preset_text(name)
    kept = ""
    if path.exists() and path.read_text() != text:
        backup = path.with_name(path.name + ".bak")
        write_text(backup, path.read_text())
        kept = f" (the previous one is kept in {backup})"
    write_text(path, text)
    print(f"wrote the {name} preset to {path}{kept}" + ("" if name == "world" else
          "; next: `repsurgery fetch` (online), then `dvc repro`"))
