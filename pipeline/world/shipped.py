"""The miniature world's encoders as shipped with the code (the pretrained CLIP, the fine-tuned
encoders, the Traditional MTL encoder), so that a first `make repro` takes minutes, not the
pretraining's quarter of an hour on two cores.

They play the part the downloaded checkpoints play in the real setting and are checked the
same way: every file against the sha256 in the manifest. `repsurgery build-world` builds them
from scratch through the stages' own code and writes them here. The stages use them only when
the params and the world's code (`CODE`) are the ones that built them; any other
world (the tests' tiny one, an experiment on `pretrain.steps`) is built from scratch.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from cache.files import sha256_file, temporary_sibling
from pipeline import workspace
from pipeline.errors import PipelineError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
ROOTS = {"image": ASSETS / "world", "text": ASSETS / "text-world"}  # each modality's world, shipped apart
PARTS = {"pretrained": workspace.PRETRAINED, "finetuned": workspace.FINETUNED, "mtl": workspace.MTL}
WORLD = ("tasks", "world", "model", "pretrain")
SECTIONS = {"pretrained": WORLD, "finetuned": (*WORLD, "finetune"), "mtl": (*WORLD, "mtl")}  # what shapes each part
CODE = {  # the world's code that shapes the encoders (files of pipeline/world)
    "image": ("images.py", "pretrain.py", "finetune.py", "mtl.py"),
    "text": ("texts.py", "mlm.py", "finetune.py", "mtl.py"),
}


def root(params) -> Path:
    return ROOTS[params.modality]


def recipe(params, part: str) -> dict[str, Any]:
    """What a shipped part is a function of: the params sections that shape it and the world's code."""
    dumped = params.model_dump()
    code = hashlib.sha256()
    for name in CODE[params.modality]:
        sha256_file(Path(__file__).with_name(name), code)
    return {"params": {key: dumped[key] for key in SECTIONS[part]}, "code": code.hexdigest()}


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def manifest(folder: Path) -> dict | None:
    path = folder / "manifest.json"
    if not path.exists():
        return None
    fix = f"Restore it with `git checkout -- {folder}`, or rebuild every shipped encoder with `repsurgery build-world`"
    try:
        shipped = json.loads(path.read_text())
    except ValueError as exc:
        raise PipelineError(f"{path} is not valid JSON ({exc}). {fix}") from None
    parts = shipped.get("parts") if isinstance(shipped, dict) else None
    missing = [part for part in PARTS
               if not isinstance(parts, dict) or not {"files", "recipe"} <= set(parts.get(part, {}))]
    if missing:
        raise PipelineError(f"{path} lacks the files or recipe of {', '.join(missing)}. {fix}")
    return shipped


def differences(params, part: str) -> str:
    """Why the shipped `part` does not fit these params ("" when it does)."""
    shipped = manifest(root(params))
    if shipped is None:
        return f"none are shipped ({root(params) / 'manifest.json'} is missing)"
    current, built = recipe(params, part), shipped["parts"][part]["recipe"]
    changed = [f"params `{key}`" for key in SECTIONS[part]
               if not _same(current["params"][key], built["params"].get(key))]
    if current["code"] != built["code"]:
        changed.append(f"world code ({', '.join(CODE[params.modality])} in pipeline/world)")
    return f"the shipped ones were built with other {', '.join(changed)}" if changed else ""


def install(part: str, params) -> bool:
    """Copy the shipped `part` into the workspace if it fits `params`, checking every file.
    False (nothing copied) when it must be built from scratch, with the reason printed."""
    why = differences(params, part)
    if why:
        print(f"{part}: building from scratch, as {why} (`repsurgery build-world` ships new ones)")
        return False
    folder = root(params)
    files = manifest(folder)["parts"][part]["files"]
    for name, sha in files.items():
        source = folder / part / name
        if not source.exists() or sha256_file(source).hexdigest() != sha:
            raise PipelineError(f"shipped world encoder file {source} is missing or damaged (its sha256 is not the "
                                f"one in {folder / 'manifest.json'}). Restore it with `git checkout -- {folder}`, or "
                                "rebuild every shipped encoder with `repsurgery build-world`")
    target = PARTS[part]
    staging = temporary_sibling(target)  # complete before it replaces the workspace's part
    staging.mkdir(parents=True)
    try:
        for name in files:
            shutil.copyfile(folder / part / name, staging / name)
    except BaseException:  # an interrupted or failed copy leaves nothing beside the workspace
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    shown = Path(*folder.parts[-3:], "manifest.json")  # pipeline/assets/<world>/manifest.json
    print(f"{part}: the shipped world encoders ({len(files)} files, checked against {shown}) -> {target}/")
    return True


def publish(params, built_with: dict[str, Any]) -> None:
    """Ship the workspace's freshly built encoders: staged beside, then swapped in whole."""
    parts, folder = {}, root(params)
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    for part, source in PARTS.items():
        (staging / part).mkdir(parents=True)
        files = {}
        for path in sorted(p for p in source.iterdir() if p.is_file()):
            shutil.copyfile(path, staging / part / path.name)
            files[path.name] = sha256_file(path).hexdigest()
        parts[part] = {"files": files, "recipe": recipe(params, part)}
    (staging / "manifest.json").write_text(json.dumps({"built_with": built_with, "parts": parts}, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
