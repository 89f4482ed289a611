"""Result tables in the paper's layout: rows = methods (and settings), columns = tasks + Avg.

A table is a list of rows `{"method": ..., "setting": ..., <task>: acc, ..., "avg": mean}`;
it is written as CSV (pandas, for `dvc plots` and notebooks) and as Markdown (for reading).
Merge entries are shown by their labels (params `merge`, or the registered method's label).
"""
from __future__ import annotations

import pandas as pd

BASELINES = {"pretrained": "Pretrained (zero-shot)", "individual": "Individual", "mtl": "Traditional MTL"}


def label(method: str, labels: dict[str, str]) -> str:
    return labels.get(method) or BASELINES.get(method, method)


def row(method: str, setting: str, names: list[str], values: list[float], digits: int = 2) -> dict:
    """One table row; `avg` is the unweighted mean over tasks, as in the paper."""
    if len(values) != len(names):
        raise ValueError(f"{len(values)} values for {len(names)} tasks")
    return {"method": method, "setting": setting, **{t: round(v, digits) for t, v in zip(names, values)},
            "avg": round(sum(values) / len(values), digits)}


def to_csv(rows: list[dict]) -> str:
    return pd.DataFrame(rows).to_csv(index=False, lineterminator="\n")


def to_markdown(rows: list[dict], names: list[str], labels: dict[str, str], digits: int = 1,
                extra: dict[str, tuple[str, int]] | None = None) -> str:
    """Method (with its setting in parentheses) | one column per task | Avg [| extra columns].

    `extra` maps further row keys to (column title, digits: None for text); their cells may be
    empty (None)."""
    extra = extra or {}
    cols = names + ["avg"]
    lines = ["| method | " + " | ".join("Avg" if c == "avg" else c.capitalize() for c in cols)
             + "".join(f" | {title}" for title, _ in extra.values()) + " |",
             "|---" * (len(cols) + len(extra) + 1) + "|"]
    for r in rows:
        name = r.get("label") or label(r["method"], labels)
        name += f" ({r['setting']})" if r["setting"] else ""
        cells = [f"{r[c]:.{digits}f}" for c in cols] + ["" if r.get(k) is None else str(r[k]) if d is None
                                                        else f"{r[k]:.{d}f}" for k, (_, d) in extra.items()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def wide(rows: list[dict], x: str, xs: dict, value: str = "avg") -> list[dict]:
    """Plot data for `dvc plots`: one row per setting (x value `xs[setting]`), one column per
    method holding the rows' `value`; rows whose setting is not in `xs` (baselines) are left out."""
    out: dict[str, dict] = {}
    for r in rows:
        if r["setting"] in xs:
            out.setdefault(r["setting"], {x: xs[r["setting"]]})[r["method"]] = r[value]
    return list(out.values())
