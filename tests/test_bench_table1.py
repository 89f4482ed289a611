"""`repsurgery bench-table1`: the paper preset's whole run on a generated stand-in, every stage
timed and projected to the real split sizes. Run end to end through the stage's function on a
tiny open_clip config and two of the paper's tasks (the command's own default is ViT-B/32 on
all eight), with `--quick`."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import cli
from pipeline import config
from pipeline.benchmarks.table1 import duration, table
from pipeline.data.catalog import PAPER_TASKS
from pipeline.errors import PipelineError
from pipeline.merging import registry
from test_real_source import CONFIG

TASKS = ["eurosat", "dtd"]  # the two smallest test splits


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """(params, result, the JSON written) of one quick run."""
    import stages.presets
    from pipeline.models import clip
    from stages.bench import bench_table1

    out = tmp_path_factory.mktemp("table1") / "bench-table1.json"
    preset = stages.presets.paper_params

    def two_tasks(name: str) -> dict:
        params = preset(name)
        params["tasks"] = TASKS
        return params

    tiny = clip.spec_from_open_clip(config=CONFIG)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread each, here and in the merge processes, beside other tests
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(stages.presets, "paper_params", two_tasks)
            patch.setattr(clip, "spec_from_open_clip", lambda arch: tiny)
            result = bench_table1(torch.device("cpu"), scale=1e-3, quick=True, out=out)
    finally:
        torch.set_num_threads(threads)
    return config.validate(two_tasks("paper-vit-b-32")), result, json.loads(out.read_text())


def test_every_preset_merge_entry_is_run_and_learned_ones_are_projected_from_their_steps(bench):
    params, result, _ = bench
    merges = {m["key"]: m for m in result["merges"]}
    assert list(merges) == params.methods
    learned = 0
    for key, m in merges.items():
        preset = params.merge_entry(key).params.model_dump()
        schedules = [name for name in registry.SCHEDULES if name in preset]
        assert m["measured_s"] == pytest.approx(m["load_s"] + m["wall_s"], abs=2e-3), key
        assert m["projected_s"] >= m["measured_s"] > 0, key
        if not schedules:
            assert m["kind"] in ("in full", "images scaled", "iterations"), key
            if m["kind"] == "in full":
                assert m["projected_s"] == pytest.approx(m["measured_s"], abs=2e-3), key
            continue
        learned += 1
        assert m["kind"] == "learned" and m["schedule"] == {n: preset[n] for n in schedules}, key
        # a warm-up step and one measured step (--quick) per schedule, each loop its own length
        assert sorted(m["ran"].values()) == list(range(2, 2 + len(schedules))), key
        steps = sum(m["s_per_step"][n] * preset[n] for n in schedules)
        assert m["projected_s"] == pytest.approx(m["fixed_s"] + steps * m["images_factor"], rel=1e-3, abs=0.01), key
    assert learned >= 2  # AdaMerging and Concrete at least


def test_extraction_covers_every_task_through_every_encoder_and_is_projected_by_images(bench):
    params, result, _ = bench
    jobs = {e["job"]: e for e in result["extraction"]}
    for task in TASKS:
        job = jobs[task]
        assert job["encoders"] == 2 + len(params.methods)  # pretrained, its individual, every merge entry
        assert (job["images"], job["full_images"]) == (2, PAPER_TASKS[task].test_images)
        split = job["split_s"]
        work = split["decode_wait"] + split["forward"] + split["write"]
        assert job["projected_s"] == pytest.approx(work * job["full_images"] / job["images"] + split["other"],
                                                   rel=1e-2, abs=0.05)
    router = jobs["router images (train)"]
    assert router["encoders"] == len(params.methods)
    assert router["full_images"] == params.router.images * len(TASKS)


def test_projected_total_is_the_sum_of_the_stages_and_the_json_is_written(bench):
    params, result, written = bench
    assert written == json.loads(json.dumps(result))
    assert written["projected_s"]["merge"] == pytest.approx(sum(m["projected_s"] for m in written["merges"]), abs=0.01)
    assert written["measured_s"]["extract"] == pytest.approx(sum(e["wall_s"] for e in written["extraction"]), abs=0.01)
    assert written["projected_total_s"] == pytest.approx(sum(written["projected_s"].values()), abs=0.01)
    # surgery and evaluate run on stores of the real sizes: measured, projected as is
    for stage in ("surgery", "evaluate"):
        assert written[stage]["projected_s"] == written[stage]["wall_s"] > 0
    assert written["surgery"]["steps"] == params.surgery.steps
    assert written["evaluate"]["rows"] == sum(PAPER_TASKS[t].test_images for t in TASKS)
    assert {"device", "torch_threads", "cpu_count"} <= set(written["machine"])
    assert set(written["load_average"]) == {"before", "after"} and written["settings"]["quick"]
    assert written["preset"] == "paper-vit-b-32"
    text = table(written)  # what the command prints
    assert all(f"| merge {key} (" in text for key in params.methods)
    assert text.endswith(f"projected total wall time at scale 1: {duration(written['projected_total_s'])} "
                         "(--quick: a smoke test, its projections are rough)")


def test_bad_input_is_one_line_not_a_traceback(tmp_path):
    done = cli(tmp_path, "bench-table1", "--scale", "0", "--out", str(tmp_path / "x.json"))
    assert done.returncode == 1 and "scale must be above 0" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()
    from stages.bench import bench_table1

    with pytest.raises(PipelineError, match="unknown open_clip architecture 'ViT-Nope'"):
        bench_table1(torch.device("cpu"), "ViT-Nope", out=tmp_path / "x.json")
