"""The paper's analyses on cached features, each written to results/analyses/<name>/ as
table.csv + table.md (rows = methods and settings, columns = tasks + avg), plot.csv (the
`dvc plots` data: one column per method) and figure.png/.svg.

The analyses study surgery at one reference setting, `analyses.surgery` (the recipe's values,
as in the paper's tables), not at the pipeline's `surgery` (your experiment behind
metrics.json), so their tables stay comparable with the paper's whatever that experiment is.
Each reads only its own `analyses.<name>` params and the reference settings it does not
sweep; only the bias analysis (Fig. 2/5) reads the pipeline's results (metrics.json). The surgery they
train comes from pipeline/surgery/sweeps.py; this module turns it into tables and figures."""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Callable

import torch

from cache.files import sha256_file
from pipeline import provenance, routing, workspace
from pipeline.config import AnalysisSurgery, Params
from pipeline.errors import PipelineError
from pipeline.features.stores import read_features, read_labels, router_fit
from pipeline.models.checkpoints import load_heads
from pipeline.reporting import figures, metrics, tables, tsne
from pipeline.surgery import adapters, sweeps

OUT = workspace.ANALYSES
ANALYSES = ("baselines", "rank", "loss", "data-ratio", "online", "curve", "adapters", "bias", "tsne")
LOSS_NAMES = {"l1": "L1", "mse": "MSE", "smooth_l1": "SmoothL1", "cosine": "Neg. cosine"}
SURGERY_KEYS = tuple(AnalysisSurgery.model_fields)


class Context:
    """Cached features, heads and labels, loaded once per process and shared by the analyses."""

    def __init__(self, params: Params, device: torch.device | str = "cpu",
                 progress: Callable = lambda it=None, **kw: it):
        self.params, self.device, self.progress = params, device, progress
        self.names = params.tasks
        self.methods = params.methods   # narrowed to an analysis' own list by `scoped`
        self._features: dict[str, list[torch.Tensor]] = {}  # shared by the scoped copies
        self.labels_of = {**tables.BASELINES, **params.labels()}
        heads = load_heads(workspace.HEADS, self.names)
        self.heads = [heads[t] for t in self.names]
        self.labels = [read_labels(t) for t in self.names]
        params.check_rows(dict(zip(self.names, map(len, self.labels))), "analyses.surgery.batch_size",
                          params.analyses.surgery.batch_size)

    def cfg(self, name: str):
        return getattr(self.params.analyses, name.replace("-", "_"))

    def scoped(self, name: str) -> "Context":
        """This context with `methods` = the entries analysis `name` runs on (params
        `analyses.<name>.methods`); features loaded by either are shared."""
        scoped = copy.copy(self)
        scoped.methods = self.params.analyses.methods(name, self.params.methods)
        return scoped

    def surgery(self, *, without: str | None = None) -> dict:
        """The analyses' surgery settings (`analyses.surgery`, minus the swept one) for training."""
        cfg = self.params.analyses.surgery.model_dump()
        return {**{k: cfg[k] for k in SURGERY_KEYS if k != without}, "device": self.device,
                "adapter_params": self.params.adapter_params(cfg["adapter"])}

    def features(self, encoder: str) -> list[torch.Tensor]:
        """Features of `individual`, `pretrained`, `mtl`, or a merge entry (by its key)."""
        if encoder not in self._features:
            self._features[encoder] = read_features(encoder_name(encoder), self.names)
        return self._features[encoder]

    def label(self, method: str) -> str:
        return tables.label(method, self.labels_of)

    def taskset(self, method: str) -> sweeps.TaskSet:
        return sweeps.TaskSet(self.features(method), self.features("individual"), self.heads, self.labels)

    def tasksets(self) -> list[sweeps.TaskSet]:
        """Every merge entry's features, for analyses that train all methods' adapters at once."""
        return [self.taskset(m) for m in self.methods]

    def accuracy(self, feats: list[torch.Tensor]) -> list[float]:
        return [metrics.accuracy(z, h, y) for z, h, y in zip(feats, self.heads, self.labels)]


def encoder_name(encoder: str) -> str:
    """The feature-store name of a baseline or a merge entry."""
    return encoder if encoder in tables.BASELINES else workspace.merged_encoder(encoder)


def _write(ctx: Context, name: str, rows: list[dict], plot: list[dict] | None = None, digits: int = 1) -> Path:
    out = OUT / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.csv").write_text(tables.to_csv(rows))
    (out / "table.md").write_text(tables.to_markdown(rows, ctx.names, ctx.labels_of, digits))
    if plot:
        (out / "plot.csv").write_text(tables.to_csv(plot))
    return out


def _baselines(ctx: Context) -> tuple[list[dict], dict[str, float]]:
    """The baseline rows of every table and their averages (horizontal lines in the figures)."""
    path = OUT / "baselines" / "baselines.json"
    if not path.exists():
        raise PipelineError(f"{path} does not exist: run `repsurgery analyze baselines` first")
    stored = json.loads(path.read_text())
    if stored["tasks"] != ctx.names:
        raise PipelineError(f"{path} is for tasks {stored['tasks']}, params list {ctx.names}: "
                            "re-run `repsurgery analyze baselines`")
    rows = [tables.row(m, "", ctx.names, accs) for m, accs in stored["acc"].items()]
    lines = {ctx.label(r["method"]): r["avg"] for r in rows if r["method"] != "pretrained"}
    return rows, lines


def _merged_row(ctx: Context, method: str) -> dict:
    return tables.row(method, "", ctx.names, ctx.accuracy(ctx.features(method)))


def run_baselines(ctx: Context) -> Path:
    """Pretrained (zero-shot), Individual and, where the params build one, Traditional MTL."""
    acc = {"pretrained": ctx.accuracy(ctx.features("pretrained")),
           "individual": ctx.accuracy(ctx.features("individual"))}
    if ctx.params.is_world:
        acc["mtl"] = ctx.accuracy(ctx.features("mtl"))
    rows = [tables.row(m, "", ctx.names, a) for m, a in acc.items()]
    out = _write(ctx, "baselines", rows)
    workspace.write_json(out / "baselines.json", {"tasks": ctx.names, "acc": acc})
    figures.bars(ctx.names + ["avg"], {ctx.label(r["method"]): [r[c] for c in ctx.names + ["avg"]] for r in rows},
                 out / "figure", ylabel="accuracy (%)", title="Baselines")
    return out


def _sweep(ctx: Context, name: str, key: str, values: list, setting: callable, xs: dict) -> tuple[list, list]:
    base = ctx.surgery(without=key)
    rows, done = [], {}
    for value in ctx.progress(values, desc=f"{name} sweep, every method at once", unit="setting"):
        accs = sweeps.surgery_accuracies(ctx.tasksets(), {**base, key: value})
        done.update({(method, value): a for method, a in zip(ctx.methods, accs)})
    for method in ctx.methods:
        rows.append(_merged_row(ctx, method))
        rows += [tables.row(method, setting(v), ctx.names, done[method, v]) for v in values]
    return rows, tables.wide(rows, name, xs)


def run_rank(ctx: Context) -> Path:
    """Table 8 / Fig. 6: surgery at every rank of `analyses.rank.ranks`, for every method."""
    ranks = list(ctx.cfg("rank").ranks)
    base_rows, lines = _baselines(ctx)
    rows, plot = _sweep(ctx, "rank", "rank", ranks, lambda r: f"r={r}", {f"r={r}": r for r in ranks})
    out = _write(ctx, "rank", base_rows + rows, plot)
    figures.lines(ranks, _series(ctx, plot), out / "figure", xlabel="rank r of the surgery module",
                  title="Accuracy with surgery vs. rank", baselines=lines, xlog=True, xticks=ranks)
    return out


def run_loss(ctx: Context) -> Path:
    """Table 9: surgery with each loss of `analyses.loss.losses`, for every method."""
    losses = list(ctx.cfg("loss").losses)
    base_rows, lines = _baselines(ctx)
    label = lambda l: LOSS_NAMES[l]  # noqa: E731
    rows, plot = _sweep(ctx, "loss", "loss", losses, label, {label(l): label(l) for l in losses})
    out = _write(ctx, "loss", base_rows + rows, plot)
    merged = {r["method"]: r["avg"] for r in rows if r["setting"] == ""}
    series = {"no surgery": [merged[m] for m in ctx.methods]}
    series.update({label(l): [next(r["avg"] for r in rows if r["method"] == m and r["setting"] == label(l))
                              for m in ctx.methods] for l in losses})
    figures.bars([ctx.label(m) for m in ctx.methods], series, out / "figure", ylabel="Avg. accuracy (%)",
                 title="Surgery loss functions", baselines=lines)
    return out


def _percent(f: float) -> str:
    return f"{100 * f:g}%"


def _series(ctx: Context, plot: list[dict]) -> dict[str, list[float]]:
    return {ctx.label(m): [p[m] for p in plot] for m in ctx.methods}


def run_data_ratio(ctx: Context) -> Path:
    """Table 4: surgery sees a seeded fraction of each task's test images; evaluated on all."""
    cfg = ctx.cfg("data-ratio")
    ratios = list(cfg.ratios)
    base_rows, lines = _baselines(ctx)
    base = ctx.surgery()
    rows, done = [], sweeps.data_ratio(ctx.tasksets(), base, ratios, cfg.seed)
    for m, method in enumerate(ctx.methods):
        rows.append(_merged_row(ctx, method))
        rows += [tables.row(method, _percent(r), ctx.names, done[r][m]) for r in ratios]
    plot = tables.wide(rows, "percent", {_percent(r): 100 * r for r in ratios})
    out = _write(ctx, "data-ratio", base_rows + rows, plot)
    figures.lines([100 * r for r in ratios], _series(ctx, plot), out / "figure", xlog=True,
                  xlabel="share of each task's test images visible to surgery (%)",
                  title="Available data ratio", baselines=lines, xticks=[100 * r for r in ratios])
    return out


def run_online(ctx: Context) -> Path:
    """Table 5: online surgery (batch 1, each sample once, tasks in sequence) at checkpoints."""
    cfg = ctx.cfg("online")
    fractions = list(cfg.checkpoints)
    s = ctx.params.analyses.surgery
    base_rows, lines = _baselines(ctx)
    rows, done = [], dict(zip(ctx.methods, sweeps.online(ctx.tasksets(), rank=s.rank, lr=s.lr, loss=s.loss,
                                                          seed=cfg.seed, fractions=fractions, progress=ctx.progress)))
    for method in ctx.methods:
        rows.append(_merged_row(ctx, method))
        rows += [tables.row(method, f"online {_percent(f)}", ctx.names, done[method][f]) for f in fractions]
    plot = tables.wide(rows, "percent", {f"online {_percent(f)}": 100 * f for f in fractions})
    out = _write(ctx, "online", base_rows + rows, plot)
    figures.lines([100 * f for f in fractions], _series(ctx, plot), out / "figure",
                  xlabel="share of each task's test samples seen once, batch 1 (%)", title="Online surgery",
                  baselines=lines)
    return out


def run_curve(ctx: Context) -> Path:
    """Fig. 7/9: accuracy every `sweeps.curve.eval_every` surgery steps, one curve per method."""
    every = ctx.cfg("curve").eval_every
    base_rows, lines = _baselines(ctx)
    base = ctx.surgery()
    rows, done = [], sweeps.curve(ctx.tasksets(), base, every)
    steps = sorted(done[0])
    for method, points in zip(ctx.methods, done):
        rows += [tables.row(method, f"step {s}", ctx.names, points[s]) for s in steps]
    plot = tables.wide(rows, "step", {f"step {s}": s for s in steps})
    out = _write(ctx, "curve", base_rows + rows, plot)
    figures.lines(steps, _series(ctx, plot), out / "figure", xlabel="surgery step",
                  title="Accuracy vs. surgery steps", baselines=lines)
    return out


def run_adapters(ctx: Context) -> Path:
    """Surgery without an oracle task id: every adapter of `analyses.adapters` (and none) on
    each entry, trained at the analyses' setting, scored with the oracle's task id (full split)
    and routed (params `router`: on the images the router was not fitted on). table.md has every
    task; summary.md the averages, one row per entry."""
    names = ctx.params.adapter_names()
    base, datas = ctx.surgery(without="adapter"), ctx.tasksets()
    trained = {a: sweeps.trained(datas, {**base, "adapter": a, "adapter_params": ctx.params.adapter_params(a)})
               for a in ctx.progress(names, desc="adapters, every method at once", unit="adapter")}
    titles = {None: "no surgery", **{a: adapters.get(a).label for a in names}}
    rows, averages, cfg = [], {}, ctx.params.router
    for m, method in enumerate(ctx.methods):
        routes = routing.route(ctx.features(method), cfg, router_fit(encoder_name(method), ctx.names, cfg))
        for adapter, title in titles.items():
            correct = sweeps.correct(datas[m], None if adapter is None else trained[adapter][m])
            for mode, accs in (("oracle", [metrics.percent(c) for c in correct]),
                               ("routed", [routes.routed_accuracy(t, c) for t, c in enumerate(correct)]),
                               ("oracle, same images", [routes.heldout_accuracy(t, c) for t, c in enumerate(correct)])):
                rows.append(tables.row(method, f"{title}, {mode}", ctx.names, accs))
                averages.setdefault(method, {})[f"{title} ({mode})"] = rows[-1]["avg"]
        averages[method]["router"] = round(sum(map(routes.router_accuracy, range(len(ctx.names)))) / len(ctx.names), 2)
    out = _write(ctx, "adapters", rows)
    (out / "summary.md").write_text(adapters_summary(ctx, averages, list(titles.values())))
    (out / "summary.csv").write_text(tables.to_csv([{"method": m, **v} for m, v in averages.items()]))
    series = {f"{t} ({mode})": [averages[m][f"{t} ({mode})"] for m in ctx.methods]
              for t in titles.values() for mode in ("oracle", "routed")}
    figures.bars([ctx.label(m) for m in ctx.methods], series, out / "figure", ylabel="Avg. accuracy (%)",
                 title=f"Adapters with the oracle task id and routed ({ctx.params.router.method} router)")
    return out


def adapters_summary(ctx: Context, averages: dict, titles: list[str]) -> str:
    """One row per entry: each adapter's average with the oracle (full split) and routed (the
    oracle on the same images in brackets, where the router was fitted on some of the test
    images), and the router's own accuracy."""
    head = [f"{t} ({mode})" for t in titles for mode in ("oracle", "routed")] + ["router"]
    lines = ["| method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for method, v in averages.items():
        same = {t: v[f"{t} (oracle, same images)"] for t in titles}
        cells = [f"{v[f'{t} (oracle)']:.1f} | {v[f'{t} (routed)']:.1f}"
                 + ("" if same[t] == v[f"{t} (oracle)"] else f" ({same[t]:.1f})") for t in titles]
        lines.append(f"| {ctx.label(method)} | " + " | ".join(cells) + f" | {v['router']:.1f} |")
    return "\n".join(lines) + "\n"


def run_bias(ctx: Context) -> Path:
    """Fig. 2/5: Eq. 1 per task, without and with surgery, for every method (from evaluate's
    results/metrics.json, which computes it on the cached features)."""
    path = workspace.METRICS
    if not path.exists():
        raise PipelineError(f"{path} does not exist: run `repsurgery evaluate` (or `dvc repro evaluate`) first")
    results = json.loads(path.read_text())
    missing = [m for m in ctx.methods if m not in results]
    if missing:
        raise PipelineError(f"{path} has no bias for {missing}: re-run `repsurgery evaluate`")
    rows = []
    for method in ctx.methods:
        for key, setting in (("bias", ""), ("surgery_bias", "surgery")):
            rows.append(tables.row(method, setting, ctx.names, [results[method][key][t] for t in ctx.names], 4))
    plot = [{"task": t, **{f"{r['method']}{'+surgery' if r['setting'] else ''}": r[t] for r in rows}}
            for t in ctx.names + ["avg"]]
    out = _write(ctx, "bias", rows, plot, digits=3)
    panels = {ctx.label(m): ([results[m]["bias"][t] for t in ctx.names], [results[m]["surgery_bias"][t]
                                                                               for t in ctx.names])
              for m in ctx.methods}
    figures.bias_panels(ctx.names, panels, out / "figure")
    return out


def run_tsne(ctx: Context) -> Path:
    """Fig. 1/4: t-SNE of individual (blue) vs. merged (red) features per task, without and
    with surgery trained at the analyses' settings."""
    cfg = ctx.cfg("tsne")
    chosen = ctx.methods
    adapters = dict(zip(chosen, sweeps.trained([ctx.taskset(m) for m in chosen], ctx.surgery())))
    out = OUT / "tsne"
    out.mkdir(parents=True, exist_ok=True)
    variants = ("merged", "merged + surgery")
    pairs, summary = [], []
    for method, surgery in adapters.items():
        for t, task in enumerate(ctx.names):
            individual, merged = ctx.features("individual")[t], ctx.features(method)[t]
            rows = torch.from_numpy(tsne.sample_rows(len(merged), cfg.samples, cfg.seed))
            with torch.no_grad():
                adapted = surgery(merged[rows], t)
            for variant, z in zip(variants, (merged[rows], adapted)):
                pairs.append((individual[rows].numpy(), z.numpy()))
                summary.append({"method": method, "task": task, "variant": variant, "points": 2 * len(rows),
                                "l1_gap": round(float((z - individual[rows]).abs().mean()), 4)})
    embedded = iter(tsne.embed_cached(pairs, perplexity=cfg.perplexity, seed=cfg.seed, iterations=cfg.iterations,
                                      cache=workspace.TSNE_CACHE, progress=ctx.progress))
    panels = {m: {v: [] for v in variants} for m in chosen}
    for row in summary:
        panels[row["method"]][row["variant"]].append(next(embedded))
    for stale in [f for f in out.glob("*.*") if f.suffix in (".png", ".svg") and f.stem not in chosen]:
        stale.unlink()  # the folder persists between runs: drop figures of entries no longer drawn
    for method in chosen:
        figures.tsne_grid(ctx.names, panels[method], out / method, title=ctx.label(method))
    (out / "panels.csv").write_text(tables.to_csv(summary))
    return out


RUNNERS = {"baselines": run_baselines, "rank": run_rank, "loss": run_loss, "data-ratio": run_data_ratio,
           "online": run_online, "curve": run_curve, "adapters": run_adapters, "bias": run_bias, "tsne": run_tsne}


# The surgery settings each analysis trains with (the others it sweeps, or reads no surgery).
SURGERY_READ = {"rank": [k for k in SURGERY_KEYS if k != "rank"], "loss": [k for k in SURGERY_KEYS if k != "loss"],
                "data-ratio": list(SURGERY_KEYS), "curve": list(SURGERY_KEYS), "online": ["rank", "lr", "loss"],
                "tsne": list(SURGERY_KEYS), "adapters": [k for k in SURGERY_KEYS if k != "adapter"]}
# The feature stores of analyses that read others than the individual and their entries' ones.
STORES_READ = {"baselines": list(tables.BASELINES), "bias": []}
# Files whose content an analysis reads besides the feature stores, heads and labels.
FILES_READ = {"rank": ["baselines"], "loss": ["baselines"], "data-ratio": ["baselines"], "online": ["baselines"],
              "curve": ["baselines"], "bias": ["metrics"]}


def identity(name: str, ctx: Context) -> str:
    """A digest of everything analysis `name` (on `ctx.scoped(name)`) depends on: its settings,
    the surgery settings it trains with, its merge entries and their labels, the feature stores
    it reads, the heads, the labels, the files it reads (baselines, metrics) and the code: an
    entry it does not run on can change without recomputing it."""
    encoders = STORES_READ.get(name, ["individual", *ctx.methods])
    stores = sorted(f"{p}={json.loads((p / 'zarr.json').read_text())['attributes'].get('sha256', '')}"
                    for encoder in encoders for p in (workspace.FEATURES / encoder_name(encoder)).glob("*.zarr")
                    if (p / "zarr.json").exists())
    files = {"baselines": [OUT / "baselines" / "baselines.json"], "metrics": [workspace.METRICS]}
    read = [p for kind in FILES_READ.get(name, []) for p in files[kind]]
    parts = {"name": name, "tasks": ctx.names, "methods": {m: ctx.label(m) for m in ctx.methods}, "stores": stores,
             "settings": getattr(ctx.params.analyses, name.replace("-", "_"), None),
             "surgery": {k: getattr(ctx.params.analyses.surgery, k) for k in SURGERY_READ.get(name, [])},
             "adapters": {a: ctx.params.adapter_params(a) for a in (
                 ctx.params.adapter_names() if name == "adapters" else
                 [ctx.params.analyses.surgery.adapter] if "adapter" in SURGERY_READ.get(name, []) else [])},
             "router": ctx.params.router if name == "adapters" else None,
             "world": ctx.params.is_world, "code": provenance.digest([__name__]),
             "files": {str(p): sha256_file(p).hexdigest() if p.exists() else None
                       for p in [workspace.HEADS, *sorted(workspace.LABELS.glob("*.json")), *read]}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run(name: str, ctx: Context, force: bool = False) -> tuple[Path, bool]:
    """One analysis -> results/analyses/NAME/, unless its recorded inputs are those of now
    (then it is kept as it is). Returns the folder and whether it was computed."""
    if name not in RUNNERS:
        raise PipelineError(f"unknown analysis {name!r}: choose one of {', '.join(ANALYSES)} or all")
    ctx = ctx.scoped(name)
    digest, record = identity(name, ctx), OUT / name / "inputs.json"
    if not force and record.exists() and json.loads(record.read_text()).get("digest") == digest:
        return OUT / name, False
    out = RUNNERS[name](ctx)
    workspace.write_json(record, {"digest": digest, "methods": ctx.methods})
    return out, True
