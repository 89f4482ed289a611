"""TSV-M (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in
Model Merging"), as the authors' code (`compute_and_sum_svd_mem_reduction`) and FusionBench run
it. Per layer matrix: each task's top int(r / T) singular triplets (r = min(m, n)), their left
and their right singular vectors concatenated and each replaced by its nearest orthogonal
matrix (decorrelating the tasks' subspaces), the singular values kept; theta_0 + alpha * the
result. Other tensors: the mean of the task vectors (pipeline/merging/subspaces.py).

`alpha` 1: the paper finds no scaling needed (its Sec. 6.3); FusionBench's default too. The
authors' code can also sweep it on labelled validation data, which no merge here uses."""
from typing import Annotated

import torch
from pydantic import Field

from pipeline.merging.inputs import MergeInputs
from pipeline.merging.registry import merge_method
from pipeline.merging.subspaces import per_matrix, polar
from pipeline.merging.task_vectors import StateDict, apply


def tsv_matrix(stack: torch.Tensor) -> torch.Tensor:
    """(T, m, n) task matrices -> the merged one."""
    tasks = len(stack)
    keep = int(min(stack.shape[1:]) * (1 / tasks))  # the reference's sv_reduction = 1 / T
    u, s, vh = torch.linalg.svd(stack, full_matrices=False)
    u = torch.cat(list(u[:, :, :keep]), 1)           # (m, T keep)
    s = torch.cat(list(s[:, :keep]))
    vh = torch.cat(list(vh[:, :keep]), 0)             # (T keep, n)
    return polar(u) @ torch.diag(s) @ polar(vh)


@merge_method("tsv_merging", label="TSV-M", needs=("device",))
def tsv_merging(inputs: MergeInputs, *, alpha: Annotated[float, Field(gt=0)] = 1.0) -> StateDict:
    merged = per_matrix(inputs.vectors, tsv_matrix, device=inputs.device, progress=inputs.progress, desc="TSV-M")
    return apply(inputs.pretrained, merged, alpha)
