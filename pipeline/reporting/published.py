"""The accuracies published for each checkpoint family (pipeline/assets/published.json), and a
run's comparison with them: numbers are comparable only within one family (the Surgery paper's
tables come from the Task Arithmetic release, FusionBench's from its own Hub fine-tunes).

A real run names its family in params (`source.family`); evaluate then records, per entry with a
published row, that row beside the run's figures, and flags each task whose zero-shot or
individual accuracy lies far below the published one: how a label-order, preprocessing or
checkpoint mismatch shows on an otherwise plausible run. No torch here: params validation reads it.
"""
from __future__ import annotations

import functools
import json
from importlib import resources

OWN = "own"        # checkpoints of no published family: nothing to compare with
FAR_BELOW = 10.0   # points below the published per-task figure that count as a problem (FusionBench's
                   # own re-evaluations of the same checkpoints moved zero-shot figures by up to 8.1)
SURGERY = "+surgery"


@functools.cache
def _table() -> dict:
    return json.loads(resources.files("pipeline").joinpath("assets/published.json").read_text())


def families() -> list[str]:
    return [*_table()["families"], OWN]


def arch_key(arch: str | None) -> str | None:
    """open_clip's architecture name as the published tables name it (ViT-B-32-quickgelu -> ViT-B-32)."""
    return arch.removesuffix("-quickgelu") if arch else None


def tasks(family: str) -> list[str]:
    """The tasks a family's rows hold, in order (the eight image tasks unless it names its own)."""
    table = _table()
    return table["families"].get(family, {}).get("tasks", table["tasks"])


def rows(family: str, arch: str | None, figure: str = "acc") -> dict[str, dict[str, float]]:
    """key (`+surgery` suffixed for surgery rows) -> {task: %, ..., "avg": %}, the figures the source
    prints (some print only the average); {} where nothing is published. `figure`: acc, or bias
    (the representation bias of Eq. 1, where the family publishes it)."""
    family_rows = _table()["families"].get(family, {})
    published = (family_rows.get("bias", {}) if figure == "bias" else family_rows).get(arch_key(arch) or "", {})
    return {key: {name: v for name, v in zip([*tasks(family), "avg"], values) if v is not None}
            for key, values in published.items()}


def merge_params(family: str) -> dict[str, dict]:
    """merge key -> the settings the family's reference code runs it with (its preset writes them)."""
    return _table()["families"].get(family, {}).get("merge_params", {})


def describe(family: str, arch: str | None) -> dict:
    """What metrics.json records of where the published figures come from."""
    info = _table()["families"].get(family, {})
    return {"family": family, "arch": arch_key(arch), "checkpoints": info.get("checkpoints", ""),
            "source": info.get("source", "")}


def comparable(row: dict[str, float], figure: dict[str, float], family: str) -> dict[str, float]:
    """The published figures for the run's tasks; the average only where the run has all of the
    family's tasks."""
    out = {t: v for t, v in row.items() if t in figure and t != "avg"}
    if set(figure) - {"avg"} == set(tasks(family)) and "avg" in row:
        out["avg"] = row["avg"]
    return out


def far_below(run: dict[str, float], published: dict[str, float]) -> dict[str, float]:
    """Tasks where the run is more than FAR_BELOW points under the published figure: task -> published %."""
    return {t: v for t, v in published.items() if t != "avg" and run[t] < v - FAR_BELOW}
