"""Params presets: the miniature world (the default params.yaml) and the paper's setting.

The paper presets (`paper-<arch>`: FusionBench's Hub fine-tunes; `paper-ta-<arch>`: the Task
Arithmetic release from a local folder) are the world preset as written, comments included,
with three sections replaced: tasks, `source` (with the checkpoint family) and the merge entries,
whose learned schedules and step sizes are left to each method's registered default (the
recipe's, where the world runs 100 steps or sizes WUDI's step to its task vectors); entries that read
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
from pipeline.merging.registry import SCHEDULES, STEP_SIZES
from pipeline.reporting.published import merge_params

# architecture -> (open_clip name, name in tanganke/clip-vit-*_<task> model ids, folder of the Task
# Arithmetic release)
ARCHS = {
    "vit-b-32": ("ViT-B-32-quickgelu", "clip-vit-base-patch32", "ViT-B-32"),
    "vit-b-16": ("ViT-B-16-quickgelu", "clip-vit-base-patch16", "ViT-B-16"),
    "vit-l-14": ("ViT-L-14-quickgelu", "clip-vit-large-patch14", "ViT-L-14"),
}
# preset prefix -> the checkpoint family it reads (pipeline/assets/published.json)
FAMILIES = {"paper": "fusionbench", "paper-ta": "task_arithmetic"}
PAPER_PRESETS = {f"{prefix}-{arch}": (family, arch) for prefix, family in FAMILIES.items() for arch in ARCHS}
# `world-full`: the default world with what does not fit its five-minute run: three surgery seeds, and
# every adapter compared on every merge entry with the oracle and routed (docs/no-oracle.md)
WORLD_FULL = {  # the start of a line -> what replaces that start
    "  seeds: [0]    ": "  seeds: [0, 1, 2]",
    "    methods: [task_arithmetic, lw_adamerging]       # the preset world-full: every entry":
        "    methods: []                                     # every entry",
}
PRESETS = ("world", "world-full", "text-world", "paper-bert", *PAPER_PRESETS)
# `paper-bert`: the NLP experiment's setting (Appendix B.2), the text world's preset with these sections
# replaced: bert-base-uncased and the five datasets from the Hub, fine-tuned here with the recipe below
PAPER_BERT_HEADER = """\
# The paper's NLP setting (Appendix B.2, Tables 6 and 7): bert-base-uncased fine-tuned on AG News,
# Yelp, Amazon, Yahoo Answers and DBPedia, merged, with surgery. Written by `repsurgery preset paper-bert`.
# 1. `repsurgery fetch` downloads the model and the five datasets (test and train splits) into
#    `source.cache` (online, once).
# 2. `dvc repro` then runs offline; stage finetuned fine-tunes each task's BERT with its head (a GPU
#    job: params `finetune`, docs/text.md). The sections world and pretrain are unused here.
modality: text

"""
PAPER_BERT = {  # section -> its text
    "source": "# the Hub copies of the five datasets (pipeline/data/catalog.py TEXT_TASKS: which columns are read);\n"
              "# no fine-tuned entries: stage finetuned trains them (params `finetune`)\n",
    "finetune": "# fine-tuning bert-base-uncased per task, its head trained with it: de Masson d'Autume et al. (2019)'s\n"
                "# recipe for these five datasets (lr 3e-5, batch 32, one epoch of 115,000 examples), with AdamW's\n"
                "# usual BERT weight decay and 10 % warm-up (the paper states none of its own; docs/text.md)\n",
    "merge": "# Table 6's merges and the field's, unchanged on BERT state dicts; learned schedules are the methods'\n"
             "# defaults (the recipe's); WUDI's step is its authors' (checkpoints fine-tuned at lr ~1e-5)\n",
}


PAPER_HEADER = """\
# The paper's setting ({name}): OpenAI CLIP {arch}, the eight test splits from the Hugging Face
# Hub, and {checkpoints}.
# Written by `repsurgery preset {name}`.
# 1. `repsurgery fetch` downloads everything named in `source` into `source.cache` (online, once).
# 2. `dvc repro` then runs offline (its first stage checks that everything is there before it
#    replaces anything). Entries of `source.finetuned` / `source.datasets` may also be local
#    paths (checkpoint files or model folders; parquet shards or one folder per class).
# The sections world, model, pretrain, finetune and mtl are unused with a real source.

"""
CHECKPOINTS = {
    "fusionbench": "FusionBench's eight fine-tuned task encoders from the Hub (tanganke/clip-vit-*)",
    "task_arithmetic": "the eight fine-tuned task encoders of the Task Arithmetic release (the\n# checkpoints of the paper's "
                       "tables), read from a local folder in its layout: {folder}/<Dataset>/finetuned.pt\n# (its "
                       "zeroshot.pt is not needed: it holds the OpenAI weights open_clip loads)",
}
# comments above the sections a paper preset replaces (the rest keep the world preset's)
PAPER_COMMENTS = {
    "tasks": "# the paper's eight tasks, in its order\n",
    "source": "# where the models and test splits come from: hf://owner/name[/subfolder] (in `cache` after\n"
              "# `repsurgery fetch`) or local paths; `family`: whose published figures evaluate compares the\n"
              "# run with (pipeline/assets/published.json; own: none)\n",
    "merge": "# the paper's Table 1 methods (`repsurgery list methods`); learned schedules (steps, mask_steps) are\n"
             "# each method's default, the recipe's (`repsurgery list params` shows every value); the other values are\n"
             "# those of the family's reference code (docs/fidelity.md). `split`: each paper's: the train splits\n"
             "# (fetched with the test splits, `source.splits`) for Fisher Merging and RegMean, the unlabeled test\n"
             "# images (transductive) for AdaMerging and Concrete. Surgery on a merged encoder made elsewhere:\n"
             "# `mine: {method: checkpoint, path: FILE}`\n",
}


def release_folder(name: str) -> str:
    """Where a Task Arithmetic preset looks for the release by default (its own layout, from the project root)."""
    return f"checkpoints/{ARCHS[PAPER_PRESETS[name][1]][2]}"


def world_text() -> str:
    return resources.files("stages.presets").joinpath("world.yaml").read_text()


def real_merges(merge: dict, family: str) -> dict:
    """A world preset's merge entries for a real setting: learned schedules and step sizes left to
    each method's registered (reference) default, the family's reference settings over them, and
    no entry that reads a file of the miniature world (the Traditional MTL checkpoint)."""
    family_params = merge_params(family)
    return {key: {**{k: v for k, v in entry.items() if k not in SCHEDULES + STEP_SIZES}, **family_params.get(key, {})}
            for key, entry in merge.items() if not str(entry.get("path", "")).startswith(str(workspace.MTL))}


def paper_params(name: str, checkpoints: str | None = None) -> dict:
    family, arch_key = PAPER_PRESETS[name]
    arch, hub_model, _ = ARCHS[arch_key]
    params = yaml.safe_load(world_text())
    params["tasks"] = list(PAPER_TASKS)
    if family == "fusionbench":
        finetuned = {t: f"hf://tanganke/{hub_model}_{task.hub_task}" for t, task in PAPER_TASKS.items()}
    else:
        folder = checkpoints or release_folder(name)
        finetuned = {t: f"{folder}/{task.release_folder}/finetuned.pt" for t, task in PAPER_TASKS.items()}
    params["source"] = {
        "family": family,
        "cache": "~/.cache/repsurgery",
        "pretrained": {"arch": arch, "weights": "openai"},
        "finetuned": finetuned,
        "datasets": {t: f"hf://{task.dataset}" for t, task in PAPER_TASKS.items()},
    }
    params["merge"] = real_merges(params["merge"], family)
    if params["router"]["split"] == "train" or any(entry.get("split") == "train" for entry in params["merge"].values()):
        params["source"]["splits"] = ["test", "train"]  # what the router and the data-using merges learn from
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


def world_full_text() -> str:
    text = world_text().replace("# Default: the miniature offline world (no downloads, runs on 2 CPU cores).",
                                "# The miniature offline world in full (`repsurgery preset world-full`): three surgery "
                                "seeds, every\n# adapter on every merge entry (docs/no-oracle.md). No downloads, 2 CPU "
                                "cores, about 40 s more than the default run.", 1)
    for old, new in WORLD_FULL.items():
        if text.count("\n" + old) != 1:
            raise PipelineError(f"the world preset no longer has the line {old.strip()!r} that world-full changes: "
                                "update WORLD_FULL in stages/presets/__init__.py")
        text = text.replace("\n" + old, "\n" + new)
    return text


def text_world_text() -> str:
    """The world preset with text-world.yaml's sections in place of its own (the ones it adds,
    `modality`, first); the rest (extract, surgery, adapters, router, analyses) as the image world's."""
    base = sections(world_text())
    text = sections(resources.files("stages.presets").joinpath("text-world.yaml").read_text())
    return "".join([text[""], *(part for key, part in text.items() if key and key not in base),
                    *(text.get(key, part) for key, part in base.items() if key)])


def paper_bert_params() -> dict:
    from pipeline.data.catalog import TEXT_TASKS

    params = yaml.safe_load(text_world_text())
    params["source"] = {
        "family": "surgery_bert",
        "cache": "~/.cache/repsurgery",
        "splits": ["test", "train"],
        "pretrained": {"arch": "bert-base-uncased", "weights": "hf://google-bert/bert-base-uncased"},
        "datasets": {t: f"hf://{task.dataset}" for t, task in TEXT_TASKS.items()},
    }
    params["finetune"] = {"steps": 3600, "batch_size": 32, "lr": 3.0e-5, "weight_decay": 0.01, "warmup": 360}
    params["merge"] = real_merges(params["merge"], "surgery_bert")
    return params


def paper_bert_text() -> str:
    """The text world's preset with the real source, BERT's fine-tuning recipe and merges; its
    `model.max_length` set to the 128 tokens the recipe reads."""
    params = paper_bert_params()
    parts = [PAPER_BERT_HEADER]
    for key, text in sections(text_world_text()).items():
        if key in ("", "modality"):
            continue
        if key in PAPER_BERT:
            flow = None if key != "source" else False
            text = PAPER_BERT[key] + yaml.safe_dump({key: params[key]}, sort_keys=False, width=110,
                                                    default_flow_style=flow) + "\n"
        elif key == "model":  # the architecture is the Hub model's config.json: only the token length is read
            text = re.sub(r"^model:.*\n", "model:                 # only max_length is read: the architecture is "
                          "bert-base-uncased's config\n", text).replace("  max_length: 24 ", "  max_length: 128")
        parts.append(text)
    return "".join(parts)


def preset_text(name: str, checkpoints: str | None = None) -> str:
    if name == "world":
        return world_text()
    if name == "world-full":
        return world_full_text()
    if name == "text-world":
        return text_world_text()
    if name == "paper-bert":
        return paper_bert_text()
    if name not in PAPER_PRESETS:
        raise PipelineError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    params = paper_params(name, checkpoints)
    family, arch_key = PAPER_PRESETS[name]
    folder = checkpoints or release_folder(name) if family == "task_arithmetic" else None
    parts = [PAPER_HEADER.format(name=name, arch=ARCHS[arch_key][0],
                                 checkpoints=CHECKPOINTS[family].format(folder=folder))]
    for key, text in sections(world_text()).items():
        if key in PAPER_COMMENTS:
            flow = None if key != "source" else False  # short mappings on one line; the source as a tree
            text = PAPER_COMMENTS[key] + yaml.safe_dump({key: params[key]}, sort_keys=False, width=110,
                                                        default_flow_style=flow) + "\n"
        parts.append(text if key else "")
    return "".join(parts)


def write_preset(name: str, path: Path, checkpoints: str | None = None) -> None:
    """Write the preset; a different params file already there is kept beside it as `.bak`."""
    if checkpoints and PAPER_PRESETS.get(name, ("",))[0] != "task_arithmetic":
        raise PipelineError(f"--checkpoints is the Task Arithmetic release's folder: it applies to the "
                            f"{', '.join(n for n, (f, _) in PAPER_PRESETS.items() if f == 'task_arithmetic')} presets")
    text = preset_text(name, checkpoints)
    kept = ""
    if path.exists() and path.read_text() != text:
        backup = path.with_name(path.name + ".bak")
        write_text(backup, path.read_text())
        kept = f" (the previous one is kept in {backup})"
    write_text(path, text)
    if name == "text-world":
        step = "; next: `make repro` (it adds transformers, which text encoders need, then runs `dvc repro`)"
    elif "world" in name:
        step = ""
    elif name == "paper-bert":
        step = ("; next: `pip install -e '.[text]'` (transformers), `repsurgery fetch` (online), then `dvc repro` "
                "(fine-tuning five BERTs: a GPU job)")
    elif PAPER_PRESETS[name][0] == "task_arithmetic":
        step = (f"; the fine-tuned encoders are read from {checkpoints or release_folder(name)}/<Dataset>/finetuned.pt; "
                "next: `repsurgery fetch` (online: the pretrained weights and test splits), then `dvc repro`")
    else:
        step = "; next: `repsurgery fetch` (online), then `dvc repro`"
    print(f"wrote the {name} preset to {path}{kept}{step}")
