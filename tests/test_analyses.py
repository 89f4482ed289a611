"""The analyses on the tiny world: every `repsurgery analyze NAME` ran inside the fixture's
`dvc repro`; here we check their tables, plots and figures, and that they agree with the
pipeline's own surgery where their settings coincide."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from tests.conftest import BIN, TINY, analysed, cli, copy_project, env

TASKS = TINY["tasks"]
BASELINES = ["pretrained", "individual", "mtl"]
SETTINGS = {
    "rank": [f"r={r}" for r in TINY["analyses"]["rank"]["ranks"]],
    "loss": ["L1", "Neg. cosine"],
    "data-ratio": ["10%", "100%"],
    "online": ["online 10%", "online 50%", "online 100%"],
}


def read(world, name: str) -> list[dict]:
    with open(world / "results" / "analyses" / name / "table.csv") as handle:
        return list(csv.DictReader(handle))


def cell(rows, method, setting, column="avg") -> float:
    return float(next(r for r in rows if r["method"] == method and r["setting"] == setting)[column])


@pytest.mark.parametrize("name", ["rank", "loss", "data-ratio", "online"])
def test_sweep_tables_have_baselines_then_each_method_without_and_with_every_setting(world, name):
    rows = read(world, name)
    assert list(rows[0]) == ["method", "setting", *TASKS, "avg"]
    expected = [(b, "") for b in BASELINES] + [(m, s) for m in analysed(name) for s in ["", *SETTINGS[name]]]
    assert [(r["method"], r["setting"]) for r in rows] == expected
    md = (world / "results" / "analyses" / name / "table.md").read_text().splitlines()
    assert md[0] == "| method | Digits | Colors | Positions | Avg |" and len(md) == 2 + len(rows)
    assert "| Traditional MTL |" in "\n".join(md)
    with open(world / "results" / "analyses" / name / "plot.csv") as handle:
        plot = list(csv.DictReader(handle))
    assert len(plot) == len(SETTINGS[name]) and list(plot[0])[1:] == analysed(name)
    for suffix in ("png", "svg"):
        assert (world / "results" / "analyses" / name / f"figure.{suffix}").stat().st_size > 1000


def test_sweeps_reproduce_the_pipelines_surgery_at_its_own_settings(world):
    """At the pipeline's settings (the tiny world's analyses study the same ones), r=4, L1, 100% of
    the data and the curve's last step are exactly the pipeline's surgery."""
    assert TINY["surgery"]["adapter"] == "surgery" and TINY["surgery"]["seeds"] == [TINY["analyses"]["surgery"]["seed"]]
    assert TINY["analyses"]["surgery"] == {k: v for k, v in TINY["surgery"].items() if k not in ("adapter", "seeds")} \
        | {"seed": TINY["surgery"]["seeds"][0]}  # the analyses' adapter: the paper's, by default
    metrics = json.loads((world / "results" / "metrics.json").read_text())
    rank, ratio, loss = read(world, "rank"), read(world, "data-ratio"), read(world, "loss")
    curve, steps = read(world, "curve"), TINY["analyses"]["surgery"]["steps"]
    checks = [(rank, "rank", f"r={TINY['analyses']['surgery']['rank']}"), (loss, "loss", "L1"),
              (ratio, "data-ratio", "100%"), (curve, "curve", f"step {steps}")]
    for rows, name, setting in checks:
        for method in analysed(name):
            for task in TASKS:
                assert cell(rows, method, setting, task) == pytest.approx(metrics[method]["surgery_acc"][task], abs=0.01)
                without = (curve, "step 0") if name == "curve" else (rows, "")
                assert cell(*without[:1], method, without[1], task) == pytest.approx(metrics[method]["acc"][task],
                                                                                       abs=0.01)


def test_adapters_are_compared_with_the_oracle_and_routed_as_the_pipeline_scores_them(world):
    """Every registered adapter (and none) on each entry, three ways: the oracle's task id on the
    full split, routed, and the oracle on the images the router is scored on; the paper's
    surgery and no surgery there are exactly the pipeline's figures (same settings, router)."""
    from pipeline.surgery import adapters

    rows, metrics = read(world, "adapters"), json.loads((world / "results" / "metrics.json").read_text())
    titles = ["no surgery", *(cls.label for cls in adapters.available().values())]
    modes = ["oracle", "routed", "oracle, same images"]
    assert {(r["method"], r["setting"]) for r in rows} == {(m, f"{t}, {mode}") for m in analysed("adapters")
                                                           for t in titles for mode in modes}
    figures = {"no surgery, oracle": "acc", "no surgery, routed": "routed_acc",
               "no surgery, oracle, same images": "heldout_acc", "Surgery, oracle": "surgery_acc",
               "Surgery, routed": "routed_surgery_acc", "Surgery, oracle, same images": "heldout_surgery_acc"}
    for method in analysed("adapters"):
        for setting, figure in figures.items():
            for task in TASKS:
                assert cell(rows, method, setting, task) == pytest.approx(metrics[method][figure][task], abs=0.01)
        for title in titles:  # without the oracle, never better than with it on the same images
            assert cell(rows, method, f"{title}, routed") <= cell(rows, method, f"{title}, oracle, same images")
    summary = (world / "results" / "analyses" / "adapters" / "summary.md").read_text().splitlines()
    assert len(summary) == 2 + len(analysed("adapters")) and all(f"{t} (routed)" in summary[0] for t in titles)
    assert (world / "results" / "analyses" / "adapters" / "figure.png").stat().st_size > 1000


def test_curve_is_evaluated_every_n_steps(world):
    rows = read(world, "curve")
    every, steps = TINY["analyses"]["curve"]["eval_every"], TINY["analyses"]["surgery"]["steps"]
    expected = [f"step {s}" for s in range(0, steps + 1, every)]
    for method in analysed("curve"):
        assert [r["setting"] for r in rows if r["method"] == method] == expected


def test_baselines_match_the_evaluation_and_mtl_is_a_real_encoder(world):
    metrics = json.loads((world / "results" / "metrics.json").read_text())
    rows = read(world, "baselines")
    assert [r["method"] for r in rows] == BASELINES
    for base in ("pretrained", "individual"):
        assert cell(rows, base, "") == pytest.approx(metrics[base]["acc"]["avg"], abs=0.01)
    assert len(list((world / "features" / "mtl").glob("*-test.zarr"))) == len(TASKS)
    assert (world / "models" / "mtl" / "encoder.safetensors").exists()


def test_bias_table_is_eq1_without_and_with_surgery_per_task(world):
    metrics = json.loads((world / "results" / "metrics.json").read_text())
    rows = read(world, "bias")
    assert [(r["method"], r["setting"]) for r in rows] == [(m, s) for m in analysed("bias") for s in ("", "surgery")]
    for method in analysed("bias"):
        for task in TASKS:
            assert cell(rows, method, "", task) == pytest.approx(metrics[method]["bias"][task], abs=1e-4)
            assert cell(rows, method, "surgery", task) == pytest.approx(metrics[method]["surgery_bias"][task],
                                                                       abs=1e-4)
    assert (world / "results" / "analyses" / "bias" / "figure.png").exists()


def test_tsne_draws_every_task_without_and_with_surgery(world):
    out = world / "results" / "analyses" / "tsne"
    assert (out / "task_arithmetic.png").stat().st_size > 1000 and (out / "task_arithmetic.svg").exists()
    with open(out / "panels.csv") as handle:
        panels = list(csv.DictReader(handle))
    assert [(p["task"], p["variant"]) for p in panels] == [(t, v) for t in TASKS for v in ("merged", "merged + surgery")]
    assert all(int(p["points"]) == 2 * TINY["analyses"]["tsne"]["samples"] for p in panels)


def test_dvc_plots_are_declared_and_render(world, tmp_path):
    done = subprocess.run([str(BIN / "dvc"), "plots", "show", "-o", str(tmp_path / "plots"),
                           "--json"], cwd=world, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert not shown.get("errors"), shown.get("errors")
    titles = list(shown["data"])
    for paper, name in {"Table 8": "rank", "Table 9": "loss", "Table 4": "data-ratio", "Table 5": "online",
                        "Fig. 7": "curve"}.items():
        plots = [t for t in titles if paper in t]  # Table 9: one plot per entry
        values = [v for plot in plots for v in shown["data"][plot][0]["content"]["data"]["values"]]
        drawn = {v.get("field") for v in values} | {key for v in values for key in v}  # one y column: no `field`
        assert plots and drawn >= set(analysed(name)), paper
    for plot in (t for t in titles if "Table 9" in t):  # bars: a number against the loss names, or nothing is drawn
        encoding = shown["data"][plot][0]["content"]["encoding"]
        assert encoding["y"]["field"] == "loss" and encoding["x"]["type"] == "quantitative", encoding
    from stages.plots import FIGURES

    tsne = analysed("tsne")
    assert sorted(t for t in titles if t.endswith(".png")) == sorted(
        [f"results/analyses/{name}/figure.png" for name in FIGURES] + [f"results/analyses/tsne/{m}.png" for m in tsne])


def test_analyses_run_on_cached_features_without_any_encoder_code(world, tmp_path):
    """`analyze rank` with open_clip made unimportable: no encoder can have run."""
    project = copy_project(world, tmp_path / "copy")
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, *a):\n"
            "        if name.split('.')[0] in ('open_clip', 'torchvision'): raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from stages.cli import app\n"
            "sys.argv = ['repsurgery', 'analyze', 'rank']\n"
            "app()\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=project, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "analysis rank:" in done.stdout
    assert read(project, "rank") == read(world, "rank")  # deterministic, too
    for name in ("figure.png", "figure.svg", "plot.csv"):
        assert (project / "results/analyses/rank" / name).read_bytes() == \
            (world / "results/analyses/rank" / name).read_bytes(), name


def test_unknown_analysis_and_bad_settings_are_refused(world, tmp_path):
    done = cli(world, "analyze", "fig99")
    assert done.returncode == 1 and "unknown analysis 'fig99'" in done.stderr and "data-ratio" in done.stderr
    params = dict(TINY, analyses={**TINY["analyses"], "loss": {"losses": ["l1", "hinge"]}})
    import yaml

    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    done = cli(world, "analyze", "loss", "--params", str(tmp_path / "p.yaml"))
    assert done.returncode == 1 and "`analyses.loss.losses.1` = 'hinge'" in done.stderr and "'l1'" in done.stderr
