"""Task Arithmetic (Ilharco et al., 2023): theta_0 + lambda * sum_t tau_t."""
from typing import Annotated

from pydantic import Field

from pipeline.merging.inputs import MergeInputs
from pipeline.merging.registry import merge_method
from pipeline.merging.task_vectors import StateDict, apply, sum_vectors


@merge_method("task_arithmetic", label="Task Arithmetic")
def task_arithmetic(inputs: MergeInputs, *, scaling: Annotated[float, Field(gt=0)] = 0.3) -> StateDict:
    return apply(inputs.pretrained, sum_vectors(inputs.vectors), scaling)
