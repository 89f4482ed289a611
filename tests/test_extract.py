"""Extraction: one decode for every encoder, only stale stores recomputed, and a two-worker
Dask cluster writing exactly the stores the single-process path writes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np

from cache import open_store, open_writer
from tests.conftest import BIN, TINY, analysed, cli, copy_project, env, params_with, run

TASKS, METHODS = TINY["tasks"], list(TINY["merge"])
ENCODERS = ["pretrained", "individual", *(f"merged/{m}" for m in METHODS)]
# pretrained and merged on every task, individual on its own; each merge entry's of the router's train images
N_STORES = len(TASKS) * (1 + len(METHODS)) + len(TASKS) + len(METHODS)


def stores(project: Path) -> dict[str, Path]:
    """The extract stage's stores (features/mtl/ belongs to the mtl stage)."""
    found = sorted((project / "features").glob("*/*.zarr")) + sorted((project / "features").glob("merged/*/*.zarr"))
    return {str(p.relative_to(project / "features")): p for p in found
            if str(p.parent.relative_to(project / "features")) in ENCODERS}


def chunk_bytes(store: Path) -> dict[str, bytes]:
    return {str(f.relative_to(store)): f.read_bytes() for f in sorted((store / "features" / "c").rglob("*"))
            if f.is_file()}


def test_one_extract_stage_writes_every_encoders_stores(world):
    got = stores(world)
    assert {name.rsplit("/", 1)[0] for name in got} == set(ENCODERS)
    assert len(got) == N_STORES
    attrs = open_store(got["merged/ties_merging/colors-test.zarr"]).attrs
    assert {"encoder_fingerprint", "dataset_fingerprint", "preprocess", "n_rows", "dtype", "code_version",
            "autocast", "extraction_version", "complete", "sha256"} <= set(attrs)
    labels = json.loads((world / "features" / "labels" / "colors-test.json").read_text())
    assert len(labels["labels"]) == attrs["n_rows"]


def test_two_dask_workers_write_the_single_process_stores_byte_for_byte(world, tmp_path):
    project = copy_project(world, tmp_path / "copy")
    shutil.rmtree(project / "features")
    # One store was interrupted after its first chunk: the cluster must resume it, not restart it.
    reference = open_store(world / "features" / "individual" / "digits-test.zarr")
    resumed = project / "features" / "individual" / "digits-test.zarr"
    writer = open_writer(resumed, n_rows=reference.n_rows, dim=reference.dim, chunk_rows=reference.chunk_rows,
                         attrs={k: v for k, v in reference.attrs.items()
                                if k not in ("n_rows", "dim", "dtype", "chunk_rows", "code_version",
                                             "rows_written", "complete", "sha256")})
    writer.write(0, reference.read(0, reference.chunk_rows))
    writer.close()
    done = cli(project, "extract", "--workers", "2", check=True)
    assert f"{N_STORES} feature stores of" in done.stdout
    want, got = stores(world), stores(project)
    assert list(got) == list(want)
    for name, path in want.items():
        assert open_store(got[name], deep=True).attrs == open_store(path).attrs, name
        assert chunk_bytes(got[name]) == chunk_bytes(path), name
    assert not list(project.glob("features/**/*.partial"))


def test_changing_one_merge_recomputes_only_that_methods_stores(world, tmp_path):
    project = copy_project(world, tmp_path / "copy")
    before = {name: json.loads((p / "zarr.json").read_text())["attributes"] for name, p in stores(project).items()}
    done = run([str(BIN / "dvc"), "exp", "run", "-S", "merge.ties_merging.k=50"], project)
    ran = {line.split("'")[1] for line in done.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"check", "merge@ties_merging", "extract", "surgery", "evaluate", "analyses"}, done.stdout
    assert (f"extract: {len(TASKS) + 1} feature stores to compute (merged/ties_merging), "  # test split, router's
            f"{N_STORES - len(TASKS) - 1} up to date") in done.stdout
    assert "surgery weight_averaging: up to date" in done.stdout  # only the changed entry's adapters retrain
    for name in ("rank", "loss", "data-ratio", "online", "curve", "adapters", "bias", "tsne"):  # those that run on it
        assert (f"analysis {name}: up to date" in done.stdout) == ("ties_merging" not in analysed(name)), name
    after = {name: json.loads((p / "zarr.json").read_text())["attributes"] for name, p in stores(project).items()}
    assert set(after) == set(before)
    for name in before:
        changed = after[name]["encoder_fingerprint"] != before[name]["encoder_fingerprint"]
        assert changed == name.startswith("merged/ties_merging/"), name
    store = Path("features/merged/ties_merging/digits-test.zarr")
    assert not np.array_equal(open_store(project / store, deep=True).to_numpy(), open_store(world / store).to_numpy())


def test_the_routers_train_images_are_encoded_by_the_merge_entries_as_params_router_says(world, tmp_path):
    train = {name: path for name, path in stores(world).items() if name.endswith("router-train.zarr")}
    assert sorted(name.rsplit("/", 1)[0] for name in train) == sorted(f"merged/{m}" for m in METHODS)  # one each
    assert {open_store(path).n_rows for path in train.values()} == {TINY["router"]["images"] * len(TASKS)}
    project = copy_project(world, tmp_path / "copy")
    params_with(project, project / "params.yaml", router__images=TINY["router"]["images"] // 2)
    done = cli(project, "extract", check=True)  # only the router's stores are recomputed
    assert f"extract: {len(train)} feature stores to compute" in done.stdout
    assert {open_store(project / "features" / name).n_rows for name in train} == \
        {TINY["router"]["images"] // 2 * len(TASKS)}
    params_with(project, project / "params.yaml", router__split="test")  # fitted on test images: none needed
    done = cli(project, "extract", check=True)
    assert "extract: 0 feature stores to compute" in done.stdout
    assert not [name for name in stores(project) if name.endswith("router-train.zarr")]
    cli(project, "evaluate", check=True)  # and evaluation routes without them
    metrics = json.loads((project / "results" / "metrics.json").read_text())["task_arithmetic"]
    assert metrics["heldout_acc"] != metrics["acc"]  # scored on the test images it was not fitted on


def test_a_new_dtype_recomputes_the_stores_instead_of_keeping_float32_ones(world, tmp_path):
    project = copy_project(world, tmp_path / "copy")
    params_with(project, project / "params.yaml", extract__dtype="float16")
    done = cli(project, "extract", check=True)
    assert f"extract: {N_STORES} feature stores to compute" in done.stdout
    assert all(open_store(p).dtype == "float16" for p in stores(project).values())


def test_another_decoder_recomputes_the_stores_and_records_it(world, tmp_path):
    """torchvision decoding on the device (nvjpeg where it is a GPU) makes its own stores; the world's
    32 px PNGs decode and resize alike, so their features are PIL's."""
    project = copy_project(world, tmp_path / "copy")
    params_with(project, project / "params.yaml", extract__decode="device")
    done = cli(project, "extract", check=True)
    assert f"extract: {N_STORES} feature stores to compute" in done.stdout
    for name, path in stores(project).items():
        store, before = open_store(path), open_store(stores(world)[name])
        assert store.attrs["decode"] == "device" and "decode" not in before.attrs
        np.testing.assert_allclose(store.read(0, store.n_rows), before.read(0, before.n_rows), atol=1e-5)


def test_unknown_encoder_is_refused(world):
    done = cli(world, "extract", "fisher")
    assert done.returncode == 1
    assert "unknown encoder 'fisher'" in done.stderr and "ties_merging" in done.stderr


def _partial_progress(project: Path) -> list[int]:
    rows = []
    for attrs in project.glob("features/**/*.zarr.partial/zarr.json"):
        try:
            rows.append(json.loads(attrs.read_text())["attributes"]["rows_written"])
        except (OSError, ValueError, KeyError):
            pass  # being written right now
    return rows


def test_sigkilled_extract_command_resumes_to_the_uninterrupted_stores(world, tmp_path):
    fresh, killed = tmp_path / "fresh", tmp_path / "killed"
    for project in (fresh, killed):
        shutil.copytree(world, project, symlinks=True)
        shutil.rmtree(project / "features")
        params_with(project, project / "params.yaml", extract__batch_size=16)  # more chunks to be killed between
    cli(fresh, "extract", check=True)
    child = subprocess.Popen([str(BIN / "repsurgery"), "extract"], cwd=killed, env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not any(_partial_progress(killed)) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read()
    interrupted = _partial_progress(killed)
    n_test = TINY["world"]["n_test"]
    assert interrupted and all(rows < n_test for rows in interrupted) and len(stores(killed)) < N_STORES
    done = cli(killed, "surgery", "ties_merging")  # nothing half-written is trusted meanwhile
    assert done.returncode == 1 and "repsurgery extract" in done.stderr
    cli(killed, "extract", check=True)
    want, got = stores(fresh), stores(killed)
    assert list(got) == list(want) and not list(killed.glob("features/**/*.partial"))
    assert not list(killed.glob("features/**/*.lock"))
    for name, path in want.items():
        assert open_store(got[name], deep=True).attrs == open_store(path).attrs, name
        assert chunk_bytes(got[name]) == chunk_bytes(path), name


def test_a_store_being_written_by_another_process_is_one_line_and_free_once_it_ends(world, tmp_path):
    project = copy_project(world, tmp_path / "copy")
    store = project / "features" / "pretrained" / f"{TASKS[0]}-test.zarr"
    shutil.rmtree(store)
    holder = subprocess.Popen([str(BIN / "python"), "-c", "import sys, time; from cache import open_writer; "
                               f"open_writer({str(store)!r}, n_rows=1, dim=1); print(flush=True); time.sleep(60)"],
                              cwd=project, env=env(), stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        done = cli(project, "extract", "pretrained")
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: {store.relative_to(project)} is being written by another process (pid {holder.pid}): wait for it "
        "to finish (or stop it), then run the command again"]
    cli(project, "extract", "pretrained", check=True)
    assert open_store(store, deep=True).attrs == open_store(world / store.relative_to(project)).attrs


def test_truncated_store_is_refused_by_the_stages_that_read_it(world, tmp_path):
    project = copy_project(world, tmp_path / "copy")
    store = project / "features" / "individual" / "colors-test.zarr"
    next(f for f in (store / "features" / "c").rglob("*") if f.is_file()).unlink()
    done = cli(project, "evaluate")
    assert done.returncode == 1
    assert "colors-test.zarr is truncated" in done.stderr and "repsurgery extract individual" in done.stderr


def test_a_chunk_damaged_on_disk_is_named_by_the_stage_that_reads_it_and_by_verify(world, tmp_path):
    project = copy_project(world, tmp_path / "copy")
    store = Path("features") / "merged" / METHODS[0] / f"{TASKS[-1]}-test.zarr"
    chunk = store / "features" / "c" / "1" / "0"
    (project / chunk).write_bytes(b"\x00not blosc" * 8)
    metrics = (project / "results" / "metrics.json").read_bytes()
    done = cli(project, "evaluate")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert f"feature store {store} (chunk 1: {chunk}) is damaged: a chunk does not decode" in line, line
    assert "`repsurgery verify`" in line and (project / "results" / "metrics.json").read_bytes() == metrics
    done = cli(project, "verify")
    n_stores = len(TASKS) * (len(ENCODERS) + 1) + len(METHODS)  # and Traditional MTL's, and the router's
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert [line for line in done.stderr.splitlines() if line] == [
        f"  feature store {store} is damaged: its data no longer match the checksum recorded when it was written. "
        f"Fix: run `repsurgery extract {METHODS[0]}` (or `dvc repro extract` for every encoder).",
        f"error: 1 of {n_stores} feature stores failed the check (above, each with its fix)"]
    assert cli(world, "verify", check=True).stdout.strip().endswith("every chunk matches its checksum")


def test_each_encoder_is_built_once_however_many_a_job_holds(tmp_path):
    """The paper preset runs 18 encoders per task: more than the process keeps by default, and
    the next task's job needs 17 of them again."""
    import collections
    import functools

    import torch

    from pipeline.features.extraction import MAX_BUILT, Job, Ref, Target, extract, forget_built

    builds = collections.Counter()

    def encoder(key: str) -> torch.nn.Module:
        builds[key] += 1
        torch.manual_seed(len(key))
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))

    def data(task: int) -> torch.utils.data.Dataset:
        return torch.utils.data.TensorDataset(torch.randn(5, 3, 2, 2) + task)

    shared = [f"merged/{i}" for i in range(MAX_BUILT + 1)]
    jobs = [Job(Ref(f"data:{task}", functools.partial(lambda t: [x for (x,) in data(t)], task)), 5,
                [Target(Ref(name, functools.partial(encoder, name)), tmp_path / f"{task}-{name.replace('/', '_')}.zarr",
                        {"task": task}) for name in [*shared, f"individual/{task}"]], f"task {task}")
            for task in range(3)]
    forget_built()
    extract(jobs, dim=4, batch_size=2, device=torch.device("cpu"))
    assert set(builds.values()) == {1} and len(builds) == len(shared) + 3
