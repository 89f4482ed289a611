"""A feature store: one chunked 2-D Zarr array (rows = images in dataset order) plus metadata.

Written under `<path>.partial` and renamed only when complete, so a store that exists is a
store that is whole; the number of rows safely on disk is recorded after every chunk write,
so a killed writer resumes where it stopped. Readers verify before they trust.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import dask.array as da
import numpy as np
import zarr
from zarr.codecs import BloscCodec

CODE_VERSION = "1"
DTYPES = ("float32", "float16")


class StoreError(Exception):
    """A store that cannot be trusted: the message names it, the problem and the fix."""


class MissingStoreError(StoreError):
    pass


class IncompleteStoreError(StoreError):
    pass


class StoreMismatchError(StoreError):
    pass


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _fix(hint: str) -> str:
    return f" Fix: {hint}." if hint else ""


class StoreWriter:
    def __init__(self, path: Path, group: zarr.Group, fix_hint: str):
        self.path, self.group, self.fix_hint = path, group, fix_hint
        self.array = group["features"]
        self.n_rows, self.chunk_rows = self.array.shape[0], self.array.chunks[0]

    @property
    def rows_written(self) -> int:
        return int(self.group.attrs["rows_written"])

    def write(self, start: int, block: np.ndarray) -> None:
        if start != self.rows_written:
            raise ValueError(f"{self.path}: write at row {start}, but the store holds {self.rows_written} rows; "
                             "rows are appended in order")
        stop = start + len(block)
        if stop > self.n_rows or (stop % self.chunk_rows and stop != self.n_rows):
            raise ValueError(f"{self.path}: block ends at row {stop}, not on a chunk boundary "
                             f"(chunk rows {self.chunk_rows}, total {self.n_rows})")
        self.array[start:stop] = np.asarray(block, dtype=self.array.dtype)
        self.group.attrs["rows_written"] = stop  # only after the rows are on disk

    def finalize(self) -> Path:
        if self.rows_written != self.n_rows:
            raise IncompleteStoreError(f"{self.path}: only {self.rows_written} of {self.n_rows} rows written; "
                                       f"not finalised.{_fix(self.fix_hint)}")
        self.group.attrs.update({"sha256": _checksum(self.array), "complete": True})
        partial = _partial(self.path)
        old = self.path.with_name(self.path.name + ".old")
        if self.path.exists():
            os.replace(self.path, old)
        os.replace(partial, self.path)
        shutil.rmtree(old, ignore_errors=True)
        return self.path


def _checksum(array) -> str:
    digest = hashlib.sha256()
    rows = array.chunks[0]
    for start in range(0, array.shape[0], rows):
        digest.update(np.ascontiguousarray(array[start:start + rows]).tobytes())
    return digest.hexdigest()


def open_writer(path, *, n_rows: int, dim: int, dtype: str = "float32", chunk_rows: int = 256,
                attrs: dict | None = None, fix_hint: str = "") -> StoreWriter:
    """A writer into `<path>.partial`, resuming a previous identical partial if there is one."""
    path = Path(path)
    if dtype not in DTYPES:
        raise ValueError(f"feature store dtype must be one of {DTYPES}, got {dtype!r}")
    if min(n_rows, dim, chunk_rows) < 1:
        raise ValueError(f"n_rows, dim and chunk_rows must be >= 1, got {n_rows}, {dim}, {chunk_rows}")
    layout = {"n_rows": n_rows, "dim": dim, "dtype": dtype, "chunk_rows": chunk_rows,
              "code_version": CODE_VERSION, **(attrs or {})}
    partial = _partial(path)
    if partial.exists():
        try:
            group = zarr.open_group(str(partial), mode="r+")
            stored = dict(group.attrs)
            if {k: stored.get(k) for k in layout} == layout and "features" in group:
                return StoreWriter(path, group, fix_hint)
        except Exception:
            pass  # unreadable partial: start again
        shutil.rmtree(partial)
    path.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(partial), mode="w")
    group.create_array("features", shape=(n_rows, dim), chunks=(chunk_rows, dim), dtype=dtype,
                       compressors=BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), fill_value=0)
    group.attrs.update({**layout, "rows_written": 0, "complete": False})
    return StoreWriter(path, group, fix_hint)


class FeatureStore:
    """A verified, read-only view of a finished store."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path, self.group = path, group
        self.array = group["features"]
        self.attrs = dict(group.attrs)

    n_rows = property(lambda self: self.array.shape[0])
    dim = property(lambda self: self.array.shape[1])
    dtype = property(lambda self: str(self.array.dtype))
    chunk_rows = property(lambda self: self.array.chunks[0])

    def __len__(self) -> int:
        return self.n_rows

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return np.asarray(self.array[start:stop], dtype=np.float32)

    def to_numpy(self) -> np.ndarray:
        return self.read()

    def to_dask(self) -> da.Array:
        return da.from_zarr(self.array)


def open_store(path, *, expect: dict | None = None, fix_hint: str = "", deep: bool = False) -> FeatureStore:
    """Open a finished store, refusing anything incomplete, damaged or made from other inputs."""
    path = Path(path)
    if not path.exists():
        partial = _partial(path)
        if partial.exists():
            try:
                attrs = dict(zarr.open_group(str(partial), mode="r").attrs)
                done = f"after {attrs.get('rows_written', '?')} of {attrs.get('n_rows', '?')} rows"
            except Exception:
                done = "before any rows were recorded"
            raise MissingStoreError(f"feature store {path} is incomplete: its extraction was interrupted {done} "
                                    f"(see {partial.name}); re-running it resumes.{_fix(fix_hint)}")
        raise MissingStoreError(f"feature store {path} does not exist.{_fix(fix_hint)}")
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
        array = group["features"]
    except Exception as exc:
        raise StoreError(f"{path} is not a readable feature store ({exc}).{_fix(fix_hint)}") from exc
    if "n_rows" not in attrs:
        raise StoreError(f"{path} is not a feature store of this project (no metadata).{_fix(fix_hint)}")
    if attrs.get("complete") is not True or array.shape != (attrs["n_rows"], attrs["dim"]):
        raise IncompleteStoreError(f"feature store {path} is incomplete (complete={attrs.get('complete')}, "
                                   f"shape {array.shape}).{_fix(fix_hint)}")
    n_chunks = -(-attrs["n_rows"] // array.chunks[0])
    if array.nchunks_initialized < n_chunks:
        raise IncompleteStoreError(f"feature store {path} is truncated: {array.nchunks_initialized} of {n_chunks} "
                                   f"chunks on disk.{_fix(fix_hint)}")
    for key, value in (expect or {}).items():
        if attrs.get(key) != value:
            raise StoreMismatchError(f"feature store {path} was made from other inputs: {key} is "
                                     f"{attrs.get(key)!r}, expected {value!r}.{_fix(fix_hint)}")
    if deep:
        try:
            ok = _checksum(array) == attrs.get("sha256")
        except Exception:
            ok = False
        if not ok:
            raise IncompleteStoreError(f"feature store {path} is damaged: its data no longer match the checksum "
                                       f"recorded when it was written.{_fix(fix_hint)}")
    return FeatureStore(path, group)


def _as_dask(x) -> da.Array:
    if isinstance(x, FeatureStore):
        return x.to_dask()
    return x if isinstance(x, da.Array) else da.from_array(np.asarray(x), chunks=(4096, -1))


def mean_abs_diff(a, b) -> float:
    """mean(|a - b|) over all elements, streamed chunk by chunk, accumulated in float64."""
    a, b = _as_dask(a), _as_dask(b)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare features of shape {a.shape} and {b.shape}")
    b = b.rechunk(a.chunks)
    return float(abs(a.astype(np.float64) - b.astype(np.float64)).mean().compute())
