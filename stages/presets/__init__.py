"""Params presets: the miniature world (the default params.yaml) and the paper's setting.

The paper presets are the world preset as written, comments included, with three sections
replaced: tasks, `source` and the merge entries, whose learned schedules are left to each
method's registered default (the recipe's, where the world runs 100 steps); entries that read
a file of the miniature world (the Traditional MTL checkpoint) are left out. Nothing here
imports torch: `repsurgery preset` starts at once.
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import yaml

from cache.files import write_text
from pipeline import workspace
from pipeline.data.catalog import PAPER_TASKS
from pipeline.errors import PipelineError
from pipeline.merging.registry import SCHEDULES

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
# 2. `dvc repro` then runs offline (its first stage checks that everything is there before it
#    replaces anything). Entries of `source.finetuned` / `source.datasets` may also be local
#    paths (checkpoint files or model folders; parquet shards or one folder per class).
# The sections world, model, pretrain, finetune and mtl are unused with a real source.

"""
# comments above the sections a paper preset replaces (the rest keep the world preset's)
PAPER_COMMENTS = {
    "tasks": "# the paper's eight tasks, in its order\n",
    "source": "# where the models and test splits come from: hf://owner/name[/subfolder] (in `cache` after\n"
              "# `repsurgery fetch`) or local paths\n",
    "merge": "# the paper's Table 1 methods (`repsurgery list methods`); learned schedules (steps, mask_steps) are\n"
             "# each method's default, the recipe's (`repsurgery list params` shows every value). Data-using merges\n"
             "# read the test splits (`split: auto` finds no train split here): the transductive setting of the\n"
             "# AdaMerging and Concrete papers. Surgery on a merged encoder made elsewhere:\n"
             "# `mine: {method: checkpoint, path: FILE}`\n",
}


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
    params["merge"] = {key: {k: v for k, v in entry.items() if k not in SCHEDULES}
                       for key, entry in params["merge"].items()
                       if not str(entry.get("path", "")).startswith(str(workspace.MTL))}
    return params


def sections(text: str) -> dict[str, str]:
    """A YAML file's top-level sections exactly as written, comments and blank lines included
    ("" holds the lines above the first)."""
    out, key = {"": ""}, ""
    for line in text.splitlines(keepends=True):
        if match := re.match(r"([A-Za-z_]\w*):", line):
            key = match.group(1)
            out[key] = ""
        out[key] += line
    return out


def preset_text(name: str) -> str:
    if name == "world":
        return world_text()
    if name not in PAPER_MODELS:
        raise PipelineError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    params = paper_params(name)
    parts = [PAPER_HEADER.format(name=name, arch=PAPER_MODELS[name][0])]
    for key, text in sections(world_text()).items():
        if key in PAPER_COMMENTS:
            flow = None if key != "source" else False  # short mappings on one line; the source as a tree
            text = PAPER_COMMENTS[key] + yaml.safe_dump({key: params[key]}, sort_keys=False, width=110,
                                                        default_flow_style=flow) + "\n"
        parts.append(text if key else "")
    return "".join(parts)


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
