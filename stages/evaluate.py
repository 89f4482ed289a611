"""Stage: accuracy with and without surgery, and representation bias (Eq. 1), from cached
features only; writes results/metrics.json and a Markdown table."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from pipeline import data, metrics
from stages.common import DATA, HEADS, METHODS, RESULTS, SPLIT, progress, tasks, write_json
from stages.features import open_features
from stages.surgery import load_surgery


def _with_avg(values: dict[str, float]) -> dict[str, float]:
    return {**{k: round(v, 4) for k, v in values.items()}, "avg": round(sum(values.values()) / len(values), 4)}


def methods(params: dict) -> list[str]:
    configured = set(params.get("merge", {})) | set(params.get("adamerging", {}))
    return [m for m in METHODS if m in configured]


def evaluate(params: dict) -> dict:
    names = tasks(params)
    heads = load_file(str(HEADS))
    labels = {t: data.labels(DATA, t, SPLIT) for t in names}
    individual = {t: open_features("individual", t) for t in names}

    def acc(z: torch.Tensor, task: str) -> float:
        return metrics.accuracy(z, heads[task], labels[task])

    def features(store) -> torch.Tensor:
        return torch.from_numpy(store.to_numpy())

    results = {
        "pretrained": {"acc": _with_avg({t: acc(features(open_features("pretrained", t)), t) for t in names})},
        "individual": {"acc": _with_avg({t: acc(features(individual[t]), t) for t in names})},
    }
    for method in progress(methods(params), desc="evaluate", unit="method"):
        surgery = load_surgery(method, names)
        out = {"acc": {}, "surgery_acc": {}, "bias": {}, "surgery_bias": {}}
        for i, task in enumerate(names):
            store = open_features(method, task)
            z = features(store)
            out["acc"][task] = acc(z, task)
            with torch.no_grad():
                out["surgery_acc"][task] = acc(surgery(z, i), task)
            out["bias"][task] = metrics.bias(store, individual[task])
            out["surgery_bias"][task] = metrics.bias(metrics.adapted(store, surgery, i), individual[task])
        results[method] = {k: _with_avg(v) for k, v in out.items()}
    write_json(RESULTS / "metrics.json", results)
    (RESULTS / "accuracy.md").write_text(markdown_table(results, names))
    print(markdown_table(results, names))
    print(f"metrics written to {RESULTS / 'metrics.json'} and {RESULTS / 'accuracy.md'}")
    return results


def markdown_table(results: dict, names: list[str]) -> str:
    """The paper's layout: rows = methods (and +Surgery), columns = tasks + Avg."""
    cols = names + ["avg"]
    lines = ["| method | " + " | ".join(c.capitalize() for c in cols) + " | bias avg |",
             "|---" * (len(cols) + 2) + "|"]

    def row(label, accs, bias=None):
        cells = " | ".join(f"{accs[c]:.1f}" for c in cols)
        return f"| {label} | {cells} | {'' if bias is None else f'{bias:.3f}'} |"

    lines.append(row("Pretrained (zero-shot)", results["pretrained"]["acc"]))
    lines.append(row("Individual", results["individual"]["acc"]))
    for method, r in results.items():
        if method in ("pretrained", "individual"):
            continue
        lines.append(row(method, r["acc"], r["bias"]["avg"]))
        lines.append(row(f"{method} + surgery", r["surgery_acc"], r["surgery_bias"]["avg"]))
    return "\n".join(lines) + "\n"
