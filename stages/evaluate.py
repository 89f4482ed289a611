"""Stage `evaluate`: accuracy with and without surgery, and representation bias (Eq. 1), from
cached features only -> results/metrics.json, its averages in results/summary.json, and
results/accuracy.md: the paper's Table 1 layout (with the baselines: zero-shot, individual and,
in the miniature world, Traditional MTL), then the field's columns (normalised accuracy, what
each merge cost, the parameters surgery adds)."""
from __future__ import annotations

import json

import torch
import typer

from cache.files import write_text
from pipeline import routing, workspace
from pipeline.config import Params
from pipeline.features.stores import open_features, read_labels, router_fit
from pipeline.models.checkpoints import load_heads
from pipeline.reporting import metrics, published, tables
from pipeline.surgery import adapters
from pipeline.surgery.checkpoints import load_surgery
from stages.common import progress


def _with_avg(values: dict[str, float]) -> dict[str, float]:
    return {**{k: round(v, 4) for k, v in values.items()}, "avg": round(sum(values.values()) / len(values), 4)}


def evaluate(params: Params) -> dict:
    names = params.tasks
    heads = load_heads(workspace.HEADS, names)
    labels = {t: read_labels(t) for t in names}

    def features(encoder: str, task: str) -> torch.Tensor:  # a test split's features fit in memory
        return torch.from_numpy(open_features(encoder, task).to_numpy())

    individual = [features("individual", t) for t in names]
    baselines = ["pretrained", "individual"] + (["mtl"] if params.is_world else [])  # Traditional MTL: world only
    results = {b: {"acc": _with_avg({t: metrics.accuracy(individual[i] if b == "individual" else features(b, t),
                                                         heads[t], labels[t]) for i, t in enumerate(names)})}
               for b in baselines}
    for key in progress(params.methods, desc="evaluate", unit="method"):
        merged = [features(workspace.merged_encoder(key), t) for t in names]
        fit = router_fit(workspace.merged_encoder(key), names, params.router)
        results[key] = entry_figures(merged, individual, load_surgery(key, names), names, heads, labels,
                                     routing.route(merged, params.router, fit))
        if all(results["individual"]["acc"][t] > 0 for t in names):  # the field's normalised accuracy
            for figure in ("acc", "surgery_acc"):
                results[key][f"normalized_{figure}"] = _with_avg(metrics.normalized(
                    {t: results[key][figure][t] for t in names}, results["individual"]["acc"]))
        results[key]["cost"]["merge"] = merge_cost(key)
        split = getattr(params.merge_entry(key).params, "split", None)
        if split is not None:  # the images a data-using merge learned from: rows of one table may differ
            results[key]["split"] = split
    # once everything is in: no noise before an error
    flag_near_chance(results, {t: len(heads[t]) for t in names})
    note = ""
    if not params.is_world:
        compare_with_published(results, params.source.family, params.source.pretrained.arch)
        note = f"\nPublished: {published_note(params.source.family, params.source.pretrained.arch)}\n"
    workspace.write_json(workspace.METRICS, results)
    workspace.write_json(workspace.SUMMARY, metrics.summary(results))
    table = accuracy_table(results, names, params.labels()) + "\n" + field_table(results, params.labels()) + note
    write_text(workspace.ACCURACY_TABLE, table)
    print(summary_table(results, params.labels()) + note)
    print(f"metrics written to {workspace.METRICS} (per task), {workspace.SUMMARY} (averages) and "
          f"{workspace.ACCURACY_TABLE}")
    return results


SEEDED = ("surgery_acc", "heldout_surgery_acc", "routed_surgery_acc", "surgery_bias")  # one value per seed


@torch.no_grad()
def entry_figures(merged: list[torch.Tensor], individual: list[torch.Tensor], modules: dict, names: list[str],
                  heads: dict, labels: dict, routes: routing.Routing) -> dict:
    """One merge entry's figures per task and on average: accuracy without and with surgery
    (the oracle's on the full split and on the images the router is scored on, and routed),
    the router's own accuracy, Eq. 1's bias; figures with surgery as the mean over seeds, and
    their std where there are several."""
    out = {name: {} for name in ("acc", "heldout_acc", "routed_acc", "router_acc")}
    pairs = list(zip(merged, individual))  # Eq. 1 without surgery, then with each seed's
    for t, task in enumerate(names):
        correct = metrics.correct(merged[t], heads[task], labels[task])
        out["acc"][task] = metrics.percent(correct)
        out["heldout_acc"][task] = routes.heldout_accuracy(t, correct)
        out["routed_acc"][task] = routes.routed_accuracy(t, correct)
        out["router_acc"][task] = routes.router_accuracy(t)
    seeds = []
    for module in modules.values():
        figures = {name: {} for name in SEEDED}
        for t, task in enumerate(names):
            adapted = module(merged[t], t)
            correct = metrics.correct(adapted, heads[task], labels[task])
            figures["surgery_acc"][task] = metrics.percent(correct)
            figures["heldout_surgery_acc"][task] = routes.heldout_accuracy(t, correct)
            figures["routed_surgery_acc"][task] = routes.routed_accuracy(t, correct)
            pairs.append((adapted, individual[t]))
        seeds.append(figures)
    bias = metrics.biases(pairs)
    out["bias"] = dict(zip(names, bias[:len(names)]))
    for s, figures in enumerate(seeds):
        figures["surgery_bias"] = dict(zip(names, bias[(s + 1) * len(names):(s + 2) * len(names)]))
    results = {name: _with_avg(values) for name, values in out.items()}
    for name in SEEDED:
        mean, std = metrics.over_seeds([_with_avg(figures[name]) for figures in seeds])
        results[name] = mean
        if len(seeds) > 1:
            results[f"{name}_std"] = std
    first = next(iter(modules.values()))
    results["surgery"] = {"adapter": first.name, "seeds": list(modules)}
    results["cost"] = {"added_params": {"merge": 0, "surgery": first.added_parameters()}}
    return results


def merge_cost(key: str) -> dict | None:
    """The merge's wall time and peak memory where its measurement is here (not a dependency:
    a merge re-run that gives the same weights re-runs nothing after it; evaluation from pulled
    stores alone records none)."""
    path = workspace.merge_cost(key)
    return json.loads(path.read_text()) if path.exists() else None


CHECKS = {  # what a baseline near chance on a task points to
    "individual": "check that task's test split (label order, class names) and its fine-tuned checkpoint: "
                  "a label-order or loader mismatch shows this way",
    "pretrained": "the zero-shot head cannot read that task (class names, templates, or images unlike any "
                  "the pretrained model saw)",
}


def flag_near_chance(results: dict, classes: dict[str, int]) -> None:
    """Record (metrics.json: `near_chance`, task -> chance %) and say loudly which tasks the
    individual or zero-shot encoders get at about chance."""
    for encoder, check in CHECKS.items():
        flagged = metrics.near_chance(results[encoder]["acc"], classes)
        if flagged:
            results[encoder]["near_chance"] = flagged
        for task, chance in flagged.items():
            typer.secho(f"WARNING: {encoder} accuracy on {task} is {results[encoder]['acc'][task]:.1f} %, near "
                        f"chance ({chance:.1f} %): {check}", fg=typer.colors.YELLOW, err=True)


def compare_with_published(results: dict, family: str, arch: str | None) -> None:
    """Record beside each entry the figures published for its key in the run's checkpoint family
    (`published`: family, architecture, source, acc / surgery_acc), and say loudly where the
    zero-shot or individual accuracy is far below them."""
    rows = {figure: published.rows(family, arch, figure) for figure in ("acc", "bias")}
    for key, figures in results.items():
        found = {figure: published.comparable(rows[kind][name], figures[figure], family)
                 for figure, kind, name in (("acc", "acc", key), ("surgery_acc", "acc", key + published.SURGERY),
                                            ("bias", "bias", key), ("surgery_bias", "bias", key + published.SURGERY))
                 if name in rows[kind] and figure in figures}
        if found:
            figures["published"] = {**published.describe(family, arch), **found}
    for encoder, check in CHECKS.items():
        reference = results[encoder].get("published", {}).get("acc", {})
        flagged = published.far_below(results[encoder]["acc"], reference)
        if flagged:
            results[encoder]["below_published"] = flagged
        for task, value in flagged.items():
            typer.secho(f"WARNING: {encoder} accuracy on {task} is {results[encoder]['acc'][task]:.1f} %, far below "
                        f"the {value:.1f} % published for {family} {published.arch_key(arch)}: {check}",
                        fg=typer.colors.YELLOW, err=True)


def published_note(family: str, arch: str | None) -> str:
    info = published.describe(family, arch)
    if not published.rows(family, arch):
        return (f"no published figures for checkpoint family {family!r}"
                + (f" and {info['arch']}" if info["arch"] else "") + " (params `source.family`)")
    return f"{family} {info['arch']}: {info['source']}"


# summary_table's columns: figure, digits, title
FIGURES = (("acc", 1, "Avg"), ("surgery_acc", 1, "+ surgery"), ("routed_acc", 1, "routed"),
           ("routed_surgery_acc", 1, "+ surgery"), ("bias", 3, "bias"), ("surgery_bias", 3, "+ surgery"))


def summary_table(results: dict, labels: dict[str, str]) -> str:
    """The averages of every row, narrow enough for a terminal (per task: results/accuracy.md)."""
    rows = [("Encoder", *(title for _, _, title in FIGURES))]
    for key, averages in metrics.summary(results).items():
        cells = [(averages.get(name), digits) for name, digits, _ in FIGURES]
        rows.append((tables.label(key, labels), *("" if v is None else f"{v:.{d}f}" for v, d in cells)))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{r[0]:<{width}}  " + "  ".join(f"{c:>9}" for c in r[1:]) for r in rows)


def with_std(r: dict, figure: str, digits: int = 1) -> str:
    """An average as the field reports it: `mean ± std` over seeds where there are several."""
    value, std = r.get(figure, {}).get("avg"), r.get(f"{figure}_std", {}).get("avg")
    if value is None:
        return ""
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def published_avg(r: dict, figure: str) -> float | None:
    """The published average of an entry's figure (acc, surgery_acc), where the family has one."""
    return r.get("published", {}).get(figure, {}).get("avg")


def routed(r: dict, figure: str) -> str:
    """A routed average, with the oracle's on the same images in brackets where they are not the
    whole split (a router fitted on some test images)."""
    same = r[f"heldout_{figure}"] != r[figure]
    return with_std(r, f"routed_{figure}") + (f" ({with_std(r, f'heldout_{figure}')})" if same else "")


def field_table(results: dict, labels: dict[str, str]) -> str:
    """Each entry's averages as the field reports them: absolute and normalised (% of the
    individual encoders'), without and with surgery (mean ± std over seeds); routed, without an
    oracle task id (where the router was fitted on some test images, on the others, with the
    oracle there in brackets), and the router's own accuracy; what the merge cost (wall time and peak memory,
    results/merge-costs/KEY.json) and the parameters surgery adds at inference."""
    entries = {key: r for key, r in results.items() if "surgery_acc" in r}
    published = any("published" in r for r in entries.values())  # a real run: its family's averages
    titles = ["method", "Avg", "normalized", "+ surgery", "normalized", "routed", "routed + surgery",
              "router", "merge time (s)", "merge peak (MiB)", "params added by surgery"]
    titles += ["published avg (+ surgery)"] if published else []
    lines = ["| " + " | ".join(titles) + " |", "|---" * len(titles) + "|"]
    for key, r in entries.items():
        cost = r["cost"]["merge"] or {}
        cells = [with_std(r, "acc"), with_std(r, "normalized_acc"), with_std(r, "surgery_acc"),
                 with_std(r, "normalized_surgery_acc"),
                 routed(r, "acc"), routed(r, "surgery_acc"),
                 with_std(r, "router_acc"), *("" if v is None else f"{v:.1f}" for v in (cost.get("wall_s"),
                                                                                     cost.get("peak_mib"))),
                 f"{r['cost']['added_params']['surgery']:,}"]
        if published:
            merged, surgery = (published_avg(r, figure) for figure in ("acc", "surgery_acc"))
            cells.append((f"{merged:.1f}" if merged is not None else "")
                         + (f" ({surgery:.1f})" if surgery is not None else ""))
        lines.append(f"| {tables.label(key, labels)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def adapter_label(r: dict) -> str:
    """How a table names an entry's adapter: the paper's is `surgery`, lower case, as always."""
    name = r.get("surgery", {}).get("adapter", "surgery")
    return "surgery" if name == "surgery" else adapters.get(name).label


def accuracy_table(results: dict, names: list[str], labels: dict[str, str]) -> str:
    """The paper's Table 1 layout: the baselines, every merge entry (params order), then every
    entry with surgery; the published average of the run's checkpoint family where there is one."""
    rows = [{"method": key, "setting": "", **r["acc"], "bias": r.get("bias", {}).get("avg"),
             "split": r.get("split"), "published": published_avg(r, "acc")} for key, r in results.items()]
    rows += [{"method": key, "setting": "", "label": f"{labels[key]} + {adapter_label(r)}", **r["surgery_acc"],
              "bias": r["surgery_bias"]["avg"], "split": r.get("split"), "published": published_avg(r, "surgery_acc"),
              "std": r.get("surgery_acc_std", {}).get("avg")}
             for key, r in results.items() if "surgery_acc" in r]
    extra = {"bias": ("bias avg", 3)}
    if any(r.get("std") is not None for r in rows):
        extra["std"] = ("± std over seeds (Avg)", 1)
    if any(r["published"] is not None for r in rows):
        extra["published"] = ("published avg", 1)
    extra["split"] = ("merge learned on", None)
    return tables.to_markdown(rows, names, labels, extra=extra)
