"""Classification splits stored as Hugging Face publishes them.

A task folder holds `task.json` (class names, templates) and `data/<split>-*.parquet` shards
with columns `image` = {bytes, path} (images) or `text` (texts), and `label`. Images are
decoded with PIL, in dataset order, and a decode failure names the shard and row; texts are
tokenized once, whole.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from cache.files import sha256_file
from pipeline.errors import PipelineError


@dataclass(frozen=True)
class TaskInfo:
    name: str
    classnames: list[str]
    templates: list[str]


def task_dir(root: Path, task: str) -> Path:
    return Path(root) / task


def task_info(root: Path, task: str) -> TaskInfo:
    path = task_dir(root, task) / "task.json"
    if not path.exists():
        raise PipelineError(f"task {task!r}: no {path}. Is the task name right, and has the data stage run?")
    meta = json.loads(path.read_text())
    return TaskInfo(task, list(meta["classnames"]), list(meta["templates"]))


def has_split(root: Path, task: str, split: str) -> bool:
    """Whether the task folder holds shards of `split` (`shards` raises where it does not)."""
    return any((task_dir(root, task) / "data").glob(f"{split}-*.parquet"))


def shards(root: Path, task: str, split: str) -> list[Path]:
    files = sorted((task_dir(root, task) / "data").glob(f"{split}-*.parquet"))
    if not files:
        raise PipelineError(f"task {task!r}: no {split} shards under {task_dir(root, task) / 'data'}")
    empty = [f.name for f in files if pq.ParquetFile(f).metadata.num_rows == 0]
    if empty:
        raise PipelineError(f"task {task!r}: {split} shard(s) {', '.join(empty)} under {task_dir(root, task) / 'data'} "
                            "hold no images: remove them, or import the data again (`dvc repro -f data`)")
    return files


def labels(root: Path, task: str, split: str) -> np.ndarray:
    return np.concatenate([pq.read_table(f, columns=["label"])["label"].to_numpy() for f in shards(root, task, split)])


def dataset_fingerprint(root: Path, task: str, split: str) -> str:
    """Hash of the shards' bytes: a feature store records which images it holds. Hashed once
    per process while the shards' names, sizes and modification times stay the same (extract
    plans its jobs twice: the disk check, then the run)."""
    return _hashed(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in shards(root, task, split)))


@functools.lru_cache(maxsize=None)
def _hashed(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in files:
        digest.update(Path(name).name.encode())
        sha256_file(Path(name), digest)
    return digest.hexdigest()[:16]


class ImageDataset(torch.utils.data.Dataset):
    """A split's compressed image bytes held in memory, decoded and preprocessed on access.

    Compressed bytes are small (the real test splits total a few GB), so random access for
    shuffled training and AdaMerging needs no index files; decoding happens per item, in
    DataLoader workers where there are cores for them.
    """

    def __init__(self, root: Path, task: str, split: str, transform: Callable | None = None):
        self.images, self.origin, self.labels = [], [], []
        for shard in shards(root, task, split):
            table = pq.read_table(shard, columns=["image", "label"])
            column = table.column("image").combine_chunks()
            self.images += column.field("bytes").to_pylist()
            names = column.field("path").to_pylist() if column.type.get_field_index("path") >= 0 else []
            self.origin += [(shard, row, names[row] if names else None) for row in range(table.num_rows)]
            self.labels.append(table.column("label").to_numpy())
        self.labels = np.concatenate(self.labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def decode(self, index: int) -> Image.Image:
        try:
            return Image.open(io.BytesIO(self.images[index])).convert("RGB")
        except Exception as exc:
            raise self._broken(index, exc) from exc

    def _broken(self, index: int, exc: Exception) -> PipelineError:
        shard, row, name = self.origin[index]
        named = f" ({name})" if name else ""
        return PipelineError(f"cannot decode image{named} at row {row} of {shard}: {exc}. "
                             "Re-fetch or re-import this dataset, or remove the broken image from its source")

    def __getitem__(self, index: int) -> torch.Tensor:
        if getattr(self.transform, "reads_bytes", False):  # pipeline.data.preprocess: decodes itself
            try:
                return self.transform(self.images[index])
            except Exception as exc:
                raise self._broken(index, exc) from exc
        image = self.decode(index)
        return self.transform(image) if self.transform else image


class TextDataset(torch.utils.data.Dataset):
    """A split's texts as token ids (`tokenize`: texts -> (N, length) ids), tokenized once: a
    test split of the paper's text tasks is a few MB of ids."""

    def __init__(self, root: Path, task: str, split: str, tokenize: Callable[[list[str]], torch.Tensor]):
        tables = [pq.read_table(shard, columns=["text", "label"]) for shard in shards(root, task, split)]
        self.labels = np.concatenate([t.column("label").to_numpy() for t in tables])
        self.ids = tokenize([text for t in tables for text in t.column("text").to_pylist()])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.ids[index]


class Remembered(torch.utils.data.Dataset):
    """A dataset whose items are kept after their first decode, for the endless shuffled batches
    of a learned merge (100 steps of AdaMerging decode every world test image three times)."""

    BUDGET = 256 * 2**20  # bytes of preprocessed images worth keeping; larger splits are decoded again

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset, self.items = dataset, {}

    @classmethod
    def fits(cls, dataset: torch.utils.data.Dataset) -> bool:
        """Small enough to keep, and read in this process (no loader workers, which would keep copies)."""
        rows = len(dataset)
        return loader_workers(rows) == 0 and rows * dataset[0].numel() * 4 <= cls.BUDGET

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        if index not in self.items:
            self.items[index] = self.dataset[index]
        return self.items[index]


def cores() -> int:
    """The cores this process may run on (its affinity: a container's or a job scheduler's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loader_workers(rows: int) -> int:
    """Decoding worker processes for a split of `rows` images: none for small splits (starting
    them costs more than they save), else one per core but the main process's, which feeds the
    encoders (on a GPU, decoding is what extraction waits for)."""
    return max(0, cores() - 1) if rows > 4096 else 0


def loader(dataset: torch.utils.data.Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0,
           workers: int | None = None, collate: Callable | None = None, pin: bool = False
           ) -> torch.utils.data.DataLoader:
    """Batches in dataset order (or seeded shuffled order), decoded by worker processes; `pin`:
    in page-locked memory, for asynchronous copies to a GPU."""
    if workers is None:
        workers = loader_workers(len(dataset))
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                       num_workers=workers, collate_fn=collate, pin_memory=pin)
