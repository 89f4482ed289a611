"""A feature store: one chunked 2-D Zarr array (rows = images in dataset order) plus metadata.

Written under `<path>.partial` and renamed only when complete, so a store that exists is a
store that is whole; the number of rows safely on disk is recorded after every chunk write,
so a killed writer resumes where it stopped. Readers verify before they trust.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import dask
import numpy as np
import zarr
from zarr.codecs import BloscCodec

from cache.files import storage_errors

if TYPE_CHECKING:  # dask.array is imported where it is used: 0.4 s that most commands never need
    import dask.array as da

CODE_VERSION = "1"
DTYPES = ("float32", "float16")
# Attributes the writer maintains itself; everything else describes what the store was made from.
_PROGRESS_KEYS = ("rows_written", "complete", "sha256")
# Zarr 3 skips chunks equal to the fill value by default, which would make an all-zero chunk
# indistinguishable from a missing one; every chunk must exist on disk.
_ARRAY_CONFIG = {"write_empty_chunks": True}


class StoreError(Exception):
    """A store that cannot be trusted: the message names it, the problem and the fix."""


class MissingStoreError(StoreError):
    pass


class IncompleteStoreError(StoreError):
    pass


class StoreMismatchError(StoreError):
    pass


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _fix(hint: str) -> str:
    return f" Fix: {hint}." if hint else ""


def _json(value):
    """Compare values as they will read back from the store (tuples become lists, etc.)."""
    return json.loads(json.dumps(value))


_HELD: dict[Path, int] = {}  # lock file -> descriptor, the stores this process is writing


def _lock(path: Path) -> None:
    """Hold `<path>.lock` for this process (released by `finalize`, or by the kernel when the
    process dies, so a killed writer never blocks the next): two processes extracting the same
    store would otherwise append to one `.partial`. A writer this process left unfinished is
    simply resumed."""
    lock = _sibling(path, ".lock").absolute()
    if lock in _HELD:
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(f"{path} is being written by another process (pid {owner}): wait for it to finish "
                             "(or stop it), then run the command again") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its previous holder removed after we opened it
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            _HELD[lock] = fd
            return
        os.close(fd)


def _release(path: Path, remove: bool = False) -> None:
    lock = _sibling(path, ".lock").absolute()
    if remove:
        lock.unlink(missing_ok=True)  # before the release: nobody locks a removed file
    if lock in _HELD:
        os.close(_HELD.pop(lock))


@dataclass(frozen=True)
class Leftover:
    """What an interrupted write leaves beside a store: its unfinished `.partial` (or `.old`) copy,
    or a `.lock` file; `writer` is the pid of a process still writing it (None: nobody is)."""
    path: Path
    store: Path
    writer: int | None


LEFTOVER_SUFFIXES = (".partial", ".old", ".lock")


def leftovers(root: Path) -> list[Leftover]:
    """Every leftover of an interrupted store write under `root`."""
    found = []
    for suffix in LEFTOVER_SUFFIXES:
        for path in sorted(Path(root).rglob(f"*.zarr{suffix}")):
            store = path.with_name(path.name[:-len(suffix)])
            found.append(Leftover(path, store, _writer(_sibling(store, ".lock"))))
    return found


def _writer(lock: Path) -> int | None:
    """The pid holding `lock`, None when no process does (or there is no lock file)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(owner) if owner.isdigit() else -1
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def clear_leftovers(root: Path) -> list[Path]:
    """Remove the leftovers no process is writing; returns what was removed."""
    removed = []
    for item in leftovers(root):
        if item.writer is None and item.path.exists():
            shutil.rmtree(item.path) if item.path.is_dir() else item.path.unlink()
            removed.append(item.path)
    return removed


class StoreWriter:
    """Appends chunk-aligned blocks of rows to `<path>.partial`, then publishes it as `<path>`.
    Holds the store's lock from `open_writer` to `finalize`."""

    def __init__(self, path: Path, group: zarr.Group, fix_hint: str):
        self.path, self.group, self.fix_hint = path, group, fix_hint
        self.array = group["features"].with_config(_ARRAY_CONFIG)
        self.n_rows, self.dim = self.array.shape
        self.chunk_rows = self.array.chunks[0]
        self._pending: dict[int, int] = {}  # committed regions beyond the contiguous prefix

    @property
    def rows_written(self) -> int:
        return int(self.group.attrs["rows_written"])

    def write(self, start: int, block: np.ndarray) -> None:
        """Append rows at the end of what is on disk (the single-process path)."""
        done = self.rows_written
        if start != done:
            raise ValueError(f"{self.path}: write at row {start}, but the store holds {done} rows; "
                             "rows are appended in order")
        stop = _write_rows(self.array, self.path, start, block)
        self.group.attrs["rows_written"] = stop  # only after the rows are on disk

    def commit(self, start: int, stop: int) -> int:
        """Record rows [start, stop) as written by someone else (a Dask worker's `write_region`).

        Regions may finish in any order; `rows_written` only ever advances over a contiguous
        prefix, so after a kill the resumed run redoes at most the regions that were not yet
        contiguous (their bytes come out the same). Returns the new `rows_written`.
        """
        if start < self.rows_written or stop > self.n_rows or start >= stop:
            raise ValueError(f"{self.path}: cannot commit rows [{start}, {stop}): the store holds "
                             f"{self.rows_written} of {self.n_rows} rows")
        self._pending[start] = stop
        done = self.rows_written
        while done in self._pending:
            done = self._pending.pop(done)
        if done != self.rows_written:
            self.group.attrs["rows_written"] = done
        return done

    def close(self) -> None:
        """Stop writing without finalising: the rows written stay in `.partial` for a later
        writer to resume, which this releases the store's lock to."""
        _release(self.path)

    def finalize(self) -> Path:
        if self.rows_written != self.n_rows:
            raise IncompleteStoreError(f"{self.path}: only {self.rows_written} of {self.n_rows} rows written; "
                                       f"not finalised.{_fix(self.fix_hint)}")
        self.group.attrs.update({"sha256": _checksum(self.array), "complete": True})
        partial, old = _sibling(self.path, ".partial"), _sibling(self.path, ".old")
        for junk in partial.rglob("*.partial"):  # temp files of zarr writes cut short by a kill
            junk.unlink()
        shutil.rmtree(old, ignore_errors=True)
        if self.path.exists():
            os.replace(self.path, old)
        os.replace(partial, self.path)
        shutil.rmtree(old, ignore_errors=True)
        _release(self.path, remove=True)
        return self.path


def _write_rows(array, path: Path, start: int, block: np.ndarray) -> int:
    """Write a block that starts and ends on chunk boundaries (the last chunk may be short)."""
    block = np.asarray(block)
    n_rows, dim = array.shape
    chunk_rows = array.chunks[0]
    if block.ndim != 2 or block.shape[1] != dim or len(block) == 0:
        raise ValueError(f"{path}: expected a block of shape (m >= 1, {dim}), got {block.shape}")
    stop = start + len(block)
    if start % chunk_rows or stop > n_rows or (stop % chunk_rows and stop != n_rows):
        raise ValueError(f"{path}: block of rows [{start}, {stop}) is not on chunk boundaries "
                         f"(chunk rows {chunk_rows}, total {n_rows})")
    with storage_errors(StoreError, f"could not write rows [{start}, {stop}) of feature store {path}: {{reason}}. "
                                    "The rows written before are kept: free disk space, then run the command again "
                                    "to resume"):
        array[start:stop] = block.astype(array.dtype, copy=False)
    return stop


def write_region(path, start: int, block: np.ndarray) -> int:
    """Write rows [start, start + len(block)) of `<path>.partial`, from any process or host.

    For scale-out: each Dask task writes its own chunk-aligned region (so no two writers
    ever touch the same chunk file) and records nothing; the process that opened the store
    with `open_writer` commits the region when the task reports back, then finalises.
    Returns the row after the block.
    """
    partial = _sibling(Path(path), ".partial")
    if not partial.exists():
        raise MissingStoreError(f"{partial} does not exist: open the store with open_writer before "
                                "writing regions into it")
    array = zarr.open_array(partial / "features", mode="r+").with_config(_ARRAY_CONFIG)
    return _write_rows(array, Path(path), start, block)


def _checksum(array) -> str:
    digest = hashlib.sha256()
    rows = array.chunks[0]
    for start in range(0, array.shape[0], rows):
        digest.update(np.ascontiguousarray(array[start:start + rows]).tobytes())
    return digest.hexdigest()


def open_writer(path, *, n_rows: int, dim: int, dtype: str = "float32", chunk_rows: int = 256,
                attrs: dict | None = None, fix_hint: str = "") -> StoreWriter:
    """A writer into `<path>.partial`, resuming a previous partial only if it was begun with the same spec."""
    path = Path(path)
    if dtype not in DTYPES:
        raise ValueError(f"feature store dtype must be one of {DTYPES}, got {dtype!r}")
    for name, value in (("n_rows", n_rows), ("dim", dim), ("chunk_rows", chunk_rows)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    clash = set(attrs or {}) & {"n_rows", "dim", "dtype", "chunk_rows", "code_version", *_PROGRESS_KEYS}
    if clash:
        raise ValueError(f"attrs may not set the store's own keys {sorted(clash)}")
    layout = _json({"n_rows": int(n_rows), "dim": int(dim), "dtype": dtype, "chunk_rows": int(chunk_rows),
                    "code_version": CODE_VERSION, **(attrs or {})})
    partial = _sibling(path, ".partial")
    _lock(path)
    try:
        if partial.exists():
            try:
                group = zarr.open_group(partial, mode="r+")
                spec = {k: v for k, v in group.attrs.items() if k not in _PROGRESS_KEYS}
                if spec == layout and group["features"].shape == (n_rows, dim):
                    return StoreWriter(path, group, fix_hint)
            except Exception:
                pass  # unreadable partial: start again
            shutil.rmtree(partial)
        group = zarr.open_group(partial, mode="w")
        group.create_array("features", shape=(n_rows, dim), chunks=(chunk_rows, dim), dtype=dtype,
                           compressors=BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), fill_value=0,
                           config=_ARRAY_CONFIG)
        group.attrs.update({**layout, "rows_written": 0, "complete": False})
    except BaseException:
        _release(path, remove=True)
        raise
    return StoreWriter(path, group, fix_hint)


class FeatureStore:
    """A verified, read-only view of a finished store."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path, self.group = path, group
        self.array = group["features"]
        self.attrs = dict(group.attrs)

    def chunk_file(self, i: int) -> Path:
        """Where chunk i (rows i * chunk_rows onwards) lies (zarr v3 default chunk key encoding)."""
        return self.path / "features" / "c" / str(i) / "0"

    n_rows = property(lambda self: self.array.shape[0])
    dim = property(lambda self: self.array.shape[1])
    dtype = property(lambda self: str(self.array.dtype))
    chunk_rows = property(lambda self: self.array.chunks[0])

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, shape=({self.n_rows}, {self.dim}), dtype={self.dtype})"

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        with decoding(self):
            return np.asarray(self.array[start:stop], dtype=np.float32)

    def to_numpy(self) -> np.ndarray:
        return self.read()

    def to_dask(self) -> da.Array:
        import dask.array as da

        return da.from_zarr(self.array)


@contextmanager
def decoding(*stores):
    """Reading chunks: bytes that no longer decode (a damaged chunk file) become a StoreError
    naming the store(s) and the fix, instead of the codec's own exception."""
    try:
        yield
    except StoreError:
        raise
    except Exception as exc:
        if not _raised_by_codec(exc):
            raise
        known = [s for s in stores if isinstance(s, FeatureStore)]
        damaged = [(s, bad) for s in known if (bad := undecodable_chunks(s))]
        names = [f"{s.path} (chunk {', '.join(map(str, bad))}: {s.chunk_file(bad[0])})" for s, bad in damaged] \
            or [str(s.path) for s in known]
        where = ("a feature store" if not names else f"feature store {' or '.join(names)}"
                 + ("" if damaged or len(names) == len(stores) else " (or the one compared with it)"))
        raise StoreError(f"{where} is damaged: a chunk does not decode ({type(exc).__name__}: {exc}). "
                         "Delete the store and run `repsurgery extract` to recompute it (DVC keeps stores it "
                         "takes as current; `dvc repro` will not notice); `repsurgery verify` checks every "
                         "store against its checksum") from exc


def undecodable_chunks(store: FeatureStore) -> list[int]:
    """The chunks of a store whose bytes no longer decode (read one by one, on an error path only)."""
    bad = []
    for i, start in enumerate(range(0, store.n_rows, store.chunk_rows)):
        try:
            store.array[start:start + store.chunk_rows]
        except Exception:
            bad.append(i)
    return bad


def _raised_by_codec(exc: BaseException) -> bool:
    """Whether zarr or its codecs raised `exc` (and not, say, a function mapped over the blocks)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and any(part in frames[-1].filename for part in ("/zarr/", "numcodecs"))


def open_store(path, *, expect: dict | None = None, fix_hint: str = "", deep: bool = False) -> FeatureStore:
    """Open a finished store, refusing anything incomplete, damaged or made from other inputs.

    The default checks are cheap (metadata and a listing); `deep=True` also rereads every chunk
    against the checksum recorded at write time, which catches truncated or corrupted files.
    """
    path = Path(path)
    if not path.exists():
        partial = _sibling(path, ".partial")
        if partial.exists():
            try:
                attrs = dict(zarr.open_group(partial, mode="r").attrs)
                done = f"after {attrs.get('rows_written', '?')} of {attrs.get('n_rows', '?')} rows"
            except Exception:
                done = "before any rows were recorded"
            raise MissingStoreError(f"feature store {path} does not exist: its extraction was interrupted {done} "
                                    f"(see {partial.name}); re-run it to resume.{_fix(fix_hint)}")
        raise MissingStoreError(f"feature store {path} does not exist.{_fix(fix_hint)}")
    try:
        group = zarr.open_group(path, mode="r")
        attrs = dict(group.attrs)
    except Exception as exc:
        raise StoreError(f"{path} is not a readable feature store ({exc}); delete it and recreate it."
                         f"{_fix(fix_hint)}") from exc
    if "n_rows" not in attrs or "dim" not in attrs:
        raise StoreError(f"{path} is not a feature store of this project (no store metadata); delete it and "
                         f"recreate it.{_fix(fix_hint)}")
    try:
        array = group["features"]
    except Exception as exc:
        raise IncompleteStoreError(f"feature store {path} has no readable `features` array ({exc})."
                                   f"{_fix(fix_hint)}") from exc
    if attrs.get("complete") is not True or array.shape != (attrs["n_rows"], attrs["dim"]):
        raise IncompleteStoreError(f"feature store {path} is incomplete (complete={attrs.get('complete')}, "
                                   f"shape {array.shape}, expected ({attrs['n_rows']}, {attrs['dim']}))."
                                   f"{_fix(fix_hint)}")
    if array.nchunks_initialized < array.nchunks:
        raise IncompleteStoreError(f"feature store {path} is truncated: only {array.nchunks_initialized} of "
                                   f"{array.nchunks} chunks are on disk.{_fix(fix_hint)}")
    for key, value in (expect or {}).items():
        if attrs.get(key) != _json(value):
            raise StoreMismatchError(f"feature store {path} was made from other inputs: {key} is "
                                     f"{attrs.get(key)!r}, expected {value!r}.{_fix(fix_hint)}")
    if deep:
        try:
            ok = _checksum(array) == attrs.get("sha256")
        except Exception:  # a chunk that no longer decodes
            ok = False
        if not ok:
            raise IncompleteStoreError(f"feature store {path} is damaged: its data no longer match the checksum "
                                       f"recorded when it was written.{_fix(fix_hint)}")
    return FeatureStore(path, group)


def _as_dask(x, like: da.Array | None = None) -> da.Array:
    import dask.array as da

    if isinstance(x, FeatureStore):
        return x.to_dask()
    if dask.is_dask_collection(x):
        return x
    x = np.asarray(x)
    return da.from_array(x, chunks=like.chunks if like is not None and like.shape == x.shape else "auto")


def mean_abs_diff(a, b) -> float:
    """mean(|a - b|) over all elements, accumulated in float64; streamed chunk by chunk when an
    operand is a store or a dask array. In-memory inputs are chunked like the other (stored) operand so blocks line up without rechunking.
    """
    return mean_abs_diffs([(a, b)])[0]


def mean_abs_diffs(pairs: list[tuple]) -> list[float]:
    """`mean_abs_diff` of every pair. Pairs held in memory are reduced there (a dask graph
    costs more than their arithmetic); pairs with a store or dask operand stream chunk by chunk,
    all in one dask computation: one scheduler pass for them all instead of one per pair."""
    means, lazy = [], []
    for a, b in pairs:
        held = [x for x in (a, b) if isinstance(x, FeatureStore) or dask.is_dask_collection(x)]
        if held:
            like = _as_dask(held[0])
            a, b = _as_dask(a, like), _as_dask(b, like)
            lazy += held
        else:
            a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise ValueError(f"cannot compare features of shape {a.shape} and {b.shape}")
        means.append(abs(a.astype(np.float64) - b.astype(np.float64)).mean())
    with decoding(*lazy):
        return [float(m) for m in dask.compute(*means)]
