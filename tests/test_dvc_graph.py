"""dvc.yaml is generated from params where it must be, names no merge method, and every
stage depends on the fingerprint of the code it runs, so a code change can never leave stale
results (tests/test_extending.py: what an edit re-runs)."""
from __future__ import annotations

from pathlib import Path

import yaml

from pipeline import config, provenance, workspace
from stages import check
from stages.plots import PLOTS_FILE, section

ROOT = Path(__file__).resolve().parents[1]


def stages() -> dict[str, dict]:
    body = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in body.items()}


def test_every_stage_depends_on_the_fingerprint_of_the_code_it_runs(monkeypatch):
    """Stage `check` fingerprints each command's import closure (a merge entry's with its
    method's module); every other stage depends on its command's fingerprint, and lists no code
    folder besides (that would re-run it for code it does not run)."""
    monkeypatch.chdir(ROOT)
    commands = set(check.stage_commands())
    for name, stage in stages().items():
        command, deps = stage["cmd"].split()[1], stage.get("deps", [])
        if stage.get("always_changed"):
            continue
        fingerprint = ("results/fingerprints/${key}.json" if command == "merge"
                       else str(workspace.command_fingerprint(command)))
        assert fingerprint in deps, (name, deps)
        assert command == "merge" or command in commands
        code = [d for d in deps if d.split("/")[0] in provenance.PROJECT and not d.startswith("pipeline/assets")]
        assert not code, f"stage {name} lists code folders {code}: its fingerprint covers the code it runs"


def test_a_command_fingerprint_holds_every_module_it_imports_and_only_those():
    evaluate = provenance.describe(check.command_modules("evaluate"))["files"]
    assert {"stages/evaluate.py", "pipeline/reporting/metrics.py", "cache/store.py"} <= set(evaluate)
    assert not any(f.startswith("pipeline/merging/") or f == "pipeline/reporting/tsne.py" for f in evaluate)
    assert "pipeline/reporting/tsne.py" in provenance.describe(check.command_modules("analyze"))["files"]


def test_dvc_lock_holds_only_the_pipelines_stages():
    """DVC keeps the entries of removed stages and parses dvc.lock many times per command."""
    live = set()
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        live |= {f"{name}@{key}" for key in config.load(ROOT / "params.yaml").merge} if "foreach" in stage else {name}
    locked = set(yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"])
    assert locked <= live, f"stale dvc.lock entries: {sorted(locked - live)}"


def test_dvc_yaml_names_no_merge_method_and_the_plots_follow_the_params():
    text = (ROOT / "dvc.yaml").read_text()
    params = config.load(ROOT / "params.yaml")
    from pipeline.merging import registry

    for name in [*registry.available(), *params.methods]:
        assert name not in text, name
    assert (ROOT / PLOTS_FILE).read_text() == section(params), "results/dvc.yaml is stale: run `repsurgery plots`"
