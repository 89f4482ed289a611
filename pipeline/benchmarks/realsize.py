"""`repsurgery bench-real-size`: extraction and AdaMerging at the real encoders' sizes.

The miniature figures (bench.py) come from 32 px images and tiny encoders. Here the encoders
are open_clip architectures at their real sizes (ViT-B/32, ViT-L/14), randomly initialised
(time and memory do not depend on the weights' values, so nothing is downloaded), and the
images are generated photo-sized JPEGs imported into the project's dataset layout, so that
every figure runs the pipeline's own path: the image-folder import, the extract stage's
dataset, preprocessing, loader, encoder call and Zarr writer, and AdaMerging's two steps.

Extraction is set against its two bounds on the same images and encoder: decoding and
preprocessing alone, through the same loader and workers, and the bare forward on batches
decoded beforehand. With workers decoding while the encoder runs, extraction can approach
the slower of the two, so its throughput over min(decode, forward) is the figure to watch
(goal: at least 0.9).
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.benchmarks import bench, decoding
from pipeline.benchmarks.measure import timed
from pipeline.benchmarks.photos import PHOTO_SIZE, TASK, write_photos
from pipeline.data import datasets
from pipeline.data.preprocess import Preprocess
from pipeline.features.extraction import (Job, Ref, Target, Timings, encode, encoder_on, extract, forget_built,
                                         obtain)
from pipeline.merging.methods import adamerging
from pipeline.models import clip
from pipeline.workspace import SPLIT

ARCHS = ("ViT-B-32-quickgelu", "ViT-L-14-quickgelu")
QUICK = {"images": 8, "repeats": 1, "tasks": 2, "images_per_task": 1, "steps": 1}
TASK_VECTOR_STD = 1e-3  # fine-tuning moves weights little; only the vectors' size matters here
HEAD_CLASSES = 10


def random_encoder(spec: dict) -> torch.nn.Module:
    """The image tower of the spec's architecture, randomly initialised (never downloads)."""
    encoder = clip.build_clip(spec).visual
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder.eval()


def stage_workers() -> int:
    """The decode workers the extract stage's loader gives a split of real size (SVHN's 26,032
    test images), rather than the none it gives the few images this benchmark decodes."""
    return datasets.loader_workers(26_032)


def _per_s(images: int, seconds: float) -> float:
    return round(images / seconds, 3) if seconds > 0 else float("nan")


def extraction_figures(encoder: Ref, data: Ref, preprocess: Preprocess, scratch: Path, *, batch_size: int,
                       workers: int, repeats: int, device: torch.device, autocast: torch.dtype | None,
                       progress: Callable) -> dict:
    """Images/s of decoding alone, the bare forward and the full extraction on the same images:
    the three run in turn `repeats` times and the fastest run of each counts (on a shared
    machine, the one least slowed by other work)."""
    dataset = obtain(data)
    n = len(dataset)
    model = encoder_on(encoder, device)
    runs, splits = {"decode": [], "forward": [], "extract": []}, []
    for attempt in range(repeats):
        runs["decode"].append(decoding.loader_run(dataset, preprocess, batch_size=batch_size, workers=workers,
                                                  device=device)["total_s"])
        job = Job(data, n, [Target(encoder, scratch / f"features-{attempt}.zarr", {"encoder": encoder.key})],
                  encoder.key, preprocess=preprocess)
        # warm-up outside the clocks: first forward, allocator
        encode(model, job.on_device(job.collate([dataset[0]]), device), autocast)
        runs["forward"].append(bench._bare_forward([job], batch_size=batch_size, device=device, autocast=autocast))
        splits.append(Timings())
        _, seconds = timed(lambda: extract(
            [job], dim=model.output_dim, batch_size=batch_size, device=device, autocast=autocast,
            timings=splits[-1], workers=workers, progress=lambda it, **kw: progress(it, leave=False, **kw)), device)
        runs["extract"].append(seconds)
    best = {part: min(seconds) for part, seconds in runs.items()}
    split = splits[runs["extract"].index(best["extract"])]
    bound = max(("decode", "forward"), key=best.get)  # the slower of the two bounds
    return {
        "images": n, **{f"{part}_images_per_s": _per_s(n, seconds) for part, seconds in best.items()},
        "seconds": {part: round(seconds, 6) for part, seconds in best.items()},
        "runs_s": {part: [round(s, 3) for s in seconds] for part, seconds in runs.items()},
        "extract_split_s": {"decode_wait": round(split.decode, 4), "forward": round(split.forward, 4),
                            "write": round(split.write, 4), "other": round(best["extract"] - split.total(), 4)},
        "bound": bound, "extract_over_bound": bench._ratio(best[bound], best["extract"]),
        # the same check within one run, blind to the machine's speed changing between runs:
        # extraction's throughput over that of its own encoder calls
        "extract_over_own_forward": bench._ratio(split.forward, best["extract"]),
    }


def random_task_vectors(encoder: torch.nn.Module, tasks: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Small noise per floating-point tensor, one state dict per task (fine-tuned minus pretrained)."""
    generator = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(v.shape, generator=generator) * TASK_VECTOR_STD
             for k, v in encoder.state_dict().items() if v.is_floating_point()} for _ in range(tasks)]


def adamerging_figures(encoder: torch.nn.Module, dataset: torch.utils.data.Dataset, *, tasks: int,
                       images_per_task: int, steps: int, device: torch.device) -> dict:
    """bench.adamerging_figures at this encoder's size: random task vectors and heads, the
    generated photos as each task's batch."""
    pretrained = dict(encoder.state_dict())  # the encoder's own tensors, not a copy
    coeffs = adamerging.MergeCoefficients(pretrained, random_task_vectors(encoder, tasks), layer_wise=True)
    generator = torch.Generator().manual_seed(1)
    heads = [F.normalize(torch.randn(HEAD_CLASSES, encoder.output_dim, generator=generator), dim=-1) * 100
             for _ in range(tasks)]
    batches = [torch.stack([dataset[(t * images_per_task + i) % len(dataset)] for i in range(images_per_task)])
               for t in range(tasks)]
    return bench.adamerging_figures(encoder, coeffs, heads, batches, steps=steps, device=device)


def run(specs: dict[str, dict], device: torch.device, *, images: int = 64, workers: int | None = None,
        batch_size: int = 32, repeats: int = 2, size: tuple[int, int] = PHOTO_SIZE, tasks: int = 3,
        images_per_task: int = 2, steps: int = 1, autocast: torch.dtype | None = None, decode: str = "pil",
        progress: Callable = lambda it=None, **kw: it) -> dict:
    """Every figure for each named spec (an open_clip architecture or model config) on `images`
    generated JPEGs of `size`; AdaMerging on `tasks` x `images_per_task` of them."""
    workers = stage_workers() if workers is None else workers
    started, load_before = time.perf_counter(), os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="repsurgery-realsize-"))
    settings = {"images": images, "image_size": list(size), "batch_size": batch_size, "workers": workers,
                "repeats": repeats, "autocast": str(autocast), "decode": decode,
                "adamerging": {"tasks": tasks, "images_per_task": images_per_task, "steps": steps, "layer_wise": True}}
    result = {"settings": settings, "archs": {}}
    try:
        print(f"generating {images} JPEGs of {size[0]}x{size[1]}")
        root = write_photos(scratch, images, size)
        settings["mean_jpeg_kib"] = round(
            sum(f.stat().st_size for f in (scratch / "jpeg").rglob("*.jpg")) / images / 1024, 1)
        for name, spec in specs.items():
            encoder = Ref(name, functools.partial(random_encoder, spec))
            preprocess = Preprocess.of(spec, decode)
            data = Ref(f"{name}:{TASK}:{decode}", functools.partial(datasets.ImageDataset, root, TASK, SPLIT,
                                                                    preprocess))
            print(f"{name}: decode alone, bare forward, extraction ({images} images, {workers} workers, {decode})")
            figures = extraction_figures(encoder, data, preprocess, scratch / name, batch_size=batch_size,
                                         workers=workers, repeats=repeats, device=device, autocast=autocast,
                                         progress=progress)
            model = obtain(encoder)
            figures.update(parameters=sum(p.numel() for p in model.parameters()), feature_dim=model.output_dim)
            print(f"{name}: layer-wise AdaMerging, task by task vs all graphs ({tasks} tasks x {images_per_task})")
            photos = datasets.ImageDataset(root, TASK, SPLIT, clip.preprocess_for(spec))
            figures.update(adamerging_figures(model, photos, tasks=tasks, images_per_task=images_per_task,
                                              steps=steps, device=device))
            result["archs"][name] = figures
            del model
            forget_built()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result["load_average"] = {"before": [round(x, 2) for x in load_before],
                              "after": [round(x, 2) for x in os.getloadavg()]}
    result["total_s"] = round(time.perf_counter() - started, 1)
    return result


def table(result: dict) -> str:
    """The figures of every architecture as one markdown table."""
    workers = result["settings"]["workers"]
    lines = ["| encoder | workers | decode alone (img/s) | forward alone (img/s) | extraction (img/s) "
             "| extraction / min bound | extraction / its own forward | AdaMerging tasks x images "
             "| step s: task by task / all graphs | grouped step s (/ all graphs) "
             "| peak MiB: task by task / all graphs | memory ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, f in result["archs"].items():
        memory, step, grouped = f["adamerging_memory_ratio"], f["adamerging_step_ratio"], f["adamerging_grouped_ratio"]
        lines.append(
            f"| {name} ({f['parameters'] / 1e6:.0f} M) | {workers} | {f['decode_images_per_s']:.1f} "
            f"| {f['forward_images_per_s']:.2f} | {f['extract_images_per_s']:.2f} "
            f"| {f['extract_over_bound']:.3f} ({f['bound']}-bound) | {f['extract_over_own_forward']:.3f} "
            f"| {memory['tasks']} x {memory['images_per_task']} "
            f"| {step['task_by_task_step_s']:.2f} / {step['all_graphs_step_s']:.2f} ({step['ratio']:.2f}) "
            f"| {grouped['grouped_step_s']:.2f} ({grouped['ratio']:.2f}) "
            f"| {memory['task_by_task_bytes'] / 2**20:.0f} / {memory['all_graphs_bytes'] / 2**20:.0f} "
            f"| {memory['ratio']:.3f} |")
    return "\n".join(lines)
