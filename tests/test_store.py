"""The feature store: what goes in comes out, and nothing incomplete, damaged or stale is ever trusted."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from cache import (IncompleteStoreError, MissingStoreError, StoreError, StoreMismatchError,
                   mean_abs_diff, open_store, open_writer)

ROOT = Path(__file__).resolve().parents[1]
ATTRS = {"encoder_fingerprint": "enc-1", "dataset_fingerprint": "data-1", "preprocessing": {"size": 32}}


def data(n: int = 50, dim: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def write(path: Path, x: np.ndarray, *, chunk_rows: int = 8, block_chunks: int = 1, stop: int | None = None,
          finalize: bool = True, **kw):
    """Write x's rows (from where the writer stands) in blocks of `block_chunks` chunks, up to `stop`."""
    w = open_writer(path, n_rows=len(x), dim=x.shape[1], chunk_rows=chunk_rows, attrs=kw.pop("attrs", ATTRS), **kw)
    stop = len(x) if stop is None else stop
    while w.rows_written < stop:
        start = w.rows_written
        w.write(start, x[start:min(start + block_chunks * chunk_rows, len(x))])
    return w.finalize() if finalize else w


def chunk_file(path: Path, i: int) -> Path:
    f = path / "features" / "c" / str(i) / "0"
    assert f.is_file(), f"chunk layout changed: {f} missing"
    return f


@pytest.mark.parametrize("dtype, tol", [("float32", 0), ("float16", 1e-2)])
def test_round_trip(tmp_path, dtype, tol):
    x = data()  # 50 rows over chunks of 8: the last chunk is short
    path = write(tmp_path / "s.zarr", x, dtype=dtype, block_chunks=2)
    assert path == tmp_path / "s.zarr" and not (tmp_path / "s.zarr.partial").exists()
    store = open_store(path, expect=ATTRS, deep=True)
    assert (len(store), store.n_rows, store.dim, store.dtype, store.chunk_rows) == (50, 50, 6, dtype, 8)
    got = store.to_numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, x, rtol=tol, atol=tol)
    np.testing.assert_array_equal(store.read(10, 20), got[10:20])
    assert store.attrs["preprocessing"] == {"size": 32} and store.attrs["complete"] is True
    assert {"n_rows", "dim", "dtype", "chunk_rows", "rows_written", "code_version", "sha256"} <= set(store.attrs)
    assert store.to_dask().chunks[0][0] == 8
    assert store.to_dask().sum(dtype=np.float64).compute() == pytest.approx(got.astype(np.float64).sum(), rel=1e-9)


def test_all_zero_chunk_is_stored_not_mistaken_for_missing(tmp_path):
    x = data(24, 4)
    x[8:16] = 0  # zarr would skip a chunk equal to the fill value unless told otherwise
    store = open_store(write(tmp_path / "s.zarr", x), deep=True)
    np.testing.assert_array_equal(store.to_numpy(), x)


def test_finalize_replaces_an_existing_store(tmp_path):
    path = tmp_path / "s.zarr"
    write(path, data(seed=1))
    write(path, data(seed=2), attrs={**ATTRS, "encoder_fingerprint": "enc-2"})
    store = open_store(path, expect={"encoder_fingerprint": "enc-2"}, deep=True)
    np.testing.assert_array_equal(store.to_numpy(), data(seed=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_finalize_before_all_rows_refuses_and_publishes_nothing(tmp_path):
    w = write(tmp_path / "s.zarr", data(), stop=16, finalize=False)
    with pytest.raises(IncompleteStoreError, match="16 of 50"):
        w.finalize()
    assert not (tmp_path / "s.zarr").exists()


def test_interrupted_write_is_refused_then_resumed_to_identical_bytes(tmp_path):
    x = data()
    path = tmp_path / "s.zarr"
    write(path, x, stop=24, finalize=False)  # then the writer is dropped, as if killed
    with pytest.raises(MissingStoreError, match=r"interrupted after 24 of 50 rows.*partial.*Fix: run it again"):
        open_store(path, fix_hint="run it again")
    w = open_writer(path, n_rows=50, dim=6, chunk_rows=8, attrs=ATTRS)
    assert w.rows_written == 24
    w.write(24, x[24:])
    w.finalize()
    resumed = open_store(path, deep=True)
    fresh = open_store(write(tmp_path / "fresh.zarr", x), deep=True)
    assert resumed.attrs["sha256"] == fresh.attrs["sha256"]
    np.testing.assert_array_equal(resumed.to_numpy(), fresh.to_numpy())


@pytest.mark.parametrize("change", [{"attrs": {**ATTRS, "encoder_fingerprint": "enc-2"}},
                                    {"attrs": {"encoder_fingerprint": "enc-1"}},  # a key dropped
                                    {"chunk_rows": 16}, {"dtype": "float16"}])
def test_partial_with_a_different_spec_is_discarded(tmp_path, change):
    path = tmp_path / "s.zarr"
    write(path, data(), stop=24, finalize=False)
    spec = {"n_rows": 50, "dim": 6, "chunk_rows": 8, "attrs": ATTRS, **change}
    w = open_writer(path, **spec)
    assert w.rows_written == 0
    x = data(seed=3)
    w.write(0, x)
    w.finalize()
    np.testing.assert_allclose(open_store(path, deep=True).to_numpy(), x, atol=1e-2)


def test_expect_mismatch_names_key_and_both_values(tmp_path):
    path = write(tmp_path / "s.zarr", data())
    with pytest.raises(StoreMismatchError, match=r"s\.zarr.*encoder_fingerprint.*'enc-1'.*'enc-9'.*Fix: re-extract"):
        open_store(path, expect={**ATTRS, "encoder_fingerprint": "enc-9"}, fix_hint="re-extract")
    open_store(path, expect={"preprocessing": {"size": 32}})  # nested values compare by content


def test_missing_store_and_foreign_directory(tmp_path):
    with pytest.raises(MissingStoreError, match=r"nope\.zarr does not exist"):
        open_store(tmp_path / "nope.zarr")
    (tmp_path / "junk.zarr").mkdir()
    with pytest.raises(StoreError, match="junk.zarr"):
        open_store(tmp_path / "junk.zarr")


def test_deleted_chunk_is_caught_by_the_cheap_check(tmp_path):
    path = write(tmp_path / "s.zarr", data())
    chunk_file(path, 2).unlink()
    with pytest.raises(IncompleteStoreError, match="6 of 7 chunks"):
        open_store(path)


@pytest.mark.parametrize("damage", ["garbage", "cut", "flip"])
def test_corrupted_chunk_is_caught_by_deep_check(tmp_path, damage):
    path = write(tmp_path / "s.zarr", data())
    f = chunk_file(path, 3)
    raw = f.read_bytes()
    f.write_bytes({"garbage": b"\x00not blosc" * 5, "cut": raw[: len(raw) // 2],
                   "flip": raw[:-4] + bytes(b ^ 0xFF for b in raw[-4:])}[damage])
    open_store(path)  # the cheap check cannot see inside chunk files
    with pytest.raises(IncompleteStoreError, match="damaged"):
        open_store(path, deep=True)


def test_a_chunk_that_no_longer_decodes_is_named_when_read(tmp_path):
    path = write(tmp_path / "s.zarr", data())
    chunk_file(path, 3).write_bytes(b"\x00not blosc" * 5)
    store = open_store(path)
    named = f"feature store {path} (chunk 3: {chunk_file(path, 3)})"
    for read, where in ((store.to_numpy, named), (lambda: mean_abs_diff(store, data()), named),
                        (lambda: mean_abs_diff(store.to_dask().map_blocks(lambda z: z), data()), "a feature store")):
        with pytest.raises(StoreError) as caught:
            read()
        message = str(caught.value)
        assert message.startswith(f"{where} is damaged: a chunk does not decode"), message
        assert "Delete the store and run `repsurgery extract`" in message and "`repsurgery verify`" in message


def test_an_error_of_code_mapped_over_a_store_is_not_taken_for_damage(tmp_path):
    store = open_store(write(tmp_path / "s.zarr", data()))

    def broken(z):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        mean_abs_diff(store.to_dask().map_blocks(broken, dtype=np.float32), data())


def test_bad_writes_and_specs_are_refused(tmp_path):
    w = open_writer(tmp_path / "s.zarr", n_rows=50, dim=6, chunk_rows=8)
    x = data()
    with pytest.raises(ValueError, match="not on chunk boundaries"):
        w.write(0, x[:5])
    with pytest.raises(ValueError, match=r"row 8.*holds 0"):
        w.write(8, x[8:16])
    with pytest.raises(ValueError, match="shape"):
        w.write(0, x[:8, :5])
    assert w.rows_written == 0
    with pytest.raises(ValueError, match="float64"):
        open_writer(tmp_path / "t.zarr", n_rows=5, dim=2, dtype="float64")
    for bad in ({"n_rows": 0}, {"dim": 0}, {"chunk_rows": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            open_writer(tmp_path / "t.zarr", **{"n_rows": 5, "dim": 2, **bad})


def test_mean_abs_diff_streams_and_matches_numpy(tmp_path):
    x, y = data(100, 7, seed=1), data(100, 7, seed=2)
    a = open_store(write(tmp_path / "a.zarr", x, chunk_rows=16))
    b = open_store(write(tmp_path / "b.zarr", y, chunk_rows=16))
    want = np.abs(x.astype(np.float64) - y).mean()
    for left, right in [(a, b), (a, y), (x, b), (x, y), (a.to_dask(), da.from_array(y, chunks=(30, 7)))]:
        assert mean_abs_diff(left, right) == pytest.approx(want, rel=1e-12)
    assert mean_abs_diff(a, a) == 0.0
    with pytest.raises(ValueError, match=r"\(100, 7\).*\(99, 7\)"):
        mean_abs_diff(a, y[:99])


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import numpy as np
    from cache import open_writer
    x = np.random.default_rng(0).standard_normal((80, 6)).astype(np.float32)
    w = open_writer({path!r}, n_rows=80, dim=6, chunk_rows=8, attrs={attrs!r})
    for start in range(0, 80, 8):
        w.write(start, x[start:start + 8])
        print(w.rows_written, flush=True)
        time.sleep(0.3)
    w.finalize()
""")


def test_sigkilled_writer_resumes_to_a_bit_identical_store(tmp_path):
    path = tmp_path / "killed.zarr"
    script = CHILD.format(root=str(ROOT), path=str(path), attrs=ATTRS)
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as child:
        try:
            for line in child.stdout:
                if int(line) >= 16:  # at least two chunks are on disk
                    break
        finally:
            os.kill(child.pid, signal.SIGKILL)
        errors = child.stderr.read()
    assert child.returncode == -signal.SIGKILL, errors
    assert not path.exists()
    x = data(80, 6)
    with pytest.raises(MissingStoreError, match="of 80 rows"):
        open_store(path)
    w = open_writer(path, n_rows=80, dim=6, chunk_rows=8, attrs=ATTRS)
    assert 16 <= w.rows_written < 80
    w.write(w.rows_written, x[w.rows_written:])
    resumed = open_store(w.finalize(), expect=ATTRS, deep=True)
    fresh = open_store(write(tmp_path / "fresh.zarr", x), deep=True)
    assert resumed.attrs["sha256"] == fresh.attrs["sha256"]
    np.testing.assert_array_equal(resumed.to_numpy(), fresh.to_numpy())
    assert json.loads((path / "zarr.json").read_text())["attributes"]["rows_written"] == 80


def test_a_full_disk_while_writing_is_one_error_and_the_rows_written_before_stay(tmp_path):
    """A file-size limit stands in for a full disk (the same errno path): the write fails with a
    StoreError naming the store, and the writer resumes from the rows that made it to disk."""
    script = textwrap.dedent(f"""
        import resource, numpy as np
        from cache import StoreError, open_writer
        x = np.random.default_rng(0).standard_normal((2000, 64)).astype(np.float32)
        w = open_writer({str(tmp_path / 's.zarr')!r}, n_rows=2000, dim=64, chunk_rows=1000, attrs={{}})
        w.write(0, x[:1000])
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))  # < one chunk
        try:
            w.write(1000, x[1000:])
        except StoreError as exc:
            print(exc)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "could not write rows [1000, 2000) of feature store" in done.stdout and "resume" in done.stdout
    x = np.random.default_rng(0).standard_normal((2000, 64)).astype(np.float32)
    w = open_writer(tmp_path / "s.zarr", n_rows=2000, dim=64, chunk_rows=1000, attrs={})
    assert w.rows_written == 1000
    w.write(1000, x[1000:])
    np.testing.assert_array_equal(open_store(w.finalize(), deep=True).to_numpy(), x)


def test_a_store_another_process_is_writing_is_refused_until_that_process_ends(tmp_path):
    """Two extractions of one store would append to the same `.partial`: the second is refused,
    naming the first; once the first has ended, even by SIGKILL, the store is free again."""
    path = tmp_path / "busy.zarr"
    script = CHILD.format(root=str(ROOT), path=str(path), attrs=ATTRS)
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as child:
        try:
            next(child.stdout)  # the child holds the store
            with pytest.raises(StoreError, match=rf"{path} is being written by another process \(pid {child.pid}\)"):
                open_writer(path, n_rows=80, dim=6, chunk_rows=8, attrs=ATTRS)
        finally:
            os.kill(child.pid, signal.SIGKILL)
    x = data(80, 6)
    written = write(path, x, chunk_rows=8)
    np.testing.assert_array_equal(open_store(written, deep=True).to_numpy(), x)
    assert not list(tmp_path.glob("*.lock")) and not list(tmp_path.glob("*.partial"))
