"""`repsurgery list`: what a user can choose from, read from the registries and the typed params
(never a hand-kept list), one text block per topic."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path


def methods(_params: Path | None) -> str:
    from pipeline.merging import registry

    lines = []
    for name, method in registry.available().items():
        fields = ", ".join(f"{k}={'<required>' if f.is_required() else f.default!r}"
                           for k, f in method.params.model_fields.items())
        needs = f" [needs {', '.join(sorted(method.needs))}]" if method.needs else ""
        label = method.label if isinstance(method.label, str) else _label_of_defaults(method)
        lines.append(f"{name}: {label}{needs}")
        lines += textwrap.wrap(f"{method.module}; params: {fields or 'none'}", WIDTH, initial_indent="    ",
                               subsequent_indent="      ")
    return "\n".join(lines)


WIDTH = 120  # a terminal's columns


def _label_of_defaults(method) -> str:
    """A label computed from the entry's params, shown for the defaults (the method's docstring
    where a param has no default)."""
    try:
        return f"{method.label(method.params())} (at the defaults)"
    except Exception:
        return (method.function.__doc__ or sys.modules[method.module].__doc__ or "").strip().split("\n")[0]


def adapters(_params: Path | None) -> str:
    from pipeline.config import LOSSES, AnalysisSurgery, Router, Surgery
    from pipeline.surgery import adapters as registry

    lines = []
    for name, cls in registry.available().items():
        fields = ", ".join(f"{k}={f.default!r}" for k, f in cls.Params.model_fields.items())
        lines.append(f"{name}: {cls.label}{' (one module for every task)' if cls.SHARED else ''}")
        doc = " ".join((sys.modules[cls.__module__].__doc__ or "").split())
        lines += textwrap.wrap(f"{cls.__module__}; params (`adapters.{name}`): {fields or 'none'}. {doc}", WIDTH,
                               initial_indent="    ", subsequent_indent="      ")
    lines += [f"losses (surgery.loss): {', '.join(LOSSES)}",
              f"params `surgery`: {', '.join(Surgery.model_fields)}",
              f"params `analyses.surgery`: {', '.join(AnalysisSurgery.model_fields)}",
              f"params `router` (no oracle task id): {', '.join(Router.model_fields)}"]
    return "\n".join(lines)


def tasks(_params: Path | None) -> str:
    from pipeline.data.catalog import PAPER_TASKS, TEXT_TASKS
    from pipeline.world import images, texts

    return (f"miniature world (source: world): {', '.join(images.TASK_NAMES)}\n"
            f"paper setting (a `source` mapping; `repsurgery preset paper-vit-b-32`):\n    {', '.join(PAPER_TASKS)}\n"
            f"miniature text world (modality: text; `repsurgery preset text-world`): {', '.join(texts.TASK_NAMES)}\n"
            f"paper's text setting (`repsurgery preset paper-bert`): {', '.join(TEXT_TASKS)}")


def params(path: Path | None) -> str:
    import yaml

    from pipeline import config

    loaded = config.load(path or Path("params.yaml"))
    # `source` holds a Source where the field is typed for the raw mapping: no serializer warning for it
    return yaml.safe_dump(loaded.model_dump(mode="json", warnings=False), sort_keys=False).rstrip()


LISTINGS = {"methods": methods, "adapters": adapters, "tasks": tasks, "params": params}
