"""Stages that bring in the data and the encoders: build the miniature world (`source: world`),
or import the real models and test splits, from the fetch cache or from local files.

Every imported encoder goes through the converter, so whatever its format it lands as a
canonical open_clip image-encoder state dict with a fingerprint.
"""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch

from pipeline import catalog, clip_model, hub
from pipeline.checkpoints import save_state
from pipeline.convert import to_canonical
from pipeline.errors import PipelineError
from pipeline.importing import import_split
from stages import world
from stages.common import DATA, PRETRAINED, SPLIT, finetuned_path, is_world, progress

SOURCE_KEYS = {"cache", "pretrained", "finetuned", "datasets", "classnames", "templates"}
DEFAULT_CACHE = "~/.cache/repsurgery"


def source(params: dict) -> dict:
    """The `source` section, checked: every task has a dataset and a fine-tuned encoder."""
    src = params.get("source")
    if not isinstance(src, dict):
        raise PipelineError(f"params `source` must be `world` or a mapping with {sorted(SOURCE_KEYS)}, got {src!r}")
    unknown = sorted(set(src) - SOURCE_KEYS)
    if unknown:
        raise PipelineError(f"params `source` has unknown key(s) {unknown}; allowed: {sorted(SOURCE_KEYS)}")
    pretrained = src.get("pretrained") or {}
    if not (pretrained.get("arch") or pretrained.get("config")) or not pretrained.get("weights"):
        raise PipelineError("params `source.pretrained` needs `arch` (an open_clip name) or `config` (a model "
                            "config JSON file), and `weights` (an open_clip tag such as `openai`, or a file)")
    for key in ("datasets", "finetuned"):
        lacking = [t for t in params["tasks"] if t not in (src.get(key) or {})]
        if lacking:
            raise PipelineError(f"params `source.{key}` has no entry for task(s) {lacking}")
    return {"cache": DEFAULT_CACHE, **src}


def cache_dir(src: dict) -> Path:
    return Path(src["cache"]).expanduser()


def _pretrained_hub_ref(pretrained: dict) -> hub.HubRef | None:
    """Where open_clip publishes the weights of an (arch, tag) pair; None for a local file."""
    weights = str(pretrained["weights"])
    if Path(weights).expanduser().suffix in (".pt", ".bin", ".pth", ".safetensors") or not pretrained.get("arch"):
        return None
    cfg = open_clip.get_pretrained_cfg(pretrained["arch"], weights)
    if not cfg.get("hf_hub"):
        raise PipelineError(f"open_clip has no Hub copy of {pretrained['arch']} / {weights!r}: download the weights "
                            "yourself and set `source.pretrained.weights` to the file")
    return hub.HubRef(cfg["hf_hub"].strip("/"), "", "model")


PRETRAINED_FILES = [["open_clip_model.safetensors"], ["open_clip_pytorch_model.bin"]]


def fetch_items(params: dict) -> list[tuple[str, hub.HubRef, list[list[str]]]]:
    """Everything the params' source names on the Hub, as (what, where, file patterns)."""
    src = source(params)
    items = []
    ref = _pretrained_hub_ref(src["pretrained"])
    if ref:
        items.append((f"pretrained {src['pretrained']['arch']}", ref, PRETRAINED_FILES))
    for task in params["tasks"]:
        if hub.is_hub(src["finetuned"][task]):
            ref = hub.parse(src["finetuned"][task], "model")
            items.append((f"fine-tuned {task}", ref, hub.model_patterns(ref)))
        if hub.is_hub(src["datasets"][task]):
            ref = hub.parse(src["datasets"][task], "dataset")
            items.append((f"{task} {SPLIT} split", ref, hub.dataset_patterns(ref, SPLIT)))
    return items


def fetch(params: dict) -> None:
    src = source(params)
    items = fetch_items(params)
    manifest = hub.fetch(items, cache_dir(src), progress=progress)
    total = sum(f["bytes"] for e in manifest.values() for f in e["files"])
    print(f"fetched {len(items)} items into {cache_dir(src)} ({total / 1e9:.2f} GB in all); "
          f"sizes and sha256 in {cache_dir(src) / 'manifest.json'}")


def _local(ref: str, kind: str, src: dict, what: str) -> Path:
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


def prepare_data(params: dict) -> None:
    if is_world(params):
        return world.build_data(params)
    src = source(params)
    for task in progress(params["tasks"], desc="import data", unit="task"):
        names, templates = (src["classnames"][task], src["templates"][task]) if task in (src.get("classnames") or {}) \
            else catalog.classnames_and_templates(task)
        ref = src["datasets"][task]
        rows = import_split(_local(ref, "dataset", src, f"task {task}"), SPLIT, DATA / task, task, names, templates,
                            origin=ref, progress=progress)
        print(f"{task}: {rows} {SPLIT} images from {ref} -> {DATA / task}")


def _pretrained_weights(src: dict) -> Path:
    ref = _pretrained_hub_ref(src["pretrained"])
    if ref is None:
        return _local(str(src["pretrained"]["weights"]), "model", src, "pretrained weights")
    from huggingface_hub import try_to_load_from_cache

    folder = ref.path_in(cache_dir(src))
    for (name,) in PRETRAINED_FILES:
        if (folder / name).exists():
            return folder / name
        cached = try_to_load_from_cache(ref.repo_id, name)  # where open_clip itself would have put it
        if isinstance(cached, str):
            return Path(cached)
    raise PipelineError(f"pretrained weights of {src['pretrained']['arch']} are neither in {folder} nor in the "
                        "Hugging Face cache that open_clip uses. Run `repsurgery fetch` (needs network), or set "
                        "`source.pretrained.weights` to a local file")


def prepare_pretrained(params: dict, device: torch.device) -> None:
    if is_world(params):
        return world.build_pretrained(params, device)
    src = source(params)
    pretrained = src["pretrained"]
    config = json.loads(Path(pretrained["config"]).expanduser().read_text()) if pretrained.get("config") else None
    spec = clip_model.spec_from_open_clip(pretrained.get("arch"), config, str(pretrained["weights"]))
    weights = _pretrained_weights(src)
    model = clip_model.build_clip(spec)
    try:
        open_clip.load_checkpoint(model, str(weights), strict=True)  # weights_only loading
    except Exception as exc:
        raise PipelineError(f"pretrained weights {weights} do not load into {pretrained.get('arch') or 'the config'}: "
                            f"{str(exc).splitlines()[0][:300]}") from exc
    fp = save_state(PRETRAINED / "clip.safetensors", model.state_dict(), source=str(weights))
    (PRETRAINED / "clip.json").write_text(json.dumps({**spec, "weights": str(pretrained["weights"])}, indent=1) + "\n")
    print(f"pretrained {pretrained.get('arch') or 'CLIP'} from {weights} -> {PRETRAINED}/ (fingerprint {fp})")


def prepare_finetuned(params: dict, device: torch.device) -> None:
    if is_world(params):
        return world.build_finetuned(params, device)
    src = source(params)
    reference = clip_model.image_encoder(PRETRAINED).state_dict()
    for task in progress(params["tasks"], desc="convert fine-tuned", unit="task"):
        ref = src["finetuned"][task]
        state, kind = to_canonical(_local(ref, "model", src, f"fine-tuned {task}"), reference)
        fp = save_state(finetuned_path(task), state, task=task, source=ref, format=kind)
        print(f"fine-tuned {task}: {ref} ({kind}) -> {finetuned_path(task)} (fingerprint {fp})")


def convert(src: Path, dst: Path, like: Path) -> None:
    """`repsurgery convert`: one checkpoint to the canonical form, for the architecture in `like`."""
    reference = clip_model.image_encoder(like).state_dict()
    state, kind = to_canonical(src, reference)
    fp = save_state(dst, state, source=str(src), format=kind)
    print(f"{src} ({kind}) -> {dst}: {len(state)} tensors, fingerprint {fp}")
