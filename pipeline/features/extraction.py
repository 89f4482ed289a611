"""Feature extraction into feature stores.

Decode once: a `Job` is one dataset and every encoder that needs it (pretrained, the task's
individual encoder, each merged encoder); each batch of images is decoded and preprocessed
once and fed to all of them. A killed run resumes where it stopped, and stores that already
hold the features of the same encoder and images are kept as they are, so re-running after
one merge method changed recomputes only that method's stores.

Encoders and datasets travel as `Ref`s (a key and a picklable recipe), so the same jobs run
in this process or on Dask workers (pipeline/scaleout.py), each process building a given
encoder once.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cache import CODE_VERSION, StoreError, StoreWriter, open_store, open_writer
from pipeline.data.datasets import loader
from pipeline.data.preprocess import Preprocess

# Bump when the way features are computed changes (preprocessing, the encoder call): stores
# made by older code are then recomputed rather than trusted.
EXTRACTION_VERSION = "2"


@dataclass(frozen=True)
class Ref:
    """Something a process builds once and keeps: an encoder or a dataset, named by a fingerprint."""
    key: str
    build: Callable[[], Any]


@dataclass
class Target:
    """One encoder and the store its features of the job's dataset go to."""
    encoder: Ref
    path: Path
    attrs: dict


@dataclass
class Job:
    """One dataset (in row order) and every encoder that goes over it."""
    dataset: Ref
    n_rows: int
    targets: list[Target]
    name: str = ""
    # the device half of the dataset's transform (its items are then uint8 images or bytes)
    preprocess: Preprocess | None = None

    def collate(self, items: list) -> Any:
        return self.preprocess.collate(items) if self.preprocess else torch.utils.data.default_collate(items)

    def on_device(self, batch: Any, device: torch.device) -> torch.Tensor:
        """A batch of the loader as the encoders take it, on `device`."""
        return self.preprocess.finish(batch, device) if self.preprocess else batch.to(device, non_blocking=True)


@dataclass
class Timings:
    """Seconds spent per phase of an extraction (for the benchmark's split)."""
    decode: float = 0.0   # reading, decoding and preprocessing images
    forward: float = 0.0  # the encoders, including the copy of the features back to the host
    write: float = 0.0    # compressing and writing chunks, recording progress, finalising
    extra: dict = field(default_factory=dict)

    def total(self) -> float:
        return self.decode + self.forward + self.write


# Encoders and datasets built in this process, most recently used last. Bounded so that a
# long run over many tasks' individual encoders does not keep them all alive, yet holding a
# whole job's (`reserve`): a job uses all of its encoders at once anyway, and the next task's
# job needs all but its individual one again (the paper preset's 18 encoders per job used to
# be rebuilt for every task: 17 s per job for ViT-B/32 on a CPU).
_BUILT: OrderedDict[str, Any] = OrderedDict()
MAX_BUILT = 16
_capacity = MAX_BUILT


def reserve(jobs: list["Job"]) -> None:
    """Keep room for the largest job's encoders, its dataset and the previous task's leftovers."""
    global _capacity
    _capacity = max([MAX_BUILT, *(len(job.targets) + 2 for job in jobs)])


def obtain(ref: Ref) -> Any:
    """The object `ref` names, built on first use in this process and kept for later calls."""
    if ref.key in _BUILT:
        _BUILT.move_to_end(ref.key)
        return _BUILT[ref.key]
    value = ref.build()
    _BUILT[ref.key] = value
    while len(_BUILT) > _capacity:
        _BUILT.popitem(last=False)
    return value


def forget_built() -> None:
    _BUILT.clear()


def encoder_on(ref: Ref, device: torch.device) -> torch.nn.Module:
    return obtain(ref).to(device).eval()


@torch.no_grad()
def encode(encoder: torch.nn.Module, images: torch.Tensor, autocast: torch.dtype | None) -> np.ndarray:
    """One encoder on one preprocessed batch, as float32 on the host."""
    with torch.autocast(images.device.type, dtype=autocast, enabled=autocast is not None):
        return encoder(images).float().cpu().numpy()


def identity(target: Target, dtype: str) -> dict:
    """Everything a store's features depend on: encoder and dataset fingerprints, preprocessing,
    task and split (the target's attrs), the stored dtype, autocast and the code versions."""
    return {**target.attrs, "dtype": dtype, "code_version": CODE_VERSION}


def is_done(target: Target, dtype: str) -> bool:
    """A finished store of the same encoder, images and precision exists: nothing to recompute."""
    try:
        open_store(target.path, expect=identity(target, dtype))
        return True
    except StoreError:
        return False


def open_writers(job: Job, *, dim: int, batch_size: int, dtype: str, fix_hint: Callable[[Target], str]
                 ) -> list[tuple[Target, StoreWriter]]:
    """Writers (new or resumed `.partial` stores) for the job's targets that are not done yet."""
    return [(t, open_writer(t.path, n_rows=job.n_rows, dim=dim, dtype=dtype, chunk_rows=batch_size,
                            attrs=t.attrs, fix_hint=fix_hint(t)))
            for t in job.targets if not is_done(t, dtype)]


def extract(jobs: list[Job], *, dim: int, batch_size: int, device: torch.device, dtype: str = "float32",
            autocast: torch.dtype | None = None, fix_hint: Callable[[Target], str] = lambda t: "",
            progress: Callable = lambda it, **kw: it, timings: Timings | None = None,
            workers: int | None = None) -> list[Path]:
    """Run every job in this process; returns the paths of all targets' stores. `workers`: the
    decoding processes (default: the loader's choice for the split's size)."""
    timings = timings if timings is not None else Timings()
    reserve(jobs)
    for job in jobs:
        writers = open_writers(job, dim=dim, batch_size=batch_size, dtype=dtype, fix_hint=fix_hint)
        if writers:
            _run_job(job, writers, batch_size=batch_size, device=device, autocast=autocast,
                     progress=progress, timings=timings, workers=workers)
    return [t.path for job in jobs for t in job.targets]


def _run_job(job: Job, writers: list[tuple[Target, StoreWriter]], *, batch_size: int, device: torch.device,
             autocast: torch.dtype | None, progress: Callable, timings: Timings, workers: int | None = None) -> None:
    encoders = [encoder_on(t.encoder, device) for t, _ in writers]
    dataset = obtain(job.dataset)
    if len(dataset) != job.n_rows:
        raise ValueError(f"{job.name}: the dataset has {len(dataset)} rows, the job expected {job.n_rows}")
    first = min(w.rows_written for _, w in writers)  # always on a chunk boundary
    rows = torch.utils.data.Subset(dataset, range(first, job.n_rows))
    pin = device.type == "cuda" and not (job.preprocess and job.preprocess.decode == "device")
    batches = iter(loader(rows, batch_size, workers=workers, collate=job.collate, pin=pin))
    for _ in progress(range(-(-len(rows) // batch_size)), desc=f"extract {job.name}", unit="batch"):
        clock = time.perf_counter()
        images = job.on_device(next(batches), device)
        timings.decode += time.perf_counter() - clock
        for encoder, (_, writer) in zip(encoders, writers):
            if writer.rows_written != first:
                continue  # this store already holds these rows (resumed run)
            clock = time.perf_counter()
            features = encode(encoder, images, autocast)
            timings.forward += time.perf_counter() - clock
            clock = time.perf_counter()
            writer.write(first, features)
            timings.write += time.perf_counter() - clock
        first += len(images)
    clock = time.perf_counter()
    for _, writer in writers:
        writer.finalize()
    timings.write += time.perf_counter() - clock
