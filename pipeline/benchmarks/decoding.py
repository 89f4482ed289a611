"""`repsurgery bench-decode`: how decoding scales with loader workers, per decoder.

On a GPU, extraction waits for decoding (docs/benchmark.md), so what matters is images/s of
the extract stage's own loader against the number of workers: the generated photos of
`realsize` through `ImageDataset`, the host half of the transform in the workers and its
device half on the device, as extraction runs them. Two things that are not decoding are kept
out of the steady rate: starting the workers (timed apart, as `startup_s`: until the first
batch), and a run too short to keep every worker busy (each run holds at least
`MIN_BATCHES_PER_WORKER` batches per worker, or says it does not).
"""
from __future__ import annotations

import io
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline.benchmarks.photos import PHOTO_SIZE, TASK, pool, write_split
from pipeline.benchmarks.measure import sync
from pipeline.data import datasets
from pipeline.data.importing import IMAGE_TYPE
from pipeline.data.preprocess import Preprocess
from pipeline.workspace import SPLIT

MIN_BATCHES_PER_WORKER = 4
DISTINCT = 256  # distinct JPEGs; larger runs repeat their bytes
QUICK = {"images": 64, "batch_size": 8, "repeats": 1, "workers": [0, 1]}


def default_workers() -> list[int]:
    """1, 2, 4, ... up to the cores, and one per core but the main process's (the stage's choice)."""
    cores = datasets.cores()
    counts = {1 << i for i in range(cores.bit_length()) if 1 << i <= cores}
    return sorted(counts | {max(1, cores - 1)})


def decoders(device: torch.device) -> list[str]:
    """The decoders worth timing here: `device` only where it is a GPU (on a CPU it is torchvision's
    decode run in the main process)."""
    return ["pil", "torchvision", *(["device"] if device.type == "cuda" else [])]


def loader_run(dataset, preprocess: Preprocess, *, batch_size: int, workers: int, device: torch.device) -> dict:
    """One pass of the loader over `dataset`, each batch finished on `device`. The steady rate
    counts from the first round on (one batch from each worker: their start and the pipeline's
    filling), so several workers are not credited with work they did before the clock started."""
    clock = time.perf_counter()
    arrivals, rows = [], []
    for batch in datasets.loader(dataset, batch_size, workers=workers, collate=preprocess.collate,
                                 pin=device.type == "cuda" and preprocess.decode != "device"):
        rows.append(len(preprocess.finish(batch, device)))
        sync(device)
        arrivals.append(time.perf_counter() - clock)
    round_ = min(max(1, workers), len(arrivals) - 1)  # batches of the first round
    steady = arrivals[-1] - arrivals[round_ - 1]
    return {"startup_s": round(arrivals[0], 4), "total_s": round(arrivals[-1], 4),
            "images_per_s": round(sum(rows[round_:]) / steady, 2) if steady > 0 else float("nan"),
            "with_startup_images_per_s": round(sum(rows) / arrivals[-1], 2)}


def agreement(dataset_of: Callable[[Preprocess], torch.utils.data.Dataset], spec: dict, decode: str,
              device: torch.device, batch_size: int) -> dict:
    """How far `decode`'s uint8 pixels are from PIL's (the reference's), in levels of 255."""
    reference, other = Preprocess.of(spec, "pil"), Preprocess.of(spec, decode)
    a, b = dataset_of(reference), dataset_of(other)
    diffs = []
    for start in range(0, len(a), batch_size):
        rows = range(start, min(start + batch_size, len(a)))
        want = reference.pixels(reference.collate([a[i] for i in rows]), device)
        got = other.pixels(other.collate([b[i] for i in rows]), device)
        diffs.append((got.int() - want.int()).abs().flatten().cpu())
    levels = torch.cat(diffs)
    return {"max_levels": int(levels.max()), "mean_levels": round(levels.float().mean().item(), 5),
            "share_of_values_differing": round((levels > 0).float().mean().item(), 5)}


def run(spec: dict, device: torch.device, *, images: int | None = None, batch_size: int = 256, repeats: int = 2,
        workers: list[int] | None = None, decode: list[str] | None = None, progress: Callable = lambda it, **kw: it
        ) -> dict:
    """Steady images/s of every decoder at every worker count (the fastest of `repeats` runs), in
    batches of the extract stage's size; `images` by default keeps every worker busy."""
    workers = workers or default_workers()
    decode = decode or decoders(device)
    images = images or MIN_BATCHES_PER_WORKER * batch_size * max(1, *workers)
    scratch = Path(tempfile.mkdtemp(prefix="repsurgery-decode-"))
    try:
        print(f"{images} JPEGs of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} ({min(images, DISTINCT)} distinct)")
        root = scratch / "data"
        write_split(root / TASK, SPLIT, images, 1, pool(min(images, DISTINCT)))

        def dataset_of(preprocess: Preprocess):
            return datasets.ImageDataset(root, TASK, SPLIT, preprocess)

        batches = -(-images // batch_size)
        rows = []
        for name in decode:
            preprocess = Preprocess.of(spec, name)
            dataset = dataset_of(preprocess)
            for count in progress(workers, desc=f"decode {name}", unit="setting", leave=False):
                runs = [loader_run(dataset, preprocess, batch_size=batch_size, workers=count, device=device)
                        for _ in range(repeats)]
                best = max(runs, key=lambda r: r["images_per_s"])
                rows.append({"decode": name, "workers": count, **best,
                             "busy": batches >= MIN_BATCHES_PER_WORKER * max(count, 1)})
        agree = {name: agreement(dataset_of, spec, name, device, batch_size) for name in decode if name != "pil"}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"settings": {"images": images, "batch_size": batch_size, "repeats": repeats, "workers": workers,
                         "decode": decode, "image_size": list(PHOTO_SIZE)},
            "runs": rows, "speedup": speedups(rows), "pixels_against_pil": agree}


def as_jpeg(image: bytes, scale: int, quality: int = 90) -> bytes:
    picture = Image.open(io.BytesIO(image)).convert("RGB")
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def accuracy_effect(tasks: list[str], decode: list[str], *, scale: int = 2, batch_size: int = 256) -> dict:
    """Each decoder's accuracy on the workspace's test images turned into JPEGs `scale` times their
    size (so that decoding and the resize back both differ from PIL's), through each task's own
    fine-tuned encoder and head: what a decoder's pixel differences do to predictions."""
    from pipeline import workspace
    from pipeline.features.jobs import build_encoder
    from pipeline.models import clip
    from pipeline.models.checkpoints import load_heads
    from pipeline.models.heads import logits

    spec, heads = clip.read_spec(workspace.PRETRAINED), load_heads(workspace.HEADS, tasks)
    scratch = Path(tempfile.mkdtemp(prefix="repsurgery-decode-accuracy-"))
    out = {}
    try:
        for task in tasks:
            source = datasets.ImageDataset(workspace.DATA, task, SPLIT)
            shard = scratch / task / "data" / f"{SPLIT}-00000-of-00001.parquet"
            shard.parent.mkdir(parents=True)
            pq.write_table(pa.table({"image": pa.array([{"bytes": as_jpeg(b, scale), "path": None} for b in source.images],
                                                       type=IMAGE_TYPE), "label": pa.array(source.labels)}), shard)
            encoder = build_encoder(str(workspace.PRETRAINED), str(workspace.finetuned_checkpoint(task)))
            predictions = {}
            for name in decode:
                preprocess = Preprocess.of(spec, name)
                data = datasets.ImageDataset(scratch, task, SPLIT, preprocess)
                with torch.no_grad():
                    predictions[name] = torch.cat([
                        logits(encoder(preprocess.finish(batch, torch.device("cpu"))), heads[task]).argmax(-1)
                        for batch in datasets.loader(data, batch_size, collate=preprocess.collate)])
            labels = torch.as_tensor(source.labels)
            out[task] = {name: round(100 * (p == labels).float().mean().item(), 2) for name, p in predictions.items()}
            out[task].update({f"{name} agrees with pil": round(100 * (p == predictions["pil"]).float().mean().item(), 2)
                              for name, p in predictions.items() if name != "pil"})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    mean = {key: round(sum(t[key] for t in out.values()) / len(out), 2) for key in next(iter(out.values()))}
    return {"jpeg_scale": scale, "tasks": out, "mean": mean}


def speedups(rows: list[dict]) -> dict:
    """Each decoder's steady images/s at each worker count over its own at one worker, and each
    decoder's over PIL's at the same count."""
    rate = {(r["decode"], r["workers"]): r["images_per_s"] for r in rows}
    out = {}
    for (name, count), value in rate.items():
        if (name, 1) in rate and count != 1:
            out[f"{name}: {count} workers / 1"] = round(value / rate[name, 1], 3)
        if name != "pil" and ("pil", count) in rate:
            out[f"{name} / pil, {count} workers"] = round(value / rate["pil", count], 3)
    return out


def table(result: dict) -> str:
    lines = ["| decode | workers | steady img/s | with start-up img/s | start-up s | every worker busy |",
             "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['decode']} | {r['workers']} | {r['images_per_s']:.1f} "
                     f"| {r['with_startup_images_per_s']:.1f} | {r['startup_s']:.2f} | {'yes' if r['busy'] else 'no'} |")
    lines += ["", *(f"- {k}: {v:.2f}x" for k, v in result["speedup"].items())]
    if "accuracy" in result:
        effect = result["accuracy"]
        lines += [f"- accuracy on the workspace's test images as JPEGs at {effect['jpeg_scale']}x, each task's "
                  "fine-tuned encoder (mean over tasks): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in effect["mean"].items())]
    lines += [f"- {k} pixels against pil: at most {v['max_levels']} level(s) of 255, mean {v['mean_levels']:.4f}, "
              f"{100 * v['share_of_values_differing']:.2f} % of values differ" for k, v in result["pixels_against_pil"].items()]
    return "\n".join(lines)
