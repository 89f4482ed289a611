"""Ties-Merging (Yadav et al., 2023) as the reference runs it: the task vectors flattened
(keys sorted), one global top-k% threshold per task, sign election by the sum of the trimmed
vectors, then the disjoint sum (reference default) or disjoint mean (the TIES paper)."""
from typing import Annotated, Literal

from pydantic import Field

from pipeline.merging.inputs import MergeInputs
from pipeline.merging.registry import merge_method
from pipeline.merging.task_vectors import StateDict, apply, disjoint_merge, elect_sign, flatten, trim, unflatten


@merge_method("ties_merging", label="Ties-Merging")
def ties_merging(inputs: MergeInputs, *, k: Annotated[float, Field(gt=0, le=100)] = 20.0,
                 scaling: Annotated[float, Field(gt=0)] = 0.3, merge: Literal["sum", "mean"] = "sum") -> StateDict:
    trimmed = trim(flatten(inputs.vectors), k)
    merged = disjoint_merge(trimmed, elect_sign(trimmed), mean=merge == "mean")
    return apply(inputs.pretrained, unflatten(merged, inputs.vectors[0]), scaling)
