"""Consensus Task Arithmetic (Wang et al., ICML 2024, "Localizing Task Information for Improved
Model Merging and Compression"), as the authors' code (tall_masks) builds it. Each task's TALL
mask keeps the entries where its own task vector outweighs what the others add:
|tau_t| > lambda * |tau_MTL - tau_t|, with tau_MTL = sum_t tau_t; the consensus keeps the
entries at least `k` tasks' masks hold (k = 2 drops the "selfish" weights one task alone uses,
and the "catastrophic" ones none uses); theta_0 + scaling * (tau_MTL masked). Every tensor
counts (the masks are elementwise, so no flattening is needed).

The authors pick lambda per task (0.2 to 0.6) and the scaling (0.1 to 1.0) on labelled
validation data, which no merge here uses: lambda is one value for all tasks, FusionBench's
TALL-mask default 0.6, and the scaling Task Arithmetic's 0.3 (docs/fidelity.md)."""
from typing import Annotated

import torch
from pydantic import Field

from pipeline.merging.inputs import MergeInputs
from pipeline.merging.registry import Merged, merge_method
from pipeline.merging.subspaces import stacked
from pipeline.merging.task_vectors import apply


def tall_masks(stack: torch.Tensor, tall_mask_lambda: float) -> torch.Tensor:
    """(T, ...) task vectors -> (T, ...) boolean TALL masks (strict >, as the reference)."""
    return stack.abs() > tall_mask_lambda * (stack.sum(0) - stack).abs()


@merge_method("consensus_task_arithmetic", label="Consensus TA")
def consensus_task_arithmetic(inputs: MergeInputs, *, scaling: Annotated[float, Field(gt=0)] = 0.3,
                              tall_mask_lambda: Annotated[float, Field(ge=0)] = 0.6,
                              k: Annotated[int, Field(ge=0)] = 2) -> Merged:
    merged, kept, held, total = {}, torch.zeros(len(inputs.tasks)), 0, 0
    for key in inputs.vectors[0]:
        stack = stacked(inputs.vectors, key)
        masks = tall_masks(stack, tall_mask_lambda)
        consensus = masks.sum(0) >= k
        merged[key] = stack.sum(0) * consensus
        kept += masks.flatten(1).sum(1)
        held, total = held + int(consensus.sum()), total + consensus.numel()
    info = {"tall_mask_kept": dict(zip(inputs.tasks, (kept / total).tolist())), "consensus_kept": held / total}
    return Merged(apply(inputs.pretrained, merged, scaling), info)
