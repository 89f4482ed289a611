"""Feature extraction into feature stores: every encoder that needs an image sees the same
decoded, preprocessed batch (decode once), and a killed run resumes where it stopped."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from cache import StoreError, open_store, open_writer
from pipeline.data import loader


@dataclass
class Target:
    """One encoder and the store its features of this dataset go to."""
    encoder: torch.nn.Module
    path: Path
    attrs: dict


def _already_done(target: Target) -> bool:
    try:
        open_store(target.path, expect=target.attrs)
        return True
    except StoreError:
        return False


@torch.no_grad()
def extract(targets: list[Target], dataset: torch.utils.data.Dataset, *, batch_size: int, device: torch.device,
            dtype: str = "float32", autocast: torch.dtype | None = None, fix_hint: str = "",
            progress: Callable = lambda it, **kw: it) -> list[Path]:
    """Run each target encoder over `dataset` (in order) and write its store.

    Stores that already exist with the same fingerprints are kept as they are.
    """
    todo = [t for t in targets if not _already_done(t)]
    if not todo:
        return [t.path for t in targets]
    writers = []
    for t in todo:
        t.encoder.to(device).eval()
        writers.append(open_writer(t.path, n_rows=len(dataset), dim=t.encoder.output_dim, dtype=dtype,
                                   chunk_rows=batch_size, attrs=t.attrs, fix_hint=fix_hint))
    start = min(w.rows_written for w in writers)
    rows = torch.utils.data.Subset(dataset, range(start, len(dataset)))
    first = start
    for images in progress(loader(rows, batch_size), total=-(-len(rows) // batch_size)):
        images = images.to(device, non_blocking=True)
        for target, writer in zip(todo, writers):
            if writer.rows_written != first:
                continue  # this store already holds these rows (resumed run)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                features = target.encoder(images)
            writer.write(first, features.float().cpu().numpy())
        first += len(images)
    for w in writers:
        w.finalize()
    return [t.path for t in targets]
