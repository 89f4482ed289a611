"""dvc.yaml is generated from params where it must be, names no merge method, and every
stage depends on all the code it runs, so a code change can never leave stale results."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import yaml

from pipeline import config, provenance
from stages.plots import PLOTS_FILE, section

ROOT = Path(__file__).resolve().parents[1]


def command_modules(command: str) -> set[str]:
    import typer.main

    from stages.cli import app

    callback = typer.main.get_command(app).commands[command].callback
    tree = ast.parse(inspect.getsource(inspect.unwrap(callback)).strip())
    return {f"{node.module}.{a.name}" if provenance.module_file(f"{node.module}.{a.name}") else node.module
            for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
            and node.module.split(".")[0] in provenance.PROJECT for a in node.names}


def stages() -> dict[str, dict]:
    body = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in body.items()}


def test_every_stage_depends_on_all_the_code_it_runs():
    """Through its folders, or, for a merge entry, through the fingerprint of its code that stage
    `check` writes (tests/test_extending.py: what an edit re-runs)."""
    missing = {}
    for name, stage in stages().items():
        command = stage["cmd"].split()[1]
        deps = [d for d in stage.get("deps", [])]
        if any(d.startswith("results/fingerprints/") for d in deps) or stage.get("always_changed"):
            continue
        files = {p.relative_to(ROOT) for p in provenance.closure(command_modules(command)).values()}
        uncovered = sorted(str(f) for f in files
                           if not any(str(f) == d or str(f).startswith(d.rstrip("/") + "/") for d in deps))
        if uncovered:
            missing[name] = uncovered
    assert not missing, f"stage code deps missing in dvc.yaml: {missing}"


def test_dvc_yaml_names_no_merge_method_and_the_plots_follow_the_params():
    text = (ROOT / "dvc.yaml").read_text()
    params = config.load(ROOT / "params.yaml")
    from pipeline.merging import registry

    for name in [*registry.available(), *params.methods]:
        assert name not in text, name
    assert (ROOT / PLOTS_FILE).read_text() == section(params), "results/dvc.yaml is stale: run `repsurgery plots`"
