"""Extraction over several devices or hosts through dask.distributed.

The client (this process) opens every store's `.partial` writer, splits each job into
chunk-aligned row regions (one chunk each, the same batches the single-process path uses)
and submits one Dask task per region. A worker builds each encoder and dataset once (the
process-level cache of pipeline/extraction.py, keyed by fingerprint), decodes the region's
images once, runs every encoder that still needs the region and writes the features straight
into the stores' chunk files. As regions report back, the client commits them and finally
finalises each store (checksum, complete flag, atomic rename) exactly as the single-process
path does, so the stores come out byte for byte the same, and a killed run resumes.

Workers need the code installed and the data, models and feature directories on a shared
filesystem under the same absolute paths (job paths are made absolute before submission).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from cache import write_region
from pipeline.features.extraction import Job, Ref, Target, encode, encoder_on, obtain, open_writers


def worker_device(device: str) -> torch.device:
    """`cuda` on a worker of a local multi-GPU cluster means that worker's own GPU.

    LocalCluster names its workers 0..N-1; worker i takes GPU i modulo the GPUs it sees.
    Workers started with one visible GPU each (dask-cuda, CUDA_VISIBLE_DEVICES) see cuda:0.
    """
    chosen = torch.device(device)
    if chosen.type != "cuda" or chosen.index is not None or torch.cuda.device_count() <= 1:
        return chosen
    from distributed import get_worker

    try:
        name = get_worker().name
    except ValueError:  # not on a worker
        return chosen
    return torch.device("cuda", int(name) % torch.cuda.device_count()) if str(name).isdigit() else chosen


def extract_region(job: Job, encoders: list[Ref], paths: list[str], start: int, stop: int, device: str,
                   autocast: torch.dtype | None) -> tuple[int, int, list[str]]:
    """A Dask task: rows [start, stop) of one job's dataset through several encoders, into their stores."""
    place = worker_device(device)
    data = obtain(job.dataset)
    images = job.on_device(job.collate([data[i] for i in range(start, stop)]), place)
    for ref, path in zip(encoders, paths):
        write_region(path, start, encode(encoder_on(ref, place), images, autocast))
    return start, stop, paths


@contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None) -> Iterator:
    """A client of an existing scheduler (`tcp://host:8786`), or of a local cluster of N
    single-threaded worker processes (one per GPU where there are GPUs)."""
    from distributed import Client, LocalCluster

    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    with LocalCluster(n_workers=workers or 1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def extract_distributed(jobs: list[Job], client, *, dim: int, batch_size: int, device: torch.device | str,
                        dtype: str = "float32", autocast: torch.dtype | None = None,
                        fix_hint: Callable[[Target], str] = lambda t: "",
                        progress: Callable = lambda it, **kw: it) -> list[Path]:
    """Like pipeline.extraction.extract, with the regions computed by the client's workers."""
    from distributed import as_completed

    writers, futures = {}, []
    for job in jobs:
        opened = open_writers(job, dim=dim, batch_size=batch_size, dtype=dtype, fix_hint=fix_hint)
        writers.update({str(t.path.resolve()): w for t, w in opened})
        first = min((w.rows_written for _, w in opened), default=job.n_rows)
        for start in range(first, job.n_rows, batch_size):
            needed = [(t, w) for t, w in opened if w.rows_written <= start]
            futures.append(client.submit(
                extract_region, job, [t.encoder for t, _ in needed],
                [str(t.path.resolve()) for t, _ in needed], start, min(start + batch_size, job.n_rows),
                str(device), autocast, pure=False, key=f"extract-{job.name}-{start}-{len(futures)}"))
    for future in progress(as_completed(futures), total=len(futures), desc="extract (dask)", unit="region"):
        start, stop, paths = future.result()
        for path in paths:
            writers[path].commit(start, stop)
    for writer in writers.values():
        writer.finalize()
    return [t.path for job in jobs for t in job.targets]
