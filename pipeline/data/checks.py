"""Checks of what a stage reads, each problem one `Finding` with where it is and its fix.

The GPU stages (`extract`, learned merges) run the quick ones first (`preflight`) and stop before
any work when one fails; `repsurgery doctor` (pipeline/doctor.py) runs them all, image decoding
and the encoders included. A *problem* stops a run; a *warning* is evidence worth a look that may
be on purpose (a split smaller than the published one) or that a sample cannot make certain.
"""
from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline import workspace
from pipeline.data import datasets
from pipeline.data.catalog import PAPER_TASKS, TEXT_TASKS
from pipeline.data.importing import missing_shards
from pipeline.errors import PipelineError

SHM_NEEDED = 512e6   # bytes of /dev/shm below which dataloader workers risk a bus error mid-run


@dataclass(frozen=True)
class Finding:
    check: str
    message: str       # what is wrong, and where
    fix: str
    warning: bool = False

    def line(self) -> str:
        return f"{'WARNING' if self.warning else 'PROBLEM'} [{self.check}] {self.message}" + (f": {self.fix}"
                                                                                            if self.fix else "")


REIMPORT = "re-fetch or re-import it (`repsurgery fetch`, then `dvc repro -f data`)"


def _expected_rows(params, task: str) -> int | None:
    if params.is_world:
        return params.world.n_test
    if params.is_text:
        return TEXT_TASKS[task].test_rows if task in TEXT_TASKS else None
    return PAPER_TASKS[task].test_images if task in PAPER_TASKS else None


def check_data(params, *, decode: bool, progress: Callable = lambda it, **kw: it) -> Iterator[Finding]:
    """Each task's test split: its files complete and readable, labels within its class count,
    as many images as the published split, and (`decode`) every image decodable."""
    for task in params.tasks:
        try:
            info = datasets.task_info(workspace.DATA, task)
            files = datasets.shards(workspace.DATA, task, workspace.SPLIT)
        except PipelineError as exc:
            yield Finding("data", str(exc).rstrip("."), "run `repsurgery prepare-data` (or `dvc repro data`)")
            continue
        gaps = missing_shards(files)
        if gaps:
            yield Finding("data", f"{task}: shard(s) {', '.join(gaps)} missing beside {files[0].parent}", REIMPORT)
        rows = 0
        for shard in files:
            try:
                labels = pq.read_table(shard, columns=["label"])["label"].to_numpy()
            except Exception as exc:  # pyarrow raises several types for a damaged file
                yield Finding("data", f"{task}: {shard} cannot be read ({exc})", REIMPORT)
                continue
            rows += len(labels)
            n = len(info.classnames)
            if len(labels) and (labels.min() < 0 or labels.max() >= n):
                yield Finding("data", f"{task}: labels in {shard.name} span {labels.min()}..{labels.max()}, but the "
                                      f"task has {n} class names", "point the task at the right dataset, or give its "
                                                                   "class names (params `source.classnames`)")
        expected = _expected_rows(params, task)
        if expected is not None and rows != expected and not gaps:  # a subset may be on purpose: a warning
            yield Finding("data", f"{task}: {rows} test images where the published split has {expected}",
                          REIMPORT + " (unless you chose a subset)", warning=True)
        if decode and "image" in pq.read_schema(files[0]).names:
            yield from _decode_all(task, progress)


def _decode_all(task: str, progress: Callable) -> Iterator[Finding]:
    data = datasets.ImageDataset(workspace.DATA, task, workspace.SPLIT)
    broken = []
    for i in progress(range(len(data)), desc=f"decode {task}", unit="img", leave=False):
        try:
            Image.open(io.BytesIO(data.images[i])).load()
        except Exception:
            broken.append(i)
    if broken:
        shard, row, name = data.origin[broken[0]]
        yield Finding("data", f"{task}: {len(broken)} image(s) do not decode, the first at row {row} of {shard}"
                              + (f" ({name})" if name else ""), REIMPORT + ", or remove the broken images")


def check_heads(params) -> Iterator[Finding]:
    """One head per task, with one row per class name and the encoder's feature width."""
    from pipeline.models import encoders
    from pipeline.models.checkpoints import load_state

    fix = "run `repsurgery heads` (or `dvc repro heads`)"
    try:
        heads = load_state(workspace.HEADS)
        width = encoders.feature_dim(workspace.PRETRAINED)
    except PipelineError as exc:
        yield Finding("heads", str(exc).rstrip("."), fix)
        return
    for task in params.tasks:
        try:
            classes = len(datasets.task_info(workspace.DATA, task).classnames)
        except PipelineError:
            continue  # check_data says so
        if task not in heads:
            yield Finding("heads", f"{workspace.HEADS} has no head for {task}", fix)
        elif tuple(heads[task].shape) != (classes, width):
            yield Finding("heads", f"{task}: head of shape {tuple(heads[task].shape)}, expected ({classes} classes, "
                                   f"{width})", fix)


def largest_split(params) -> int:
    """Images in the params' largest test split (0 before the data stage), from the shards'
    metadata: what sets the loader's decode workers."""
    return max((sum(pq.ParquetFile(f).metadata.num_rows for f in datasets.shards(workspace.DATA, t, workspace.SPLIT))
                for t in params.tasks if datasets.has_split(workspace.DATA, t, workspace.SPLIT)), default=0)


def check_runtime(params, device: torch.device) -> Iterator[Finding]:
    """Dataloader workers start, and have the shared memory they pass batches through."""
    workers = datasets.loader_workers(largest_split(params))
    if not workers:
        return
    shm = Path("/dev/shm")
    if shm.exists() and shutil.disk_usage(shm).free < SHM_NEEDED:
        yield Finding("runtime", f"{workers} dataloader workers pass batches through /dev/shm, which has "
                                 f"{shutil.disk_usage(shm).free / 1e6:.0f} MB free (they fail mid-run with a bus error)",
                      "give the container more shared memory (`docker run --shm-size=2g`), or free /dev/shm")
    try:  # batches of preprocessed-image size, without reading a split
        next(iter(datasets.loader([torch.zeros(3, 224, 224)] * (2 * workers), 2, workers=workers)))
    except Exception as exc:  # whatever a worker dies of
        yield Finding("runtime", f"{workers} dataloader workers cannot start ({type(exc).__name__}: {exc})",
                      "fix the environment it names (shared memory, process limits)")


def runtime_summary(params, device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    rows = largest_split(params)
    return (f"device {device} ({name}), torch threads {torch.get_num_threads()}, "
            f"dataloader workers {datasets.loader_workers(rows)} for the largest split ({rows} images)")


def preflight(params, device: torch.device, extra: Iterable[Finding] = ()) -> None:
    """The quick checks, at the start of a GPU stage: every problem at once, before any work."""
    findings = [*check_data(params, decode=False), *check_heads(params), *check_runtime(params, device), *extra]
    problems = [f.line() for f in findings if not f.warning]
    if problems:
        raise PipelineError(f"{len(problems)} problem(s) found before starting (`repsurgery doctor` checks "
                            "everything):\n  " + "\n  ".join(problems))
