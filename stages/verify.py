"""`repsurgery verify`: reread feature stores against the checksum taken when each was written.

The stages check a store's metadata, inputs and chunk listing when they open it, which is cheap;
bytes damaged on disk after the write show only when read (or here, all at once, before a long
run or after copying stores between machines)."""
from __future__ import annotations

import sys

from cache.store import StoreError
from pipeline import workspace
from pipeline.config import Params
from pipeline.errors import PipelineError
from pipeline.features.jobs import encoders
from pipeline.features.stores import leftover_report, open_features, open_router_store
from stages.common import progress


def verify(params: Params, names: list[str] | None) -> None:
    chosen = encoders(params, names)
    if not names and params.is_world and workspace.store("mtl", params.tasks[0]).exists():
        chosen.append("mtl")
    stores = [(encoder, task) for encoder in chosen for task in params.tasks]
    if params.router.split == "train":  # the train images the router is fitted on, of every merge entry
        stores += [(encoder, None) for encoder in chosen if encoder.startswith("merged/")]
    problems = []
    for encoder, task in progress(stores, desc="verify", unit="store"):
        try:
            if task is None:
                open_router_store(encoder, params.tasks, params.router, deep=True)
            else:
                open_features(encoder, task, deep=True)
        except StoreError as exc:
            problems.append(str(exc))
            print(f"  {exc}", file=sys.stderr)
    for path, what in leftover_report():
        print(f"  {path}: {what}", file=sys.stderr)
    if problems:
        raise PipelineError(f"{len(problems)} of {len(stores)} feature stores failed the check (above, each with "
                            "its fix)")
    print(f"{len(stores)} feature stores verified: complete, made from the current inputs, every chunk matches "
          "its checksum")
