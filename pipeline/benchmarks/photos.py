"""Generated photos for the real-size benchmarks: JPEGs that cost what a photo costs to
decode, packed as a task's test split by the project's own image-folder import."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.importing import import_splits
from pipeline.workspace import SPLIT

PHOTO_SIZE = (500, 375)  # a common size of the photos in ImageNet-like datasets
TASK = "photos"


def photo(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """A JPEG that costs about what a photo costs to decode: smooth colour fields with
    sensor-like noise at quality 90 (a pure-noise JPEG would be several times larger)."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    field = np.asarray(coarse.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
    pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_photos(root: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    """`n` generated JPEGs as the test split of one task, packed by the project's image-folder
    import (as a real dataset would be); returns the data root."""
    folder = root / "jpeg" / SPLIT / "photo"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        (folder / f"{i:06d}.jpg").write_bytes(photo(rng, size))
    import_splits(root / "jpeg", [SPLIT], root / "data" / TASK, TASK, ["photo"], ["a photo of a {}."],
                  origin="generated")
    return root / "data"
