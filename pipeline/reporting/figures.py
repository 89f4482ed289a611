"""Static figures (PNG and SVG) with matplotlib's Agg backend: every figure exists as a plain
image file, for the docs and for readers without `dvc plots show`."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.hashsalt"] = "repsurgery"  # fixed SVG element ids: reruns write identical files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

BLUE, RED = "#1f77b4", "#d62728"
BASELINE_STYLE = {"Individual": ("k", "--"), "Traditional MTL": ("tab:green", "-."),
                  "Pretrained (zero-shot)": ("tab:gray", ":")}


def save(fig, stem: Path) -> list[Path]:
    """Write `stem`.png and `stem`.svg (no timestamps in the SVG, so reruns are identical)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=120, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    return paths


def _baselines(ax, baselines: dict[str, float]) -> None:
    for name, value in baselines.items():
        color, style = BASELINE_STYLE.get(name, ("k", ":"))
        ax.axhline(value, color=color, linestyle=style, linewidth=1, label=f"{name} ({value:.1f})")


def lines(x: list, series: dict[str, list[float]], stem: Path, *, xlabel: str, ylabel: str = "Avg. accuracy (%)",
          title: str = "", baselines: dict[str, float] | None = None, xlog: bool = False,
          xticks: list | None = None) -> list[Path]:
    """One line (with markers) per series over a shared x axis, baselines as horizontal lines."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, ys in series.items():
        ax.plot(x, ys, marker="o", markersize=3.5, label=name)
    _baselines(ax, baselines or {})
    if xlog:
        ax.set_xscale("log", base=2 if all(float(v).is_integer() for v in x) else 10)
    if xticks is not None:
        ax.set_xticks(xticks, [str(v) for v in xticks])
        ax.minorticks_off()
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save(fig, stem)


def bars(categories: list[str], series: dict[str, list[float]], stem: Path, *, ylabel: str, title: str = "",
         colors: list[str] | None = None, baselines: dict[str, float] | None = None) -> list[Path]:
    """Grouped bars: one group per category, one bar per series."""
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(categories) * max(1, len(series)) / 2), 4.2))
    width = 0.8 / len(series)
    x = np.arange(len(categories))
    for i, (name, ys) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, ys, width, label=name,
               color=None if colors is None else colors[i % len(colors)])
    _baselines(ax, baselines or {})
    ax.set_xticks(x, categories, rotation=30 if len(categories) > 6 else 0)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)  # beside the bars
    return save(fig, stem)


PANELS_PER_ROW = 4  # the bias figure's grid: readable at its default size whatever the number of entries


def bias_panels(tasks: list[str], panels: dict[str, tuple[list[float], list[float]]], stem: Path) -> list[Path]:
    """Fig. 2/5: per method, the bias of each task without (blue) and with (red) surgery, in a
    grid of at most PANELS_PER_ROW panels a row."""
    columns = min(PANELS_PER_ROW, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.9 * rows), sharey=True, squeeze=False)
    x = np.arange(len(tasks))
    for i, (ax, (title, (before, after))) in enumerate(zip(axes.flat, panels.items())):
        ax.bar(x - 0.2, before, 0.4, color=BLUE, label="merged")
        ax.bar(x + 0.2, after, 0.4, color=RED, label="merged + surgery")
        lowest = i + columns >= len(panels)  # the task names under each column's last panel only
        ax.set_xticks(x, tasks if lowest else [], rotation=60, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("bias (Eq. 1)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, 1.02))
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return save(fig, stem)


def tsne_grid(tasks: list[str], rows: dict[str, list[tuple[np.ndarray, np.ndarray]]], stem: Path,
              title: str = "") -> list[Path]:
    """Fig. 1/4: one row per variant (e.g. merged, merged + surgery), one column per task;
    individual features in blue, merged ones in red."""
    fig, axes = plt.subplots(len(rows), len(tasks), figsize=(2.2 * len(tasks), 2.3 * len(rows)), squeeze=False)
    for r, (name, panels) in enumerate(rows.items()):
        for c, (individual, merged) in enumerate(panels):
            ax = axes[r][c]
            ax.scatter(individual[:, 0], individual[:, 1], s=3, c=BLUE, alpha=0.6, linewidths=0)
            ax.scatter(merged[:, 0], merged[:, 1], s=3, c=RED, alpha=0.6, linewidths=0)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(tasks[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    if title:
        fig.suptitle(f"{title}  (blue: individual, red: merged)", fontsize=10)
    return save(fig, stem)
