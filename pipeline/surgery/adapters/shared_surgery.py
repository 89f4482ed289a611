"""Task-agnostic surgery: ONE surgery module for every task, as the `--one` runs of the
ProbSurgery authors' code (1998v7/ProbSurgery) train it. It needs no task id to adapt a
feature, though the task's head still does. Every task's batch trains the same weights: each
step one batch of every task, the objective the sum of the tasks' mean losses (`optimiser:
shared`: the reference's loop instead, one task's batch per step, tasks in turn)."""
from __future__ import annotations

from pipeline.surgery.adapters import adapter
from pipeline.surgery.adapters.surgery import Surgery


@adapter("shared_surgery", label="Shared surgery")
class SharedSurgery(Surgery):
    SHARED = True
