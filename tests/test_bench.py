"""`repsurgery bench`: every figure is written, and the things it compares are the same work."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.benchmarks import decoding, realsize
from pipeline.benchmarks.measure import SavedTensorMeter
from pipeline.models import clip
from tests.conftest import cli

FIGURES = ["surgery_live_over_cached", "rank_sweep_over_one_live_run", "extract_overhead", "decode_once_speedup",
           "adamerging_memory_ratio", "adamerging_step_ratio", "adamerging_grouped_ratio",
           "surgery_sequential_over_batched"]


def test_quick_bench_writes_every_figure(world, tmp_path):
    out = tmp_path / "bench.json"
    cli(world, "bench", "--quick", "--out", str(out), check=True)
    result = json.loads(out.read_text())
    for key in FIGURES:
        assert result[key]["ratio"] > 0, key
    assert {"device", "torch_threads", "cpu_count"} <= set(result["machine"])
    assert result["rank_sweep_over_one_live_run"]["ranks"] == [4, 8, 16, 32, 64]
    assert set(result["extract_overhead"]["split_s"]) == {"decode", "forward", "write", "other"}
    # live surgery (encoders run on each step's images) trains the adapters cached surgery trains
    assert result["surgery_live_over_cached"]["max_weight_difference_live_vs_cached"] < 1e-4
    # all graphs alive hold more activations than one task's graph at a time
    assert result["adamerging_memory_ratio"]["task_by_task_bytes"] < result["adamerging_memory_ratio"]["all_graphs_bytes"]


def test_bench_merges_reports_time_and_memory_per_entry_and_task_count(world, tmp_path):
    out = tmp_path / "bench-merges.json"
    cli(world, "bench-merges", "concrete_task_arithmetic", "--tasks", "1", "--tasks", "2", "--steps", "1",
        "--out", str(out), check=True)
    runs = json.loads(out.read_text())["runs"]
    assert [(r["key"], r["tasks"]) for r in runs] == [("concrete_task_arithmetic", 1), ("concrete_task_arithmetic", 2)]
    assert all(r["wall_s"] > 0 and r["peak_mib"] >= 0 and r["schedule"] == {"steps": 1} for r in runs)


def test_saved_tensor_meter_counts_live_activations_once_and_frees_them():
    x = torch.randn(1000, requires_grad=True)
    meter = SavedTensorMeter(persistent=[x])
    with meter():
        a = x.exp()       # saves its result: 4000 bytes
        b = a.exp() * a   # saves b's exp result (4000) and a again (already counted), and the product's operands
        loss = b.sum()
    assert meter.peak == pytest.approx(8000, abs=0)
    loss.backward()
    del a, b, loss
    assert meter.current == 0


TINY_CONFIG = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16, "layers": 1,
                                               "head_width": 8},
               "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 16, "heads": 2, "layers": 1}}


def test_real_size_bench_runs_the_extraction_path_and_reports_consistent_figures():
    """The real-size benchmark's code path on a tiny open_clip config and a few small JPEGs."""
    result = realsize.run({"tiny": clip.spec_from_open_clip(config=TINY_CONFIG)}, torch.device("cpu"), images=6,
                          workers=1, batch_size=4, repeats=2, size=(40, 30), tasks=2, images_per_task=2, steps=1,
                          decode="torchvision")
    json.dumps(result)  # what the stage writes
    f = result["archs"]["tiny"]
    assert f["images"] == 6 and f["feature_dim"] == 16 and result["settings"]["workers"] == 1
    rates = {part: f[f"{part}_images_per_s"] for part in ("decode", "forward", "extract")}
    for part, rate in rates.items():
        assert rate > 0 and rate == pytest.approx(6 / f["seconds"][part], rel=0.01), part
    assert f["bound"] == min(("decode", "forward"), key=rates.get)
    assert f["extract_over_bound"] == pytest.approx(rates["extract"] / rates[f["bound"]], rel=0.01)
    assert set(f["extract_split_s"]) == {"decode_wait", "forward", "write", "other"}
    assert 0 < f["extract_over_own_forward"] <= 1  # its encoder calls are part of the extraction
    memory, step = f["adamerging_memory_ratio"], f["adamerging_step_ratio"]
    assert (memory["tasks"], memory["images_per_task"]) == (2, 2)
    assert memory["ratio"] == pytest.approx(memory["task_by_task_bytes"] / memory["all_graphs_bytes"], rel=1e-3)
    half = 5e-5  # the step times are rounded to 4 decimals, the ratio from the unrounded ones
    a, b = step["task_by_task_step_s"], step["all_graphs_step_s"]
    assert step["ratio"] > 0 and (a - half) / (b + half) - half <= step["ratio"] <= (a + half) / (b - half) + half
    assert 0 < memory["task_by_task_bytes"] < memory["all_graphs_bytes"]
    assert "| tiny (0 M) | 1 |" in realsize.table(result)


def test_decode_bench_times_every_decoder_at_every_worker_count_and_compares_their_pixels():
    spec = clip.spec_from_open_clip(config=TINY_CONFIG)
    result = decoding.run(spec, torch.device("cpu"), images=12, batch_size=2, repeats=1, workers=[0, 1, 2],
                          decode=["pil", "torchvision"])
    json.dumps(result)
    assert [(r["decode"], r["workers"]) for r in result["runs"]] == [
        (d, w) for d in ("pil", "torchvision") for w in (0, 1, 2)]
    for r in result["runs"]:  # 6 batches keep at most 6 / MIN_BATCHES_PER_WORKER workers busy
        assert r["images_per_s"] > 0 and r["startup_s"] < r["total_s"]
        assert r["busy"] == (6 >= decoding.MIN_BATCHES_PER_WORKER * max(1, r["workers"]))
    rate = {(r["decode"], r["workers"]): r["images_per_s"] for r in result["runs"]}
    assert result["speedup"]["pil: 2 workers / 1"] == pytest.approx(rate["pil", 2] / rate["pil", 1], rel=1e-2)
    assert result["pixels_against_pil"]["torchvision"]["max_levels"] <= 2
