"""Where a real setting's models and test splits come from (params `source`): Hub entries
(`hf://owner/name[/subfolder]`) resolved in the fetch cache, or local paths; the list of
downloads `repsurgery fetch` makes. Nothing here touches the network except `hub.fetch`."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.data import hub
from pipeline.errors import PipelineError

PRETRAINED_FILES = [["open_clip_model.safetensors"], ["open_clip_pytorch_model.bin"]]


def cache_dir(src) -> Path:
    return Path(src.cache).expanduser()


def pretrained_hub_ref(pretrained) -> hub.HubRef | None:
    """Where the pretrained weights are on the Hub: a model folder named `hf://...` (a text
    encoder's: config, vocabulary and weights), or where open_clip publishes an (arch, tag)
    pair's; None for a local path."""
    weights = str(pretrained.weights)
    if hub.is_hub(weights):
        return hub.parse(weights, "model")
    local_path = Path(weights).expanduser()
    if local_path.exists() or local_path.suffix in (".pt", ".bin", ".pth", ".safetensors") or not pretrained.arch:
        return None
    from pipeline.models import clip

    open_clip = clip.open_clip_module()  # seconds to import, and only this function needs it

    cfg = open_clip.get_pretrained_cfg(pretrained.arch, weights)
    if not cfg.get("hf_hub"):
        raise PipelineError(f"open_clip has no Hub copy of {pretrained.arch} / {weights!r}: download the weights "
                            "yourself and set `source.pretrained.weights` to the file")
    return hub.HubRef(cfg["hf_hub"].strip("/"), "", "model")


def fetch_items(src, tasks: list[str]) -> list[tuple[str, hub.HubRef, list[list[str]]]]:
    """Everything the source names on the Hub, as (what, where, file patterns): every split of
    `source.splits`."""
    items = []
    ref = pretrained_hub_ref(src.pretrained)
    if ref:
        files = hub.bert_patterns(ref) if hub.is_hub(str(src.pretrained.weights)) else PRETRAINED_FILES
        items.append((f"pretrained {src.pretrained.arch}", ref, files))
    for task in tasks:
        if hub.is_hub(src.finetuned.get(task)):
            ref = hub.parse(src.finetuned[task], "model")
            items.append((f"fine-tuned {task}", ref, hub.model_patterns(ref)))
        if hub.is_hub(src.datasets[task]):
            ref = hub.parse(src.datasets[task], "dataset")
            items += [(f"{task} {split} split", ref, hub.dataset_patterns(ref, split)) for split in src.splits]
    return items


def local(ref: str, kind: str, src, what: str) -> Path:
    """The local path of a source entry: a hub download in the cache, or a user's path."""
    if hub.is_hub(ref):
        path = hub.parse(ref, kind).path_in(cache_dir(src))
        if not path.exists():
            raise PipelineError(f"{what}: {ref} is not in the cache ({path}). Run `repsurgery fetch` (needs network), "
                                "or put the files there by hand, or point params `source` at a local path")
        return path
    path = Path(ref).expanduser()
    if not path.exists():
        raise PipelineError(f"{what}: {path} does not exist (params `source`)")
    return path


def pretrained_weights(src) -> Path:
    ref = pretrained_hub_ref(src.pretrained)
    if ref is None or hub.is_hub(str(src.pretrained.weights)):  # a file, or a model folder
        return local(str(src.pretrained.weights), "model", src, "pretrained weights")
    from huggingface_hub import try_to_load_from_cache

    folder = ref.path_in(cache_dir(src))
    for (name,) in PRETRAINED_FILES:
        if (folder / name).exists():
            return folder / name
        cached = try_to_load_from_cache(ref.repo_id, name)  # where open_clip itself would have put it
        if isinstance(cached, str):
            return Path(cached)
    raise PipelineError(f"pretrained weights of {src.pretrained.arch} are neither in {folder} nor in the "
                        "Hugging Face cache that open_clip uses. Run `repsurgery fetch` (needs network), or set "
                        "`source.pretrained.weights` to a local file")


def check(src, tasks: list[str]) -> dict:
    """Every model and test split the source names, resolved to its local path (the Hub entries
    in the fetch cache), before any stage replaces an output: a record of where each came from,
    with the sha256 `repsurgery fetch` took of its files. Every gap is named at once."""
    manifest_path = cache_dir(src) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    entries = [("pretrained weights", str(src.pretrained.weights), "pretrained")]
    for task in tasks:  # a text task without a fine-tuned entry is fine-tuned here
        entries += [(f"fine-tuned {task}", src.finetuned[task], "model")] if task in src.finetuned else []
        entries += [(f"task {task}", src.datasets[task], "dataset")]
    record, missing = {}, []
    for what, ref, kind in entries:
        try:
            path = pretrained_weights(src) if kind == "pretrained" else local(ref, kind, src, what)
        except PipelineError as exc:
            missing.append(str(exc))
            continue
        uri = hub.parse(ref, kind).uri if hub.is_hub(ref) else None
        files = manifest.get(uri, {}).get("files", []) if uri else []
        record[what] = {"ref": ref, "path": str(path), "files": [{k: f[k] for k in ("path", "sha256")} for f in files]}
    if missing:
        raise PipelineError(f"{len(missing)} of {len(entries)} sources named in params `source` are not available "
                            "locally; nothing was changed:\n  " + "\n  ".join(missing))
    return record
