"""A mistake is one clear line and loses nothing: a wrong param stops `dvc repro` before any
output is deleted, a broken method names its file and line, a method's bad result is refused
before anything is written, and what an interrupted extraction leaves is reported and cleared."""
from __future__ import annotations

import ast
import hashlib
import re
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline import config
from tests.conftest import BIN, ROOT, cli, copy_project, run
from tests.test_extending import own_code


def one_line_error(done) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("key, value, message", [
    ("merge.task_arithmetic.scaling", "a lot", "`merge.task_arithmetic.scaling` = 'a lot'"),
    ("analyses.tsne.iterations", 100, "`analyses.tsne.iterations` = 100"),
])
def test_a_params_mistake_stops_dvc_repro_before_any_output_is_deleted(world, tmp_path, key, value, message):
    project = copy_project(world, tmp_path / "copy")
    before = {name: digests(project / name) for name in ("models", "results")}
    params = yaml.safe_load((project / "params.yaml").read_text())
    *parents, leaf = key.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[leaf] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = run([str(BIN / "dvc"), "repro"], project, check=False)
    assert done.returncode != 0 and message in done.stderr
    assert re.findall(r"Running stage '([^']+)'", done.stdout) == ["check"]
    assert {name: digests(project / name) for name in ("models", "results")} == before


def test_params_are_read_by_the_yaml_rules_dvc_reads_them_by(tmp_path):
    """YAML 1.2, as DVC: `5e-1` is a number (PyYAML's YAML 1.1 reads a string)."""
    from tests.conftest import TINY

    text = yaml.safe_dump({**TINY, "surgery": {**TINY["surgery"], "lr": "LR"}}, sort_keys=False)
    (tmp_path / "params.yaml").write_text(text.replace("lr: LR", "lr: 5e-1"))
    assert config.load(tmp_path / "params.yaml").surgery.lr == 0.5


BROKEN = {
    "syntax": ("x = 1\ny = = 2\n", "SyntaxError: invalid syntax"),
    "import": ("import numpy\nimport no_such_package_here\n", "ModuleNotFoundError: No module named "
                                                                 "'no_such_package_here'"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_broken_method_module_is_one_line_naming_its_file_and_line(world, tmp_path, kind):
    project = copy_project(world, tmp_path / "copy")
    extra_env = own_code(project)
    source, error = BROKEN[kind]
    path = project / "pipeline" / "merging" / "methods" / "broken.py"
    path.write_text(source)
    line = one_line_error(cli(project, "list", "methods", extra_env=extra_env))
    assert f"pipeline.merging.methods.broken does not load: {path}:2" in line and error in line


EXPLODES = '''
from pipeline.merging.registry import Merged, merge_method


@merge_method("explode", label="Explode")
def explode(inputs, *, how: str = "raise"):
    state = dict(inputs.pretrained)
    if how == "raise":
        return 1 / 0
    if how == "missing":
        del state["proj"]
    if how == "shape":
        state["proj"] = state["proj"][:1]
    return Merged(state, {"tensor": inputs.pretrained["proj"]} if how == "info" else {})
'''


@pytest.mark.parametrize("how, expected", [
    ("raise", "merge entry 'boom': merge method 'explode' ({file}) failed: {file}:9: ZeroDivisionError: division by "
              "zero (set REPSURGERY_DEBUG=1 for the full traceback)"),
    ("missing", "returned a state dict whose keys are not the pretrained encoder's: missing proj"),
    ("shape", "returned 'proj' as (1, 32) torch.float32; the pretrained encoder's is (32, 32) torch.float32"),
    ("info", "returned an `info` JSON cannot hold (info['tensor'] is a Tensor)"),
])
def test_a_method_that_fails_or_returns_a_bad_result_is_one_line_and_nothing_is_written(world, tmp_path, how,
                                                                                       expected):
    project = copy_project(world, tmp_path / "copy")
    extra_env = own_code(project)
    path = project / "pipeline" / "merging" / "methods" / "explode.py"
    path.write_text(textwrap.dedent(EXPLODES))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["merge"]["boom"] = {"method": "explode", "how": how}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    line = one_line_error(cli(project, "merge", "boom", extra_env=extra_env))
    assert expected.format(file=path) in line, line
    assert not list((project / "models" / "merged").glob("boom.*"))
    if how == "raise":  # the whole traceback on demand
        done = cli(project, "--debug", "merge", "boom", extra_env=extra_env)
        assert done.returncode == 1 and "Traceback" in done.stderr and "ZeroDivisionError" in done.stderr


def test_what_an_interrupted_extraction_leaves_is_reported_and_cleared_by_the_next_one(world, tmp_path):
    project = copy_project(world, tmp_path / "copy")
    store = next((project / "features" / "merged").glob("*/*-test.zarr"))
    partial, lock = store.with_name(store.name + ".partial"), store.with_name(store.name + ".lock")
    partial.mkdir()
    (partial / "zarr.json").write_text("{}")
    lock.write_text("12345")
    shown = partial.relative_to(project)
    for command in ("verify", "doctor"):
        done = cli(project, command)
        assert f"{shown}: left by an interrupted extraction: the next `repsurgery extract`" in done.stderr, done.stderr
    done = cli(project, "extract", check=True)
    assert not partial.exists() and not lock.exists() and f"removed {shown}: left by an interrupted" in done.stdout
    assert "interrupted" not in cli(project, "verify", check=True).stderr


def test_every_package_the_code_imports_is_a_declared_dependency():
    """A dependency or an extra the code names when it is missing (the text family's transformers)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [d for name, deps in project["optional-dependencies"].items() if name != "test" for d in deps]
    declared = {re.split(r"[<>=\[ ]", d)[0].lower().replace("_", "-") for d in [*project["dependencies"], *extras]}
    distribution = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml", "open_clip": "open-clip-torch",
                    "ruamel": "ruamel.yaml"}
    imported = set()
    for folder in ("pipeline", "stages", "cache"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"pipeline", "stages", "cache"}
    missing = {m for m in third_party if distribution.get(m, m).lower().replace("_", "-") not in declared}
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


def test_the_version_shows_from_a_source_checkout_without_installed_metadata(monkeypatch):
    from importlib import metadata

    from typer.testing import CliRunner

    from stages.cli import app

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    done = CliRunner().invoke(app, ["--version"])
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert done.exit_code == 0 and done.output.strip() == f"repsurgery {version} (source checkout, not installed)"
