"""End to end on the tiny world: what a user relies on after `dvc repro`."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import yaml
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import BIN, TINY, cli, copy_project, env, params_with, run

METHODS = list(TINY["merge"])


def test_repro_writes_metrics_for_every_method_and_task(world):
    from pipeline.config import validate

    metrics = json.loads((world / "results" / "metrics.json").read_text())
    assert list(metrics) == ["pretrained", "individual", "mtl", *METHODS]  # mtl: miniature world only
    individual = metrics["individual"]["acc"]
    for method in METHODS:
        figures = {k: v for k, v in metrics[method].items() if k not in ("split", "cost", "surgery")}
        assert set(figures) == {"acc", "surgery_acc", "bias", "surgery_bias", "normalized_acc",
                                "normalized_surgery_acc", "routed_acc", "routed_surgery_acc", "router_acc",
                                "heldout_acc", "heldout_surgery_acc"}  # one seed: no std
        assert metrics[method]["surgery"] == {"adapter": TINY["surgery"]["adapter"], "seeds": TINY["surgery"]["seeds"]}
        # the router learned from train images (TINY `router.split`): routed figures cover the whole test split
        assert figures["heldout_acc"] == figures["acc"] and figures["heldout_surgery_acc"] == figures["surgery_acc"]
        # without the oracle's task id, never better than with it on the same images
        assert figures["routed_acc"]["avg"] <= figures["heldout_acc"]["avg"]
        assert figures["routed_surgery_acc"]["avg"] <= figures["heldout_surgery_acc"]["avg"]
        for table in figures.values():
            assert set(table) == {*TINY["tasks"], "avg"}
        for figure in ("acc", "surgery_acc"):  # the field's normalised accuracy: % of the individual encoders'
            assert figures[f"normalized_{figure}"][TINY["tasks"][0]] == pytest.approx(
                100 * figures[figure][TINY["tasks"][0]] / individual[TINY["tasks"][0]], abs=1e-3)
        cost = metrics[method]["cost"]  # what the merge took, what surgery adds (rank r: 2 d r per task)
        assert cost["merge"]["wall_s"] >= 0 and cost["merge"]["peak_mib"] >= 0 and cost["added_params"]["merge"] == 0
        assert cost["added_params"]["surgery"] == len(TINY["tasks"]) * 2 * TINY["model"]["embed_dim"] * \
            TINY["surgery"]["rank"]
        # the images a data-using merge learned from: its `split` param (each paper's by default)
        assert metrics[method].get("split") == getattr(validate(TINY).merge_entry(method).params, "split", None)
    assert [metrics[k]["split"] for k in ("fisher_merging", "regmean", "concrete_adamerging", "lw_adamerging")] == \
        ["train", "train", "test", "test"]
    assert 0 <= metrics["individual"]["acc"]["avg"] <= 100
    summary = json.loads((world / "results" / "summary.json").read_text())  # what `dvc metrics` shows
    assert summary == {key: {name: values["avg"] for name, values in figures.items()
                             if name in ("acc", "surgery_acc", "bias", "surgery_bias", "routed_acc",
                                         "routed_surgery_acc")} for key, figures in metrics.items()}


def test_tasks_the_individual_or_zero_shot_encoders_get_at_chance_are_flagged_loudly(world, tmp_path):
    """The tiny world's encoders are barely trained, so some are near chance: each such task is
    recorded in metrics.json (with its chance level) and said on the terminal, never averaged."""
    from safetensors.torch import load_file as load_heads

    from pipeline.reporting.metrics import near_chance

    project = copy_project(world, tmp_path / "copy")
    done = cli(project, "evaluate", check=True)
    results = json.loads((project / "results" / "metrics.json").read_text())
    classes = {t: len(h) for t, h in load_heads(str(project / "models" / "heads.safetensors")).items()}
    for encoder in ("individual", "pretrained"):
        expected = near_chance(results[encoder]["acc"], {t: classes[t] for t in TINY["tasks"]})
        assert results[encoder].get("near_chance", {}) == expected
        for task in expected:
            assert f"WARNING: {encoder} accuracy on {task} is" in done.stderr
    assert any(results[e].get("near_chance") for e in ("individual", "pretrained"))  # the tiny world has some
    summary = json.loads((project / "results" / "summary.json").read_text())
    assert summary["individual"] == {"acc": results["individual"]["acc"]["avg"]}


def test_accuracy_table_lists_baselines_then_every_entry_then_every_entry_with_surgery(world):
    from pipeline.config import validate

    labels = validate(TINY).labels()
    table_one, field = (world / "results" / "accuracy.md").read_text().split("\n\n")[:2]
    rows = [line.split(" | ")[0].lstrip("| ") for line in table_one.splitlines()[2:]]
    assert rows == ["Pretrained (zero-shot)", "Individual", "Traditional MTL", *(labels[m] for m in METHODS),
                    *(f"{labels[m]} + surgery" for m in METHODS)]
    # then the field's columns: normalised accuracy, merge cost, parameters surgery adds, per entry
    assert [line.split(" | ")[0].lstrip("| ") for line in field.splitlines()[2:]] == [labels[m] for m in METHODS]
    assert "normalized" in field.splitlines()[0] and "params added by surgery" in field.splitlines()[0]


def test_every_method_records_what_it_learned_beside_its_checkpoint(world):
    info = {m: json.loads((world / "models" / "merged" / f"{m}.json").read_text()) for m in METHODS}
    for key, entry in info.items():
        assert entry["key"] == key and entry["tasks"] == TINY["tasks"] and len(entry["fingerprint"]) == 16
    assert set(info["fisher_merging"]["fisher"]) == set(TINY["tasks"])
    assert all(f["norm"] > 0 and f["images"] == TINY["merge"]["fisher_merging"]["images"]
               for f in info["fisher_merging"]["fisher"].values())
    assert info["regmean"]["layers"] and info["regmean"]["params"]["split"] == "train"
    for key in ("concrete_task_arithmetic", "concrete_adamerging"):
        assert 0 <= info[key]["mask"]["kept"] <= 1 and info[key]["params"]["split"] == "test"
        assert info[key]["mask"]["final"] == "continuous" and info[key]["mask"]["mean_value"] == pytest.approx(1.0)
    for key in ("tw_adamerging", "lw_adamerging", "tw_adamergingpp", "lw_adamergingpp"):
        lambdas = torch.tensor(info[key]["lambdas"])
        assert lambdas.shape[0] == len(TINY["tasks"]) and ((lambdas >= 0) & (lambdas <= 1)).all()  # clamped
    assert len(info["concrete_adamerging"]["lambdas"]) == len(TINY["tasks"])  # unclamped, as the reference
    assert info["mtl_checkpoint"]["format"] and len(info["mtl_checkpoint"]["sha256"]) == 64


def test_a_checkpoint_entry_gives_the_file_it_names_surgery_and_every_result(world):
    """The default world puts surgery on the Traditional MTL encoder through the `checkpoint`
    method: its accuracy without surgery is exactly that encoder's."""
    metrics = json.loads((world / "results" / "metrics.json").read_text())
    assert metrics["mtl_checkpoint"]["acc"] == metrics["mtl"]["acc"]
    assert metrics["mtl_checkpoint"]["surgery_bias"]["avg"] < metrics["mtl_checkpoint"]["bias"]["avg"]


def test_surgery_reduces_representation_bias(world):
    metrics = json.loads((world / "results" / "metrics.json").read_text())
    for method in METHODS:
        assert metrics[method]["surgery_bias"]["avg"] < metrics[method]["bias"]["avg"], method


def test_accuracy_from_cached_features_equals_running_the_merged_encoder(world, monkeypatch):
    monkeypatch.chdir(world)
    from pipeline import workspace
    from pipeline.data import datasets as data
    from pipeline.features.stores import open_features
    from pipeline.models import clip
    from pipeline.models.heads import logits

    encoder = clip.image_encoder(workspace.PRETRAINED, load_file(str(workspace.merged_checkpoint("ties_merging"))))
    dataset = data.ImageDataset(workspace.DATA, "colors", "test",
                                clip.preprocess_for(clip.read_spec(workspace.PRETRAINED)))
    with torch.no_grad():
        live = torch.cat([encoder(x) for x in data.loader(dataset, 50)])
    cached = torch.from_numpy(open_features("merged/ties_merging", "colors").to_numpy())
    assert torch.allclose(live, cached, atol=1e-5)
    head = load_file(str(workspace.HEADS))["colors"]
    live_acc = (logits(live, head).argmax(1).numpy() == dataset.labels).mean() * 100
    metrics = json.loads((world / "results" / "metrics.json").read_text())
    assert metrics["ties_merging"]["acc"]["colors"] == pytest.approx(live_acc, abs=1e-3)


def test_rank_experiment_reruns_only_surgery_and_evaluation(world, tmp_path):
    project = copy_project(world, tmp_path / "copy")
    done = run([str(BIN / "dvc"), "exp", "run", "-S", "surgery.rank=8"], project)
    ran = {line.split("'")[1] for line in done.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"check", "surgery", "evaluate", "analyses"}, done.stdout  # check: first, on every run
    # only the bias analysis reads the pipeline's results; the others study `analyses.surgery`
    assert "analysis bias: " in done.stdout and "analysis bias: up to date" not in done.stdout
    for name in ("baselines", "rank", "loss", "data-ratio", "online", "curve", "adapters", "tsne"):
        assert f"analysis {name}: up to date" in done.stdout, name
    # `dvc metrics diff` leads with the averages (one row per entry and figure); per task on request
    diff = json.loads(run([str(BIN / "dvc"), "metrics", "diff", "--json"], project).stdout)
    assert list(diff) == ["results/summary.json"]
    changed = {name for name, change in diff["results/summary.json"].items() if change.get("diff")}
    assert {f"{key}.surgery_bias" for key in METHODS} <= changed
    assert all(name.rsplit(".", 1)[0] in METHODS for name in changed)
    per_task = json.loads(run([str(BIN / "dvc"), "metrics", "diff", "--json", "--targets", "results/metrics.json"],
                              project).stdout)["results/metrics.json"]
    assert f"weight_averaging.surgery_acc.{TINY['tasks'][0]}" in per_task
    run([str(BIN / "dvc"), "exp", "apply", "--help"], project)  # dvc exp tooling is usable


def test_several_seeds_give_the_mean_and_std_of_what_each_seed_gives(world, tmp_path):
    project = copy_project(world, tmp_path / "copy")
    seed0 = json.loads((world / "results" / "metrics.json").read_text())["task_arithmetic"]
    got = {}
    for seeds in ([0, 1], [1]):
        params_with(project, project / "seeds.yaml", surgery__seeds=seeds)
        cli(project, "surgery", "task_arithmetic", "--params", "seeds.yaml", check=True)
        cli(project, "evaluate", "--params", "seeds.yaml", check=True)
        got[len(seeds)] = json.loads((project / "results" / "metrics.json").read_text())["task_arithmetic"]
        if len(seeds) == 2:
            summary = json.loads((project / "results" / "summary.json").read_text())["task_arithmetic"]
            table = (project / "results" / "accuracy.md").read_text()
    both, seed1 = got[2], got[1]
    assert both["surgery"]["seeds"] == [0, 1] and "surgery_acc_std" not in seed1  # one seed: no std column
    for figure in ("surgery_acc", "routed_surgery_acc", "heldout_surgery_acc", "surgery_bias"):
        for key, value in both[figure].items():
            assert value == pytest.approx((seed0[figure][key] + seed1[figure][key]) / 2, abs=2e-4)
            assert both[f"{figure}_std"][key] == pytest.approx(abs(seed0[figure][key] - seed1[figure][key]) / 2,
                                                               abs=2e-4)
    assert summary["surgery_acc_std"] == both["surgery_acc_std"]["avg"] and "acc_std" not in summary
    assert f"{both['surgery_acc']['avg']:.1f} ± {both['surgery_acc_std']['avg']:.1f}" in table


def test_unknown_merge_entry_is_refused_with_the_valid_names(world):
    done = cli(world, "merge", "fisher")
    assert done.returncode == 1
    assert "no merge entry 'fisher'" in done.stderr and "ties_merging" in done.stderr


def test_unknown_task_is_refused(world, tmp_path):
    params = params_with(world, tmp_path / "p.yaml", tasks=["digits", "sudoku"])
    done = cli(world, "surgery", "task_arithmetic", "--params", str(params))
    assert done.returncode == 1 and "`tasks` = ['sudoku']" in done.stderr and "digits" in done.stderr


def test_non_positive_rank_is_refused(world, tmp_path):
    params = params_with(world, tmp_path / "p.yaml", surgery__rank=0)
    done = cli(world, "surgery", "task_arithmetic", "--params", str(params))
    assert done.returncode == 1 and "`surgery.rank` = 0: input should be greater than 0" in done.stderr


def test_missing_and_mismatched_checkpoints_are_named(world, tmp_path):
    project = copy_project(world, tmp_path / "copy")
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
    assert not [p for p in (project / "models" / "merged").iterdir() if p.name.endswith(".tmp")]


def test_interrupted_store_is_refused_and_nothing_looks_complete(world, tmp_path):
    project = copy_project(world, tmp_path / "copy")
    store = project / "features" / "merged" / "ties_merging" / "colors-test.zarr"
    shutil.move(store, store.with_name(store.name + ".partial"))
    done = cli(project, "surgery", "ties_merging")
    assert done.returncode == 1
    assert "colors-test.zarr" in done.stderr and "repsurgery extract ties_merging" in done.stderr
    assert json.loads((project / "results" / "metrics.json").read_text()) == \
        json.loads((world / "results" / "metrics.json").read_text())


def test_store_of_another_encoder_is_refused(world, tmp_path):
    project = copy_project(world, tmp_path / "copy")
    params_with(project, project / "params.yaml", merge__ties_merging__k=50)
    assert cli(project, "merge", "ties_merging").returncode == 0  # merged again, features now stale
    done = cli(project, "surgery", "ties_merging")
    assert done.returncode == 1
    assert "encoder_fingerprint" in done.stderr and "repsurgery extract ties_merging" in done.stderr
    surgery_before = (world / "models" / "surgery" / "ties_merging.safetensors").read_bytes()
    assert (project / "models" / "surgery" / "ties_merging.safetensors").read_bytes() == surgery_before


def test_features_of_replaced_test_images_are_refused(world, tmp_path):
    """A test shard replaced after extraction: every stage reading the old stores stops, with the fix."""
    project = copy_project(world, tmp_path / "copy")
    task = TINY["tasks"][0]
    shard = sorted((project / "data" / task / "data").glob("test-*.parquet"))[0]
    table = pq.read_table(shard)
    pq.write_table(table.take(list(range(table.num_rows))[::-1]), shard)  # same images, another order
    metrics_before = (project / "results" / "metrics.json").read_bytes()
    for stage in ("evaluate", "surgery", "analyze"):
        done = cli(project, *([stage, "rank"] if stage == "analyze" else [stage]))
        assert done.returncode == 1, (stage, done.stdout)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
        assert f"task {task!r}" in done.stderr or "dataset_fingerprint" in done.stderr, done.stderr
        assert "extract" in done.stderr, done.stderr
    assert (project / "results" / "metrics.json").read_bytes() == metrics_before


def _truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path):
    path.write_bytes(b"not a checkpoint" * 10)


def _deleted(path):
    path.unlink()


def _without_metadata(path):
    from safetensors.torch import save_file

    save_file(load_file(str(path)), str(path))


@pytest.mark.parametrize("damage, file, command, expected", [
    (_truncated, "models/merged/task_arithmetic.safetensors", ["surgery", "task_arithmetic"],
     "Delete it and run `repsurgery merge task_arithmetic`"),
    (_without_metadata, "models/merged/task_arithmetic.safetensors", ["surgery", "task_arithmetic"],
     "lacks this project's metadata (fingerprint)"),
    (_garbage, "models/surgery/weight_averaging.safetensors", ["evaluate"], "Run `repsurgery surgery weight_averaging`"),
    (_truncated, f"models/finetuned/{TINY['tasks'][1]}.safetensors", ["merge", "task_arithmetic"],
     "Run `repsurgery prepare-finetuned`"),
    (_garbage, "models/heads.safetensors", ["evaluate"], "Run `repsurgery heads`"),
    (_deleted, "models/heads.safetensors", ["evaluate"], "does not exist. Run `repsurgery heads`"),
    (_garbage, "models/pretrained/clip.safetensors", ["evaluate"], "run `repsurgery prepare-pretrained`"),
])
def test_a_damaged_checkpoint_is_one_line_naming_it_and_the_command_that_rewrites_it(world, tmp_path, damage, file,
                                                                                    command, expected):
    project = copy_project(world, tmp_path / "copy")
    damage(project / file)
    metrics_before = (project / "results" / "metrics.json").read_bytes()
    done = cli(project, *command)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert file in line and expected in line, line
    assert (project / "results" / "metrics.json").read_bytes() == metrics_before


def test_a_full_disk_during_a_stage_is_one_line_and_keeps_the_previous_output(world, tmp_path):
    """A file-size limit stands in for a full disk: the merge stage stops with one line naming
    the checkpoint, and the checkpoint of the previous run is untouched."""
    import resource
    import subprocess

    project = copy_project(world, tmp_path / "copy")
    params_with(project, project / "params.yaml", merge__task_arithmetic__scaling=0.5)
    target = project / "models" / "merged" / "task_arithmetic.safetensors"
    before = target.read_bytes()
    done = subprocess.run([str(BIN / "repsurgery"), "merge", "task_arithmetic"], cwd=project, env=env(),
                          capture_output=True, text=True,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY)))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: could not write {target.relative_to(project)}: File too large; its previous content is unchanged. "
        "Free disk space (or fix the permissions), then run the command again"]
    assert target.read_bytes() == before and not list(target.parent.glob(".*.tmp"))


def test_an_empty_test_shard_is_refused_by_name(world, tmp_path):
    project = copy_project(world, tmp_path / "copy")
    task = TINY["tasks"][-1]
    shards = project / "data" / task / "data"
    table = pq.read_table(sorted(shards.glob("test-*.parquet"))[0])
    pq.write_table(table.slice(0, 0), shards / "test-99999.parquet")
    done = cli(project, "evaluate")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"task {task!r}: test shard(s) test-99999.parquet" in done.stderr and "hold no images" in done.stderr


def test_switching_to_a_source_that_is_not_fetched_stops_before_any_output_is_replaced(world, tmp_path):
    """DVC deletes a stage's outputs before running it: an offline `dvc repro` after
    `repsurgery preset paper-...` must fail in the first stage, with the world intact."""
    project = copy_project(world, tmp_path / "copy")
    cli(project, "preset", "paper-vit-b-32", check=True)
    params_with(project, project / "params.yaml", source__cache=str(tmp_path / "empty-cache"))
    before = {p: p.stat().st_mtime_ns for p in sorted(project.glob("data/**/*")) + sorted(project.glob("models/**/*"))}
    done = run([str(BIN / "dvc"), "repro"], project, check=False)
    assert done.returncode != 0 and "Traceback" not in done.stdout + done.stderr
    assert "17 of 17 sources named in params `source` are not available locally" in done.stdout + done.stderr
    after = {p: p.stat().st_mtime_ns for p in sorted(project.glob("data/**/*")) + sorted(project.glob("models/**/*"))}
    assert after == before and before
    assert json.loads((project / "results" / "sources.json").read_text()) == {"source": "world"}


def test_adamerging_coefficients_are_clamped_and_recorded(world):
    tw = json.loads((world / "models" / "merged" / "tw_adamerging.json").read_text())
    lw = json.loads((world / "models" / "merged" / "lw_adamerging.json").read_text())
    assert np.array(tw["lambdas"]).shape == (3, 1)
    assert np.array(lw["lambdas"]).shape == (3, len(lw["keys"]))
    assert all(0 <= v <= 1 for row in lw["lambdas"] for v in row)


def test_surgery_and_evaluation_need_only_the_pulled_stores_and_heads(world, tmp_path):
    """The laptop workflow: `dvc pull extract heads` brings features/ and models/heads.safetensors;
    no images, no encoder checkpoints."""
    project = copy_project(world, tmp_path / "copy")
    for gone in ("data", "models/pretrained", "models/finetuned", "models/merged", "models/surgery", "results"):
        shutil.rmtree(project / gone)
    cli(project, "surgery", check=True)
    cli(project, "evaluate", check=True)
    pulled, built = (json.loads((p / "results" / "metrics.json").read_text()) for p in (project, world))
    for key in TINY["merge"]:  # what each merge cost is a measurement of the merge run, not pulled with it
        assert pulled[key]["cost"].pop("merge") is None and built[key]["cost"].pop("merge")["wall_s"] >= 0
    assert pulled == built


@pytest.mark.parametrize("change, message", [
    ({"surgery__rnk": 3}, "`surgery.rnk` is not a known key"),
    ({"surgery__steps": "10"}, "`surgery.steps` = '10': input should be a valid integer"),
    ({"merge__ties_merging__k": 120}, "`merge.ties_merging.k` = 120: input should be less than or equal to 100"),
    ({"merge__lw_adamerging__steps": 0}, "`merge.lw_adamerging.steps` = 0: input should be greater than 0"),
    ({"surgery__loss": "l3"}, "`surgery.loss` = 'l3': input should be 'l1', 'mse', 'smooth_l1' or 'cosine'"),
    ({"tasks": ["digits", "digits"]}, "`tasks` = ['digits', 'digits']: expected each task once"),
    ({"surgery__batch_size": 10_000}, "`surgery.batch_size` = 10000: expected at most the smallest task's"),
    ({"extract__dtype": "float64"}, "`extract.dtype` = 'float64': input should be 'float32' or 'float16'"),
])
def test_params_mistakes_are_one_line_naming_key_value_and_file(world, tmp_path, change, message):
    params = params_with(world, tmp_path / "p.yaml", **change)
    done = cli(world, "surgery", "--params", str(params))
    assert done.returncode == 1 and message in done.stderr and str(params) in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_missing_params_section_is_named(world, tmp_path):
    raw = yaml.safe_load((world / "params.yaml").read_text())
    del raw["surgery"]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    done = cli(world, "evaluate", "--params", str(tmp_path / "p.yaml"))
    assert done.returncode == 1 and "params `surgery` is missing" in done.stderr and "Traceback" not in done.stderr


def test_make_clean_keeps_the_committed_results():
    from tests.conftest import ROOT

    dry = run(["make", "-n", "clean"], ROOT).stdout
    tracked = run(["git", "ls-files"], ROOT).stdout.split()
    removed = [word for line in dry.splitlines() if line.startswith("rm ") for word in line.split()[1:]
               if not word.startswith("-")]
    assert removed and not [path for path in tracked if any(path == r or path.startswith(r.rstrip("/") + "/")
                                                             for r in removed)], dry
