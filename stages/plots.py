"""`repsurgery plots`: results/dvc.yaml, the `plots:` that `dvc plots show` draws, generated
from params `merge` and each analysis' `methods`.

DVC cannot template a plots section, and its Vega plots name one column per merge entry, so
the plots live in their own dvc.yaml (DVC reads every dvc.yaml in the repository), written
from the params by the first stage, `check`, whenever they change (a new entry gets its plots
with no command of its own); the pipeline's dvc.yaml names no merge method. A test checks that
the committed file is current. The PNG/SVG figures under results/analyses/ need none of this."""
from __future__ import annotations

from pathlib import Path

from cache.files import write_text
from pipeline import workspace
from pipeline.config import Params

PLOTS_FILE = workspace.RESULTS / "dvc.yaml"
HEADER = "# Written by stage `check` (or `repsurgery plots`) from params; read by `dvc plots show`. Do not edit.\n"
SWEEPS = [  # (title, template, x, analysis): one line per entry over a numeric x
    ("Rank sweep, Table 8 / Fig. 6 (avg accuracy with surgery)", "linear", "rank", "rank"),
    ("Available data ratio, Table 4 (avg accuracy with surgery)", "linear", "percent", "data-ratio"),
    ("Online surgery, Table 5 (avg accuracy)", "linear", "percent", "online"),
    ("Accuracy vs. surgery steps, Fig. 7 / 9", "linear", "step", "curve"),
]
FIGURES = ["baselines", "rank", "loss", "data-ratio", "online", "curve", "bias"]
Y_TITLE = "average accuracy (%)"


def section(params: Params) -> str:
    def methods(name: str) -> list[str]:
        return params.analyses.methods(name, params.methods)

    lines = [HEADER, "plots:"]
    for title, template, x, name in SWEEPS:
        keys = ", ".join(methods(name))
        lines += [f"  - {title}:", f"      template: {template}", f"      x: {x}",
                  f"      y_label: {Y_TITLE}", f"      x_label: {x}", "      y:",
                  f"        {(workspace.analysis(name) / 'plot.csv').relative_to(workspace.RESULTS)}: [{keys}]"]
    # horizontal bars take one numeric field (x) against a category (y): one plot per entry; the
    # bias (two bars per task and entry) is its figure only
    loss = (workspace.analysis("loss") / "plot.csv").relative_to(workspace.RESULTS)
    for key in methods("loss"):
        lines += [f"  - Loss functions, Table 9 ({key}, avg accuracy with surgery):", "      template: bar_horizontal",
                  f"      x_label: {Y_TITLE}", "      y_label: loss", f"      x: {{{loss}: {key}}}",
                  f"      y: {{{loss}: loss}}"]
    lines += [f"  - {(workspace.analysis(name) / 'figure.png').relative_to(workspace.RESULTS)}" for name in FIGURES]
    lines += [f"  - {(workspace.analysis('tsne') / (key + '.png')).relative_to(workspace.RESULTS)}"
              for key in methods("tsne")]
    return "\n".join(lines) + "\n"


def write_plots(params: Params, path: Path = PLOTS_FILE) -> None:
    write_text(path, section(params))
    print(f"{path} written for the {len(params.methods)} merge entries of params (`dvc plots show` draws it)")
