"""Published AdaMerging coefficients, read from the authors' tables instead of relearned.

The AdaMerging and Surgery authors publish the coefficients they learned as `ralpha` tables
in `src/merging_cofficient.py` (EnnengYang/RepresentationSurgery, EnnengYang/AdaMerging), one
per (method, model), e.g. `method == 'lw_adamerging' and model == 'ViT-B-32'`. A table is one
row (task-wise) or one row per tensor of their flattened ImageEncoder state dict, in its order
(`pipeline.models.clip.reference_layout`: the visual tower plus six text-side tensors whose task
vectors are zero: 158 rows for ViT-B/32 and B/16, 302 for L/14); each row is [1.0 (the
pretrained weights), lambda_1, ..., lambda_T], tasks in their order. That file is parsed as
text (`ast`), never executed. A JSON file works too: {"rows": [...]} in the same layout, with
an optional "names" list that is then checked against the layout name by name.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import torch

from pipeline.errors import PipelineError


def authors_tables(source: str) -> dict[tuple[str, str], list]:
    """Every literal `ralpha = [[...]]` under an `if method == ... and model == ...` branch."""
    tables = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.If):
            continue
        test = {c.left.id: c.comparators[0].value for c in ast.walk(node.test)
                if isinstance(c, ast.Compare) and isinstance(c.left, ast.Name) and isinstance(c.ops[0], ast.Eq)
                and isinstance(c.comparators[0], ast.Constant)}
        for stmt in node.body:
            if (isinstance(stmt, ast.Assign) and {"method", "model"} <= test.keys()
                    and any(isinstance(t, ast.Name) and t.id == "ralpha" for t in stmt.targets)):
                try:
                    tables[(test["method"], test["model"])] = ast.literal_eval(stmt.value)
                except ValueError:  # rows written with names (the WA / TA rows): nothing learned there
                    continue
    return tables


def read_rows(path: Path, table: str, model: str | None) -> tuple[list, list[str] | None]:
    """The rows (and, for a JSON table that names them, the names) of `table` for `model`."""
    if not path.is_file():
        raise PipelineError(f"coefficient table {path} does not exist (params `coefficients`, relative to the project "
                            "root): give the authors' src/merging_cofficient.py or a JSON table")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise PipelineError(f"coefficient table {path} is not valid JSON ({exc})") from None
        if not isinstance(data, dict) or "rows" not in data:
            raise PipelineError(f'coefficient table {path}: expected {{"rows": [[1.0, lambda_1, ...], ...], '
                                '"names": [...] (optional)}}')
        return data["rows"], data.get("names")
    if model is None:
        raise PipelineError(f"coefficient table {path}: the pretrained model is not a named open_clip architecture; "
                            "set the entry's `coefficients_model` to the table's model (e.g. ViT-B-32)")
    try:
        tables = authors_tables(path.read_text())
    except SyntaxError as exc:
        raise PipelineError(f"coefficient table {path} is neither JSON nor Python source (line {exc.lineno}: "
                            f"{exc.msg})") from None
    if (table, model) not in tables:
        found = ", ".join(f"{m}/{a}" for m, a in tables) or "none"
        raise PipelineError(f"coefficient table {path} has no `ralpha` table for method {table!r} and model {model!r} "
                            f"(tables found: {found}); set the entry's `coefficients_model` or use another method")
    return tables[(table, model)], None


def lambdas(path: Path, *, table: str, model: str | None, layout: dict[str, int], keys: list[str], tasks: int,
            layer_wise: bool) -> torch.Tensor:
    """The table as AdaMerging's (tasks, len(keys)) coefficients (tasks, 1 when task-wise), `keys`
    being this project's image-encoder tensors (the layout's `visual.*` names without the prefix)."""
    rows, names = read_rows(path, table, model)
    where = f"coefficient table {path} ({table}/{model})"
    try:
        rows = torch.tensor(rows, dtype=torch.float64)
    except (TypeError, ValueError):
        raise PipelineError(f"{where}: rows must be lists of numbers of equal length") from None
    if rows.dim() != 2 or rows.shape[1] != tasks + 1:
        raise PipelineError(f"{where}: rows must be [pretrained coefficient, one per task] = {tasks + 1} numbers for "
                            f"the {tasks} tasks of params (in their order); found shape {tuple(rows.shape)}")
    if not torch.all(rows[:, 0] == 1):
        raise PipelineError(f"{where}: the first column (the pretrained weights' coefficient) must be 1.0 in every row")
    if rows[:, 1:].min() < 0 or rows[:, 1:].max() > 1:
        raise PipelineError(f"{where}: coefficients must lie in [0, 1], as AdaMerging clamps them")
    wanted = len(layout) if layer_wise else 1
    if len(rows) != wanted:
        kind = (f"one per tensor of the reference's ImageEncoder state dict ({len(layout)} for this architecture)"
                if layer_wise else "one (task-wise)")
        raise PipelineError(f"{where}: {len(rows)} rows, expected {kind}; a table for another architecture or "
                            "another granularity (set `layer_wise` to match it)")
    if names is not None and list(names) != list(layout):
        first = next((i for i, (a, b) in enumerate(zip(names, layout)) if a != b), min(len(names), len(layout)))
        raise PipelineError(f"{where}: its names differ from the reference layout at row {first} "
                            f"({names[first] if first < len(names) else 'end'!r} vs "
                            f"{list(layout)[first] if first < len(layout) else 'end'!r})")
    if not layer_wise:
        return rows[0, 1:].float().unsqueeze(1)
    row_of = {name.removeprefix("visual."): i for i, name in enumerate(layout) if name.startswith("visual.")}
    missing = [k for k in keys if k not in row_of]
    if missing:
        raise PipelineError(f"{where}: no row for the image encoder's tensor(s) {', '.join(missing[:3])}: the pretrained "
                            "model is not the architecture the table was learned on")
    return rows[[row_of[k] for k in keys], 1:].T.float().contiguous()
