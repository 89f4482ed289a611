"""Bringing a real dataset's splits into the project's layout: `<task>/task.json` plus
`<task>/data/<split>-*.parquet` with columns `image` = {bytes, path} (or `text`) and `label`.

Text datasets (Hugging Face parquet) are rewritten shard by shard into `text` (the dataset's
text columns joined by a space) and `label`.

Two sources: Hugging Face parquet shards (linked, not rewritten, so their bytes and hence
the dataset fingerprint stay those of the published files) and image folders with one
folder per class (the Task Arithmetic layout), packed into shards of the original bytes.
Class folders map to labels in sorted order, as torchvision's ImageFolder does.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Sequence

import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pyarrow.parquet as pq

from cache.files import atomic_path
from pipeline.errors import PipelineError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
ROWS_PER_SHARD = 4096


def parquet_shards(src: Path, split: str) -> list[Path]:
    return sorted(p for p in Path(src).rglob(f"{split}-*.parquet") if ".cache" not in p.parts)


def missing_shards(shards: list[Path]) -> list[str]:
    """The shards a Hugging Face split names but lacks (`test-00001-of-00003.parquet`: three
    shards): a missing one would otherwise just make the split smaller, silently."""
    numbered = [m for s in shards if (m := re.fullmatch(r"(.+)-(\d+)-of-(\d+)\.parquet", s.name))]
    missing = []
    for prefix, total in sorted({(m.group(1), int(m.group(3))) for m in numbered}):
        present = {int(m.group(2)) for m in numbered if m.group(1) == prefix and int(m.group(3)) == total}
        width = len(next(m.group(2) for m in numbered if m.group(1) == prefix))
        missing += [f"{prefix}-{i:0{width}d}-of-{total:0{width}d}.parquet" for i in range(total) if i not in present]
    return missing


def looks_like_image_folder(src: Path) -> bool:
    return any(p.is_dir() for p in Path(src).iterdir()) if Path(src).is_dir() else False


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)  # no second copy of a multi-GB split when on the same filesystem
        except OSError:
            shutil.copyfile(src, tmp)


def _check_shard(shard: Path, n_classes: int) -> int:
    schema = pq.read_schema(shard)
    if "image" not in schema.names or "label" not in schema.names:
        raise PipelineError(f"{shard}: expected columns `image` and `label`, found {schema.names}")
    image = schema.field("image").type
    if not (pa.types.is_struct(image) and image.get_field_index("bytes") >= 0):
        raise PipelineError(f"{shard}: column `image` must be a struct with `bytes` (Hugging Face Image), got {image}")
    return _check_labels(shard, pq.read_table(shard, columns=["label"])["label"].to_numpy(), n_classes)


def _check_labels(shard: Path, labels, n_classes: int) -> int:
    """A shard's labels: some, each within the task's class count; returns how many."""
    if not len(labels):
        raise PipelineError(f"{shard} holds no rows (a download cut short, or the wrong file?): replace it; "
                            "nothing was imported")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise PipelineError(f"{shard}: labels span {labels.min()}..{labels.max()}, but the task has {n_classes} "
                            "class names: wrong dataset, label column or class names for this task?")
    return len(labels)


def complete_shards(src: Path, split: str) -> list[Path]:
    """A split's parquet shards, every one their names promise (else one line naming the fix)."""
    shards = parquet_shards(src, split)
    if not shards:
        raise PipelineError(f"no `{split}-*.parquet` shards under {src}")
    gaps = missing_shards(shards)
    if gaps:
        raise PipelineError(f"{src}: the {split} split is incomplete, {', '.join(gaps)} missing (a download cut "
                            "short?): run `repsurgery fetch` again, or copy the missing shards there")
    return shards


def import_parquet(src: Path, split: str, out: Path, n_classes: int) -> int:
    shards = complete_shards(src, split)
    rows = sum(_check_shard(s, n_classes) for s in shards)
    for shard in shards:
        _link_or_copy(shard, out / "data" / shard.name)
    return rows


def import_text_parquet(src: Path, split: str, out: Path, columns: tuple[str, ...], label: str,
                        n_classes: int) -> int:
    """A text dataset's split, each shard rewritten with its text columns joined into `text`."""
    rows = 0
    for shard in complete_shards(src, split):
        names = pq.read_schema(shard).names
        lacking = [c for c in (*columns, label) if c not in names]
        if lacking:
            raise PipelineError(f"{shard}: expected text column(s) {', '.join(columns)} and label column {label}, "
                                f"lacks {', '.join(lacking)} (found {', '.join(names)})")
        table = pq.read_table(shard, columns=[*columns, label])
        parts = [pa.compute.fill_null(table.column(c).cast(pa.string()), "") for c in columns]
        text = parts[0] if len(parts) == 1 else pa.compute.binary_join_element_wise(*parts, " ")
        labels = table.column(label).cast(pa.int64())
        rows += _check_labels(shard, labels.to_numpy(), n_classes)
        path = out / "data" / shard.name
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            pq.write_table(pa.table({"text": text, "label": labels}), tmp)
    return rows


def image_folder_split(src: Path, split: str, only: bool = True) -> Path:
    """`src/<split>/<class>/...` when that folder exists, else `src/<class>/...` where `split` is
    the only split imported (a second split never reads the first one's images)."""
    if (Path(src) / split).is_dir():
        return Path(src) / split
    if not only:
        raise PipelineError(f"{src} has no `{split}` folder (one sub-folder per class) and no `{split}-*.parquet` "
                            f"shards, while several splits are imported: put the {split} images in {Path(src) / split}")
    return Path(src)


def import_image_folder(src: Path, split: str, out: Path, classnames: list[str],
                        progress: Callable = lambda it, **kw: it, only: bool = True) -> int:
    root = image_folder_split(src, split, only)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) != len(classnames):
        raise PipelineError(f"{root} has {len(classes)} class folders but the task has {len(classnames)} class "
                            f"names: point at the folder that holds one sub-folder per class (e.g. .../{split})")
    files = [(f, label) for label, name in enumerate(classes)
             for f in sorted((root / name).rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise PipelineError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    n_shards = -(-len(files) // ROWS_PER_SHARD)
    for index in progress(range(n_shards), desc=f"pack {root.name}", unit="shard"):
        part = files[index * ROWS_PER_SHARD:(index + 1) * ROWS_PER_SHARD]
        images = [{"bytes": f.read_bytes(), "path": str(f.relative_to(root))} for f, _ in part]
        table = pa.table({"image": pa.array(images, type=IMAGE_TYPE),
                          "label": pa.array([label for _, label in part], type=pa.int64())})
        path = out / "data" / f"{split}-{index:05d}-of-{n_shards:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
    return len(files)


def import_splits(src: Path, splits: Sequence[str], out: Path, task: str, classnames: list[str],
                  templates: list[str], origin: str, progress: Callable = lambda it, **kw: it,
                  text: tuple[tuple[str, ...], str] | None = None) -> dict[str, int]:
    """Import the `splits` of `task` from `src` (parquet shards or image folders) into `out`;
    returns the rows of each. `text`: a text dataset's (text columns, label column).

    Built under a temporary name and swapped in only when every split is complete: a failed
    import keeps the previous `out` and leaves nothing that looks like a task.
    """
    src = Path(src).expanduser()
    if not src.exists():
        raise PipelineError(f"task {task!r}: dataset folder {src} does not exist")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    rows, kinds = {}, set()
    try:
        for split in splits:
            if text is not None:
                rows[split] = import_text_parquet(src, split, tmp, *text, len(classnames))
                kinds.add("text-parquet")
            elif parquet_shards(src, split):
                rows[split] = import_parquet(src, split, tmp, len(classnames))
                kinds.add("parquet")
            elif looks_like_image_folder(src):
                rows[split] = import_image_folder(src, split, tmp, classnames, progress, only=len(splits) == 1)
                kinds.add("imagefolder")
            else:
                raise PipelineError(f"task {task!r}: {src} holds neither `{split}-*.parquet` shards nor one folder "
                                    "per class")
        meta = {"name": task, "classnames": classnames, "templates": templates, "source": origin,
                "format": "+".join(sorted(kinds)), **{f"n_{split}": n for split, n in rows.items()}}
        (tmp / "task.json").write_text(json.dumps(meta, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return rows
