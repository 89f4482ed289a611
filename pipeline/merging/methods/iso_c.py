"""Iso-C (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with Common
and Task-Specific Subspaces"), as the authors' code and FusionBench run it. Per layer matrix:
the sum of the task matrices with its singular spectrum made flat (every singular value
replaced by their mean), so that no direction, and no task, dominates; theta_0 + alpha * the
result. Other tensors: the mean of the task vectors (pipeline/merging/subspaces.py).

`alpha`: the authors pick it on labelled validation data (0.1 to 3.0); the default is the
paper's choice for ViT-B/32 and eight tasks (its Table 5: 1.3; B/16 1.4, L/14 1.5). FusionBench
runs 1.5, which the FusionBench presets write."""
from typing import Annotated

import torch
from pydantic import Field

from pipeline.merging.inputs import MergeInputs
from pipeline.merging.registry import merge_method
from pipeline.merging.subspaces import per_matrix
from pipeline.merging.task_vectors import StateDict, apply


def isotropic(matrix: torch.Tensor) -> torch.Tensor:
    """`matrix` with every singular value replaced by their mean."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return s.mean() * (u @ vh)


@merge_method("iso_c", label="Iso-C", needs=("device",))
def iso_c(inputs: MergeInputs, *, alpha: Annotated[float, Field(gt=0)] = 1.3) -> StateDict:
    merged = per_matrix(inputs.vectors, lambda stack: isotropic(stack.sum(0)), device=inputs.device,
                        progress=inputs.progress, desc="Iso-C")
    return apply(inputs.pretrained, merged, alpha)
