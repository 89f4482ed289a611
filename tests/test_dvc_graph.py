"""dvc.yaml is generated from params where it must be, names no merge method, and every
stage depends on all the code it runs, so a code change can never leave stale results."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import yaml

from pipeline import config
from stages.plots import PLOTS_FILE, section

ROOT = Path(__file__).resolve().parents[1]
# Modules whose changes cannot change a stage's outputs: the command dispatcher, progress bars,
# params validation (the values it checks are DVC params) and the error type.
NOT_RESULTS = {"stages.cli", "stages.common", "pipeline.config", "pipeline.errors"}


def module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imported(tree: ast.AST) -> set[str]:
    """Every project module an AST imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            submodules = [f"{node.module}.{a.name}" for a in node.names]
            names = submodules if all(module_file(n) for n in submodules) else [node.module]
        out |= {n for n in names if n.split(".")[0] in ("pipeline", "stages", "cache") and module_file(n)}
    return out


def closure(start: set[str]) -> set[Path]:
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name in seen or name in NOT_RESULTS:
            continue
        seen.add(name)
        todo += imported(ast.parse(module_file(name).read_text()))
    return {module_file(n).relative_to(ROOT) for n in seen}


def command_modules(command: str) -> set[str]:
    import typer.main

    from stages.cli import app

    callback = typer.main.get_command(app).commands[command].callback
    return imported(ast.parse(inspect.getsource(inspect.unwrap(callback)).strip()))


def stages() -> dict[str, dict]:
    body = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in body.items()}


def test_every_stage_depends_on_all_the_code_it_runs():
    missing = {}
    for name, stage in stages().items():
        command = stage["cmd"].split()[1]
        deps = [d for d in stage["deps"]]
        files = closure(command_modules(command))
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
