"""The extraction jobs of a workspace: per task, its images once, through every encoder
that needs them. Encoders and datasets travel as picklable `Ref`s, so the same jobs run in
this process or on Dask workers (which import `pipeline` and `cache` only)."""
from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline import routing, workspace
from pipeline.data import datasets
from pipeline.data.checks import Finding
from pipeline.data.preprocess import Preprocess
from pipeline.errors import PipelineError
from pipeline.features.extraction import EXTRACTION_VERSION, Job, Ref, Target, is_done
from pipeline.features.stores import checkpoint_fingerprint, fix_hint, router_identity
from pipeline.models import bert, clip, encoders as encoders_
from pipeline.models.checkpoints import load_state

AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ROUTER_JOB = "router images (train)"  # the job of the router's train images


def build_encoder(model_dir: str, weights: str | None) -> torch.nn.Module:
    """The encoder of the pretrained model in `model_dir` with `weights` (picklable: Dask workers call it)."""
    encoder = encoders_.encoder(Path(model_dir))
    if weights is not None:
        encoder.load_state_dict(load_state(Path(weights), like=encoder.state_dict()))
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder.eval()


def build_dataset(root: str, task: str, split: str, model_dir: str, decode: str | None = None
                  ) -> torch.utils.data.Dataset:
    """A task's split as the encoder takes it (picklable: Dask workers call it): images with the
    CLIP's validation transform, with a `decode`r its host half only (`Preprocess`: the job
    finishes the batches on the device); or texts as token ids."""
    model_dir = Path(model_dir)
    transform = None
    if decode is not None and not encoders_.is_text(model_dir):
        transform = Preprocess.of(clip.read_spec(model_dir), decode)
    return encoders_.dataset(Path(root), task, split, model_dir, transform)


def build_router_dataset(root: str, rows: dict[str, list[int]], model_dir: str, decode: str
                         ) -> torch.utils.data.Dataset:
    """The router's train images: those rows of each task's train split, task after task."""
    return torch.utils.data.ConcatDataset([
        torch.utils.data.Subset(build_dataset(root, task, "train", model_dir, decode), r) for task, r in rows.items()])


def encoder_ref(encoder: str, task: str) -> Ref:
    weights = workspace.checkpoint(encoder, task)
    if weights is not None and not weights.exists():
        raise PipelineError(f"checkpoint {weights} does not exist: it is needed for the {encoder} features. "
                            + ("Run `repsurgery prepare-finetuned`." if encoder == "individual" else
                               f"Run `repsurgery merge {encoder.removeprefix('merged/')}` first."))
    return Ref(f"encoder:{checkpoint_fingerprint(encoder, task)}",
               functools.partial(build_encoder, str(workspace.PRETRAINED.resolve()),
                                 None if weights is None else str(weights.resolve())))


def dataset_ref(task: str, fingerprint: str, decode: str) -> Ref:
    return Ref(f"data:{fingerprint}:{decode}", functools.partial(
        build_dataset, str(workspace.DATA.resolve()), task, workspace.SPLIT, str(workspace.PRETRAINED.resolve()), decode))


def computed_by(cfg) -> tuple[dict, Preprocess | None]:
    """How features are computed (params `extract`): the store attrs that record it
    (preprocessing, the decoder where it is not PIL, whose stores predate the choice, autocast,
    extraction code), and the jobs' preprocessing."""
    if encoders_.is_text(workspace.PRETRAINED):  # token ids: nothing to finish on the device
        return {**bert.identity(workspace.PRETRAINED), "autocast": cfg.autocast,
                "extraction_version": EXTRACTION_VERSION}, None
    spec = clip.read_spec(workspace.PRETRAINED)
    attrs = {"preprocess": spec.get("preprocess") or spec.get("arch"), "autocast": cfg.autocast,
             **({"decode": cfg.decode} if cfg.decode != "pil" else {}), "extraction_version": EXTRACTION_VERSION}
    return attrs, Preprocess.of(spec, cfg.decode)


def jobs(tasks: list[str], encoders: list[str], cfg) -> list[Job]:
    """One job per task: the task's images once, through every named encoder (the individual
    encoder of a task is that task's own fine-tuned one); `cfg`: params `extract`."""
    computed, preprocess = computed_by(cfg)
    out = []
    for task in tasks:
        data_fp = datasets.dataset_fingerprint(workspace.DATA, task, workspace.SPLIT)
        attrs = {"task": task, "split": workspace.SPLIT, "dataset_fingerprint": data_fp, **computed}
        targets = [Target(encoder_ref(name, task), workspace.store(name, task),
                          {"encoder_fingerprint": checkpoint_fingerprint(name, task), **attrs})
                   for name in encoders]
        out.append(Job(dataset_ref(task, data_fp, cfg.decode),
                       n_rows=len(datasets.labels(workspace.DATA, task, workspace.SPLIT)), targets=targets,
                       name=task, preprocess=preprocess))
    return out


def router_jobs(params, encoders: list[str]) -> list[Job]:
    """The train images the task router is fitted on (params `router.split: train`):
    `router.images` seeded rows of each task's train split, through every chosen merge entry's
    encoder, into one store per entry."""
    cfg, merged = params.router, [e for e in encoders if e.startswith("merged/")]
    if cfg.split != "train" or not merged:
        return []
    missing = [t for t in params.tasks if not datasets.has_split(workspace.DATA, t, "train")]
    if missing:
        raise PipelineError(f"{', '.join(missing)}: no train split under {workspace.DATA}/ for the router to be fitted "
                            "on (params `router.split: train`): import it (`source.splits`), or set "
                            "`router.split: test`")
    rows = {t: routing.train_rows(len(datasets.labels(workspace.DATA, t, "train")), cfg.images, cfg.seed + i)
            for i, t in enumerate(params.tasks)}
    fingerprint = "-".join(datasets.dataset_fingerprint(workspace.DATA, t, "train") for t in params.tasks)
    ext = params.extract
    computed, preprocess = computed_by(ext)
    attrs = {**router_identity(cfg, params.tasks), "rows_per_task": [len(r) for r in rows.values()],
             "dataset_fingerprint": fingerprint, **computed}
    dataset = Ref(f"router:{fingerprint}:{cfg.images}:{cfg.seed}:{ext.decode}",
                  functools.partial(build_router_dataset, str(workspace.DATA.resolve()), rows,
                                    str(workspace.PRETRAINED.resolve()), ext.decode))
    first = params.tasks[0]  # a merged encoder is the same on every task
    targets = [Target(encoder_ref(name, first), workspace.router_store(name),
                      {"encoder_fingerprint": checkpoint_fingerprint(name, first), **attrs}) for name in merged]
    return [Job(dataset, n_rows=sum(map(len, rows.values())), targets=targets, name=ROUTER_JOB,
                preprocess=preprocess)]


def feature_dim() -> int:
    return encoders_.feature_dim(workspace.PRETRAINED)


def hint(target: Target) -> str:
    return fix_hint(str(target.path.parent.relative_to(workspace.FEATURES)))


def encoders(params, names: list[str] | None) -> list[str]:
    """The encoders to extract: the named ones (merge entries by their key), or all of them."""
    every = [*workspace.REFERENCE_ENCODERS, *map(workspace.merged_encoder, params.methods)]
    if not names:
        return every
    chosen = []
    for name in names:
        encoder = workspace.merged_encoder(name) if name in params.merge else name
        if encoder not in every:
            raise PipelineError(f"unknown encoder {name!r} to extract: choose among "
                                f"{', '.join(workspace.REFERENCE_ENCODERS)} or a merge entry "
                                f"({', '.join(params.methods)})")
        chosen.append(encoder)
    return chosen


def check_disk(params) -> Iterator[Finding]:
    """Room for the feature stores still to compute (params `extract.dtype`)."""
    cfg = params.extract
    try:
        every = encoders(params, None)
        todo = [(job.n_rows, t) for job in [*jobs(params.tasks, every, cfg), *router_jobs(params, every)]
                for t in job.targets if not is_done(t, cfg.dtype)]
        width = feature_dim()
    except PipelineError as exc:
        yield Finding("disk", str(exc).rstrip("."), "run the stage it names (or `dvc repro`)")
        return
    need = sum(rows for rows, _ in todo) * width * np.dtype(cfg.dtype).itemsize
    folder = next(p for p in (workspace.FEATURES.resolve(), *workspace.FEATURES.resolve().parents) if p.exists())
    free = shutil.disk_usage(folder).free
    if need > 0.95 * free:
        yield Finding("disk", f"{len(todo)} feature stores need about {need / 1e9:.2f} GB, {folder} has "
                              f"{free / 1e9:.2f} GB free", "free space there"
                      + (", or set `extract.dtype: float16` (half the size)" if cfg.dtype == "float32" else ""))
