"""Generated photos for the real-size benchmarks: JPEGs that cost what a photo costs to
decode, packed as a task's splits as real datasets are (the image-folder import, or Hugging
Face parquet shards repeating a pool of distinct JPEGs: decoding costs the same)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.data.importing import IMAGE_TYPE, ROWS_PER_SHARD, import_splits
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


def pool(n: int, size: tuple[int, int] = PHOTO_SIZE, seed: int = 0) -> list[bytes]:
    """`n` distinct generated JPEGs."""
    rng = np.random.default_rng(seed)
    return [photo(rng, size) for _ in range(n)]


def write_split(folder: Path, split: str, rows: int, classes: int, jpegs: list[bytes]) -> None:
    """`rows` images of `jpegs` (in turn) as Hugging Face parquet shards under `folder`/data,
    labels in turn."""
    shards = -(-rows // ROWS_PER_SHARD)
    for index in range(shards):
        part = range(index * ROWS_PER_SHARD, min(rows, (index + 1) * ROWS_PER_SHARD))
        images = [{"bytes": jpegs[i % len(jpegs)], "path": f"{i:06d}.jpg"} for i in part]
        table = pa.table({"image": pa.array(images, type=IMAGE_TYPE),
                          "label": pa.array([i % classes for i in part], type=pa.int64())})
        path = folder / "data" / f"{split}-{index:05d}-of-{shards:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
