"""Stages that bring in the data and the encoders: build the miniature world (`source: world`),
or import the real models and test splits, from the fetch cache or from local files.

Every imported encoder goes through the converter, so whatever its format it lands as a
canonical open_clip image-encoder state dict with a fingerprint.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from cache.files import write_text
from pipeline import workspace
from pipeline.config import Params
from pipeline.data import catalog, hub, sources
from pipeline.data.importing import import_splits
from pipeline.errors import PipelineError
from pipeline.models import bert, clip
from pipeline.models.checkpoints import save_state
from pipeline.models.convert import to_canonical
from stages import world
from stages.common import progress

def fetch(params: Params) -> None:
    src = _source(params)
    items = sources.fetch_items(src, params.tasks)
    manifest = hub.fetch(items, sources.cache_dir(src), progress=progress)
    total = sum(f["bytes"] for e in manifest.values() for f in e["files"])
    print(f"fetched {len(items)} items into {sources.cache_dir(src)} ({total / 1e9:.2f} GB in all); "
          f"sizes and sha256 in {sources.cache_dir(src) / 'manifest.json'}")


def _source(params: Params):
    if params.is_world:
        raise PipelineError("params `source` is `world`: the miniature world needs no downloads. Switch to a real "
                            "setting first, e.g. `repsurgery preset paper-vit-b-32`")
    return params.source


def prepare_data(params: Params) -> None:
    if params.is_world:
        return world.build_data(params)
    src = params.source
    for task in progress(params.tasks, desc="import data", unit="task"):
        columns, templates = None, src.templates.get(task, [])
        if params.is_text:
            known = catalog.TEXT_TASKS.get(task)
            names = src.classnames.get(task) or (list(known.classnames) if known else None)
            if names is None:
                raise PipelineError(f"task {task!r} is none of the paper's text tasks ({', '.join(catalog.TEXT_TASKS)}): "
                                    "give its class names in params `source.classnames` (its dataset needs columns "
                                    "`text` and `label`)")
            columns = (known.text, known.label) if known else (("text",), "label")
        elif task in src.classnames:
            names = src.classnames[task]
        else:
            names, templates = catalog.classnames_and_templates(task)
        ref = src.datasets[task]
        rows = import_splits(sources.local(ref, "dataset", src, f"task {task}"), src.splits, workspace.DATA / task,
                             task, names, templates, origin=ref, progress=progress, text=columns)
        print(f"{task}: {', '.join(f'{n} {split}' for split, n in rows.items())} "
              f"{'texts' if params.is_text else 'images'} from {ref} -> {workspace.DATA / task}")


def prepare_pretrained(params: Params, device: torch.device) -> None:
    if params.is_world:
        return world.build_pretrained(params, device)
    if params.is_text:
        return import_bert(params)
    pretrained = params.source.pretrained
    config = json.loads(Path(pretrained.config).expanduser().read_text()) if pretrained.config else None
    spec = clip.spec_from_open_clip(pretrained.arch, config, str(pretrained.weights))
    weights = sources.pretrained_weights(params.source)
    model = clip.build_clip(spec)
    open_clip = clip.open_clip_module()  # here, not above: the world's stages copy shipped weights without it

    try:
        open_clip.load_checkpoint(model, str(weights), strict=True)  # weights_only loading
    except Exception as exc:
        raise PipelineError(f"pretrained weights {weights} do not load into {pretrained.arch or 'the config'}: "
                            f"{str(exc).splitlines()[0][:300]}") from exc
    shutil.rmtree(workspace.PRETRAINED, ignore_errors=True)  # a BERT's spec left there would say "text"
    fp = save_state(workspace.pretrained_clip(), model.state_dict(), source=str(weights))
    write_text(workspace.PRETRAINED / "clip.json", json.dumps({**spec, "weights": str(pretrained.weights)}, indent=1)
               + "\n")
    print(f"pretrained {pretrained.arch or 'CLIP'} from {weights} -> {workspace.PRETRAINED}/ (fingerprint {fp})")


def import_bert(params: Params) -> None:
    """A Hugging Face BERT folder (config.json, vocab.txt, weights) -> models/pretrained/: its
    spec, vocabulary and encoder weights (a BertFor* model's task head dropped)."""
    src = params.source
    folder = sources.pretrained_weights(src)
    vocab = folder / bert.VOCAB
    if not vocab.exists():
        raise PipelineError(f"{folder} has no {bert.VOCAB}: a BERT model folder holds config.json, {bert.VOCAB} and "
                            "its weights (`repsurgery fetch` downloads all three)")
    spec = bert.hub_spec(folder, params.model.max_length)
    staging = workspace.PRETRAINED.with_name("pretrained.partial")  # complete before it replaces the old one
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        bert.write_spec(staging, spec["config"], spec["max_length"], weights=str(src.pretrained.weights))
        shutil.copyfile(vocab, staging / bert.VOCAB)
        state, kind = to_canonical(folder, bert.build_encoder(spec).state_dict())
        fp = save_state(staging / bert.WEIGHTS, state, source=str(src.pretrained.weights), format=kind)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(workspace.PRETRAINED, ignore_errors=True)
    staging.rename(workspace.PRETRAINED)
    print(f"pretrained {src.pretrained.arch} from {folder} -> {workspace.PRETRAINED}/ (fingerprint {fp})")


def prepare_finetuned(params: Params, device: torch.device) -> None:
    if params.is_world or params.is_text:  # no published text fine-tunes: fine-tuned here (GPU)
        return world.build_finetuned(params, device, from_scratch=not params.is_world)
    src = params.source
    reference = clip.image_encoder(workspace.PRETRAINED).state_dict()
    for task in progress(params.tasks, desc="convert fine-tuned", unit="task"):
        ref = src.finetuned[task]
        state, kind = to_canonical(sources.local(ref, "model", src, f"fine-tuned {task}"), reference)
        path = workspace.finetuned_checkpoint(task)
        fp = save_state(path, state, task=task, source=ref, format=kind)
        print(f"fine-tuned {task}: {ref} ({kind}) -> {path} (fingerprint {fp})")


def convert(src: Path, dst: Path, like: Path) -> None:
    """`repsurgery convert`: one checkpoint to the canonical form, for the architecture in `like`."""
    reference = clip.image_encoder(like).state_dict()
    state, kind = to_canonical(src, reference)
    fp = save_state(dst, state, source=str(src), format=kind)
    print(f"{src} ({kind}) -> {dst}: {len(state)} tensors, fingerprint {fp}")
