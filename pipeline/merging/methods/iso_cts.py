"""Iso-CTS (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with Common
and Task-Specific Subspaces"), as the authors' code and FusionBench run it. Per layer matrix
(r = min(m, n)): the top singular directions of the summed task matrices form the common
subspace (a share `common_space_fraction` of r, rounded so that the rest divides equally among
the T tasks); each task adds the top directions of its own matrix projected off the common
subspace; the left and the right directions are each replaced by their nearest orthogonal
matrix and every singular value by the mean of the kept ones; theta_0 + alpha * the result.
Other tensors: the mean of the task vectors (pipeline/merging/subspaces.py).

`alpha`: picked on labelled validation data by the authors; the default is the paper's choice
for ViT-B/32 and eight tasks (Table 5: 1.5; B/16 1.6, L/14 1.9), also FusionBench's.
`common_space_fraction` 0.8 is the paper's default for every setting."""
from typing import Annotated

import torch
from pydantic import Field

from pipeline.merging.inputs import MergeInputs
from pipeline.merging.registry import merge_method
from pipeline.merging.subspaces import per_matrix, polar
from pipeline.merging.task_vectors import StateDict, apply


def subspace_sizes(rank: int, tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(common directions, directions per task), as the reference rounds them."""
    common = int(rank * common_space_fraction)
    specific_total = round((rank - common) / tasks) * tasks
    common = rank - specific_total
    return common, int((rank - common) / tasks)


def iso_cts_matrix(stack: torch.Tensor, common_space_fraction: float) -> torch.Tensor:
    """(T, m, n) task matrices -> the merged one."""
    common, per_task = subspace_sizes(min(stack.shape[1:]), len(stack), common_space_fraction)
    u, s, vh = torch.linalg.svd(stack.sum(0), full_matrices=False)
    u, s, vh = u[:, :common], s[:common], vh[:common]
    specific = stack - u @ (u.T @ stack)                  # each task's matrix off the common subspace
    u_t, s_t, vh_t = torch.linalg.svd(specific, full_matrices=False)
    left = torch.cat([*u_t[:, :, :per_task], u], 1)        # the reference's order: tasks, then common
    values = torch.cat([*s_t[:, :per_task], s])
    right = torch.cat([*vh_t[:, :per_task], vh], 0)
    return values.mean() * (polar(left) @ polar(right))


@merge_method("iso_cts", label="Iso-CTS", needs=("device",))
def iso_cts(inputs: MergeInputs, *, alpha: Annotated[float, Field(gt=0)] = 1.5,
            common_space_fraction: Annotated[float, Field(gt=0, le=1)] = 0.8) -> StateDict:
    merged = per_matrix(inputs.vectors, lambda stack: iso_cts_matrix(stack, common_space_fraction),
                        device=inputs.device, progress=inputs.progress, desc="Iso-CTS")
    return apply(inputs.pretrained, merged, alpha)
