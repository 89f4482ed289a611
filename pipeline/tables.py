"""Result tables in the paper's layout: rows = methods (and settings), columns = tasks + Avg.

A table is a list of rows `{"method": ..., "setting": ..., <task>: acc, ..., "avg": mean}`;
it is written as CSV (for `dvc plots` and pandas) and as Markdown (for reading).
"""
from __future__ import annotations

import csv
import io

LABELS = {
    "pretrained": "Pretrained (zero-shot)", "individual": "Individual", "mtl": "Traditional MTL",
    "weight_averaging": "Weight Averaging", "task_arithmetic": "Task Arithmetic", "ties_merging": "Ties-Merging",
    "tw_adamerging": "Task-wise AdaMerging", "lw_adamerging": "Layer-wise AdaMerging",
}


def label(method: str) -> str:
    return LABELS.get(method, method)


def row(method: str, setting: str, names: list[str], values: list[float], digits: int = 2) -> dict:
    """One table row; `avg` is the unweighted mean over tasks, as in the paper."""
    if len(values) != len(names):
        raise ValueError(f"{len(values)} values for {len(names)} tasks")
    return {"method": method, "setting": setting, **{t: round(v, digits) for t, v in zip(names, values)},
            "avg": round(sum(values) / len(values), digits)}


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def to_markdown(rows: list[dict], names: list[str], digits: int = 1) -> str:
    """Method (with its setting in parentheses) | one column per task | Avg."""
    cols = names + ["avg"]
    lines = ["| method | " + " | ".join("Avg" if c == "avg" else c.capitalize() for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        name = label(r["method"]) + (f" ({r['setting']})" if r["setting"] else "")
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.{digits}f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def wide(rows: list[dict], x: str, xs: dict, value: str = "avg") -> list[dict]:
    """Plot data for `dvc plots`: one row per setting (x value `xs[setting]`), one column per
    method holding the rows' `value`; rows whose setting is not in `xs` (baselines) are left out."""
    out: dict[str, dict] = {}
    for r in rows:
        if r["setting"] in xs:
            out.setdefault(r["setting"], {x: xs[r["setting"]]})[r["method"]] = r[value]
    return list(out.values())
