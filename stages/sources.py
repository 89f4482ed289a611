"""Stage sources, the first of the pipeline: a real source must be complete locally before
stage `data` runs, as DVC deletes a stage's outputs before running it, so an offline
`dvc repro` after `repsurgery preset paper-...` stops here with the world's data intact."""
from __future__ import annotations

from pipeline import workspace
from pipeline.config import Params


def check_sources(params: Params) -> None:
    """Record where every model and test split comes from -> results/sources.json."""
    if params.is_world:
        record = {"source": "world"}
    else:
        from pipeline.data import sources

        record = sources.check(params.source, params.tasks, workspace.SPLIT)
    workspace.write_json(workspace.SOURCES, record)
    print("the miniature world, built offline" if params.is_world else
          f"{len(record)} sources available locally; recorded in {workspace.SOURCES}")
