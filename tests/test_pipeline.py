"""End to end on the tiny world: what a user relies on after `dvc repro`."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import BIN, cli, params_with, run

METHODS = ["weight_averaging", "task_arithmetic", "ties_merging", "tw_adamerging", "lw_adamerging"]


def test_repro_writes_metrics_for_every_method_and_task(world):
    metrics = json.loads((world / "results" / "metrics.json").read_text())
    assert set(metrics) == {"pretrained", "individual", *METHODS}
    for method in METHODS:
        assert set(metrics[method]) == {"acc", "surgery_acc", "bias", "surgery_bias"}
        for table in metrics[method].values():
            assert set(table) == {"digits", "colors", "positions", "avg"}
    assert 0 <= metrics["individual"]["acc"]["avg"] <= 100
    assert "| Individual |" in (world / "results" / "accuracy.md").read_text()


def test_surgery_reduces_representation_bias(world):
    metrics = json.loads((world / "results" / "metrics.json").read_text())
    for method in METHODS:
        assert metrics[method]["surgery_bias"]["avg"] < metrics[method]["bias"]["avg"], method


def test_accuracy_from_cached_features_equals_running_the_merged_encoder(world, monkeypatch):
    monkeypatch.chdir(world)
    from pipeline import clip_model, data
    from pipeline.heads import logits
    from stages.common import DATA, HEADS, PRETRAINED, merged_path
    from stages.features import open_features

    encoder = clip_model.image_encoder(PRETRAINED, load_file(str(merged_path("ties_merging"))))
    dataset = data.ImageDataset(DATA, "colors", "test", clip_model.preprocess_for(clip_model.read_spec(PRETRAINED)))
    with torch.no_grad():
        live = torch.cat([encoder(x) for x in data.loader(dataset, 50)])
    cached = torch.from_numpy(open_features("ties_merging", "colors").to_numpy())
    assert torch.allclose(live, cached, atol=1e-5)
    head = load_file(str(HEADS))["colors"]
    live_acc = (logits(live, head).argmax(1).numpy() == dataset.labels).mean() * 100
    metrics = json.loads((world / "results" / "metrics.json").read_text())
    assert metrics["ties_merging"]["acc"]["colors"] == pytest.approx(live_acc, abs=1e-3)


def test_rank_experiment_reruns_only_surgery_and_evaluation(world):
    done = run([str(BIN / "dvc"), "exp", "run", "-S", "surgery.rank=8"], world)
    ran = {line.split("'")[1] for line in done.stdout.splitlines() if line.startswith("Running stage")}
    # the analyses that use the pipeline's rank follow it; the rank sweep and the baselines stay cached
    reading_rank = {f"analysis-{a}" for a in ("loss", "data-ratio", "online", "curve", "bias", "tsne")}
    assert ran == {f"surgery@{m}" for m in METHODS} | {"evaluate"} | reading_rank, done.stdout
    diff = run([str(BIN / "dvc"), "metrics", "diff", "--json"], world)
    assert "surgery_acc" in diff.stdout
    run([str(BIN / "dvc"), "exp", "apply", "--help"], world)  # dvc exp tooling is usable


def test_unknown_method_is_refused_with_the_valid_names(world):
    done = cli(world, "merge", "fisher")
    assert done.returncode == 1
    assert "unknown merge method 'fisher'" in done.stderr and "ties_merging" in done.stderr


def test_unknown_task_is_refused(world, tmp_path):
    params = params_with(world, tmp_path / "p.yaml", tasks=["digits", "sudoku"])
    done = cli(world, "surgery", "task_arithmetic", "--params", str(params))
    assert done.returncode == 1 and "unknown task 'sudoku'" in done.stderr


def test_non_positive_rank_is_refused(world, tmp_path):
    params = params_with(world, tmp_path / "p.yaml", surgery__rank=0)
    done = cli(world, "surgery", "task_arithmetic", "--params", str(params))
    assert done.returncode == 1 and "surgery.rank must be a positive integer" in done.stderr


def test_missing_and_mismatched_checkpoints_are_named(world, tmp_path):
    project = tmp_path / "copy"
    shutil.copytree(world, project, symlinks=True)
    (project / "models" / "finetuned" / "colors.safetensors").unlink()
    done = cli(project, "merge", "task_arithmetic")
    assert done.returncode == 1 and "colors.safetensors does not exist" in done.stderr
    state = load_file(str(world / "models" / "finetuned" / "digits.safetensors"))
    state["proj"] = torch.zeros(7, 3)
    from safetensors.torch import save_file
    save_file(state, str(project / "models" / "finetuned" / "colors.safetensors"))
    done = cli(project, "merge", "task_arithmetic")
    assert done.returncode == 1
    assert "'proj' has shape (7, 3)" in done.stderr and "needs (32, 32)" in done.stderr
    assert not (project / "models" / "merged" / "task_arithmetic.safetensors.tmp").exists()


def test_interrupted_store_is_refused_and_nothing_looks_complete(world, tmp_path):
    project = tmp_path / "copy"
    shutil.copytree(world, project, symlinks=True)
    store = project / "features" / "ties_merging" / "colors-test.zarr"
    shutil.move(store, store.with_name(store.name + ".partial"))
    done = cli(project, "surgery", "ties_merging")
    assert done.returncode == 1
    assert "colors-test.zarr" in done.stderr and "repsurgery extract ties_merging" in done.stderr
    assert json.loads((project / "results" / "metrics.json").read_text()) == \
        json.loads((world / "results" / "metrics.json").read_text())


def test_store_of_another_encoder_is_refused(world, tmp_path):
    project = tmp_path / "copy"
    shutil.copytree(world, project, symlinks=True)
    params_with(project, project / "params.yaml", merge__ties_merging__k=50)
    assert cli(project, "merge", "ties_merging").returncode == 0  # merged again, features now stale
    done = cli(project, "surgery", "ties_merging")
    assert done.returncode == 1
    assert "encoder_fingerprint" in done.stderr and "repsurgery extract ties_merging" in done.stderr
    surgery_before = (world / "models" / "surgery" / "ties_merging.safetensors").read_bytes()
    assert (project / "models" / "surgery" / "ties_merging.safetensors").read_bytes() == surgery_before


def test_adamerging_coefficients_are_clamped_and_recorded(world):
    tw = json.loads((world / "models" / "merged" / "tw_adamerging.json").read_text())
    lw = json.loads((world / "models" / "merged" / "lw_adamerging.json").read_text())
    assert np.array(tw["lambdas"]).shape == (3, 1)
    assert np.array(lw["lambdas"]).shape == (3, len(lw["keys"]))
    assert all(0 <= v <= 1 for row in lw["lambdas"] for v in row)
