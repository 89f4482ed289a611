"""Stage `extract`: cache every encoder's features in feature stores, decoding each image once.

One stage covers all encoders (pretrained on every task, each individual encoder on its own
task, every merged encoder on every task) so that each task's images are decoded and
preprocessed once and fed to all of them. Its outputs are `persist`ent in dvc.yaml: DVC does
not delete them before a re-run, and stores whose encoder and dataset fingerprints still
match are kept, so a change to one merge method recomputes only that method's stores.
"""
from __future__ import annotations

import functools
import shutil
from pathlib import Path

import torch

from pipeline import clip_model, data
from pipeline.checkpoints import load_state
from pipeline.errors import PipelineError
from pipeline.extraction import Job, Ref, Target, extract, is_done
from stages.common import (DATA, FEATURES, METHODS, PRETRAINED, SPLIT, finetuned_path, merged_path, progress,
                           store_path, tasks)
from stages.features import checkpoint_fingerprint, fix_hint

AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
REFERENCE = ("pretrained", "individual")


def configured_methods(params: dict) -> list[str]:
    """Merge methods the params configure (a `merge.<m>` or `adamerging.<m>` section)."""
    configured = set(params.get("merge", {})) | set(params.get("adamerging", {}))
    return [m for m in METHODS if m in configured]


def checkpoint(encoder: str, task: str) -> Path | None:
    """The weights an encoder name means for a task (None: the pretrained CLIP's own)."""
    if encoder == "pretrained":
        return None
    return finetuned_path(task) if encoder == "individual" else merged_path(encoder)


def build_encoder(model_dir: str, weights: str | None) -> torch.nn.Module:
    """The image tower of the CLIP in `model_dir` with `weights` (picklable: Dask workers call it)."""
    encoder = clip_model.image_encoder(Path(model_dir))
    if weights is not None:
        hint = "Run `repsurgery prepare-finetuned`." if "finetuned" in weights else "Run `repsurgery merge` / `adamerge`."
        encoder.load_state_dict(load_state(Path(weights), like=encoder.state_dict(), hint=hint))
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder.eval()


def build_dataset(root: str, task: str, split: str, model_dir: str) -> data.ImageDataset:
    """A task's split with the CLIP's validation transform (picklable: Dask workers call it)."""
    transform = clip_model.preprocess_for(clip_model.read_spec(Path(model_dir)))
    return data.ImageDataset(Path(root), task, split, transform)


def encoder_ref(encoder: str, task: str) -> Ref:
    weights = checkpoint(encoder, task)
    if weights is not None and not weights.exists():
        raise PipelineError(f"checkpoint {weights} does not exist: it is needed for the {encoder} features. "
                            + ("Run `repsurgery prepare-finetuned`." if encoder == "individual" else
                               f"Run `repsurgery merge {encoder}` (or adamerge) first."))
    fp = checkpoint_fingerprint(encoder, task)
    return Ref(f"encoder:{fp}", functools.partial(build_encoder, str(PRETRAINED.resolve()),
                                                  None if weights is None else str(weights.resolve())))


def jobs(params: dict, encoders: list[str]) -> list[Job]:
    """One job per task: the task's images once, through every named encoder that applies."""
    spec = clip_model.read_spec(PRETRAINED)
    out = []
    for task in tasks(params):
        data_fp = data.dataset_fingerprint(DATA, task, SPLIT)
        attrs = {"task": task, "split": SPLIT, "dataset_fingerprint": data_fp,
                 "preprocess": spec.get("preprocess") or spec.get("arch")}
        targets = [Target(encoder_ref(name, task), store_path(name, task),
                          {"encoder_fingerprint": checkpoint_fingerprint(name, task), **attrs})
                   for name in encoders]
        out.append(Job(Ref(f"data:{data_fp}", functools.partial(build_dataset, str(DATA.resolve()), task, SPLIT,
                                                                  str(PRETRAINED.resolve()))),
                       n_rows=len(data.labels(DATA, task, SPLIT)), targets=targets, name=task))
    return out


def chosen_encoders(params: dict, names: list[str] | None) -> list[str]:
    allowed = [*REFERENCE, *configured_methods(params)]
    for name in names or []:
        if name not in allowed:
            raise PipelineError(f"unknown encoder {name!r} to extract: choose among {', '.join(allowed)} "
                                "(merge methods must be configured in params.yaml)")
    return list(names) if names else allowed


def prune(params: dict, encoders: list[str]) -> None:
    """Drop stores of tasks no longer in the params, so the persistent outputs match them."""
    keep = {store_path(e, t) for e in encoders for t in tasks(params)}
    for encoder in encoders:
        for stale in sorted((FEATURES / encoder).glob(f"*-{SPLIT}.zarr")):
            if stale not in keep:
                shutil.rmtree(stale)
                print(f"removed {stale}: its task is not in params `tasks`")


def extract_features(params: dict, device: torch.device, names: list[str] | None = None, *,
                     scheduler: str | None = None, workers: int | None = None) -> None:
    """Extract the named encoders (default: all) on every task, here or on a Dask cluster."""
    cfg = params["extract"]
    encoders = chosen_encoders(params, names)
    if cfg.get("autocast", "none") not in AUTOCAST:
        raise PipelineError(f"params `extract.autocast` is {cfg['autocast']!r}: choose one of {', '.join(AUTOCAST)}")
    todo = jobs(params, encoders)
    stale = [t for job in todo for t in job.targets if not is_done(t)]
    print(f"extract: {len(stale)} feature stores to compute "
          f"({', '.join(sorted({str(t.path.parent.name) for t in stale})) or 'none'}), "
          f"{sum(len(j.targets) for j in todo) - len(stale)} up to date")
    dim = clip_model.build_clip(clip_model.read_spec(PRETRAINED)).visual.output_dim
    kwargs = dict(dim=dim, batch_size=cfg["batch_size"], device=device, dtype=cfg["dtype"],
                  autocast=AUTOCAST[cfg.get("autocast", "none")],
                  fix_hint=lambda target: fix_hint(target.path.parent.name),
                  progress=lambda it, **kw: progress(it, **kw))
    if scheduler or workers:
        from pipeline.scaleout import dask_client, extract_distributed

        with dask_client(scheduler, workers) as client:
            paths = extract_distributed(todo, client, **kwargs)
    else:
        paths = extract(todo, **kwargs)
    if names is None:
        prune(params, encoders)
    print(f"{len(paths)} feature stores ready under {FEATURES}/ ({', '.join(encoders)})")
