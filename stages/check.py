"""Stage `check`, the first of the pipeline, run by every `dvc repro` (always changed): what
must hold before DVC deletes any stage's outputs, and what DVC cannot see by itself.

- params: read and validated whole when the command starts (every section, every merge entry
  against its method's signature), so a mistake stops `dvc repro` here, before any output is
  deleted;
- dependencies: text encoders need transformers (the `text` extra);
- sources: a real source must be complete locally (stage `data` deletes the old data before it
  runs, so an offline `dvc repro` after `repsurgery preset paper-...` stops here with the
  world's data intact) -> results/sources.json;
- code: each merge entry's fingerprint, the digest of the code it runs (its method's module,
  a plugin's included, and what that imports) -> results/fingerprints/KEY.json, which stage
  `merge@KEY` depends on: editing one method re-runs only its entries, and DVC sees a plugin;
  likewise every other stage's command -> results/fingerprints/commands/COMMAND.json, so a
  stage re-runs when code it imports changes and only then (one small dependency instead of
  whole folders: dvc.lock, which DVC parses many times per command, stays small);
- plots: results/dvc.yaml, what `dvc plots show` draws, for the params' merge entries.
Files are rewritten only when their content changes, so the stages after them run only then."""
from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

from pipeline import provenance, workspace
from pipeline.config import Params, read_yaml
from pipeline.merging import registry
from stages.plots import PLOTS_FILE, section, write_plots

PIPELINE_FILE = Path("dvc.yaml")


def check(params: Params) -> None:
    if params.is_text:  # the text family's extra dependency, before any stage deletes its outputs
        from pipeline.models.bert import transformers_module

        transformers_module()
    if params.is_world:
        record = {"source": "world"}
    else:
        from pipeline.data import sources

        record = sources.check(params.source, params.tasks)
    _write(workspace.SOURCES, record)
    print("the miniature world, built offline" if params.is_world else
          f"{len(record)} sources available locally; recorded in {workspace.SOURCES}")
    changed = 0
    for key in params.methods:
        method = registry.get(params.merge_entry(key).method)
        code = {"key": key, "method": method.name, "module": method.module,
                **provenance.describe(command_modules("merge") + (method.module,))}
        changed += _write(workspace.merge_fingerprint(key), code)
    for path in [*workspace.FINGERPRINTS.glob("*.json"), *workspace.MERGE_COSTS.glob("*.json")]:
        if path.stem not in params.merge:  # an entry no longer in the params
            path.unlink()
    for command in stage_commands():
        changed += _write(workspace.command_fingerprint(command),
                          {"command": command, **provenance.describe(command_modules(command))})
    if not PLOTS_FILE.exists() or PLOTS_FILE.read_text() != section(params):  # a new entry gets its plots
        write_plots(params)
    print(f"params valid; the code of {len(params.methods)} merge entries and of every stage fingerprinted in "
          f"{workspace.FINGERPRINTS}/ ({changed} changed)")


def stage_commands() -> list[str]:
    """The repsurgery commands dvc.yaml's stages run, but `check` itself and `merge` (whose code
    is fingerprinted per entry, with its method's); none outside a DVC project."""
    if not PIPELINE_FILE.exists():
        return []
    stages = read_yaml(PIPELINE_FILE)["stages"].values()
    return sorted({stage.get("do", stage)["cmd"].split()[1] for stage in stages} - {"check", "merge"})


def command_modules(command: str) -> tuple[str, ...]:
    """The project modules `repsurgery COMMAND` runs: what its function in stages/cli.py imports
    (each command imports its stage module where it runs, so that the others load nothing)."""
    import typer.main

    from stages.cli import app

    callback = inspect.unwrap(typer.main.get_command(app).commands[command].callback)
    tree = ast.parse(inspect.getsource(callback).strip())
    found = {f"{node.module}.{a.name}" if provenance.module_file(f"{node.module}.{a.name}") else node.module
             for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
             and node.module.split(".")[0] in provenance.PROJECT for a in node.names}
    return tuple(sorted(found))


def _write(path, record: dict) -> bool:
    """Write `record` as JSON unless the file holds it already; whether it was written."""
    try:
        if json.loads(path.read_text()) == record:
            return False
    except (OSError, ValueError):
        pass
    workspace.write_json(path, record)
    return True
