"""WUDI merging (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It:
Guiding Data-Free Model Merging via Task Vectors"), as the authors' code (vit/wudi_main.py) runs
it. A linear layer's task vector spans the inputs its task feeds it, so the interference the
merged update tau_m causes on task i is measured through tau_i itself: per layer, tau_m
minimises sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2, from the sum of the task
vectors, by Adam (lr 1e-5, 300 iterations), without data; theta_0 + tau_m, unscaled.

`matrices: linear` (the authors'): the transformer blocks' linear weights (open_clip's attention
in/out projections, in_proj as one stacked matrix, and the MLP's c_fc / c_proj; BERT's query, key,
value, attention output and MLP: subspaces.is_block_linear), every other tensor left pretrained. `matrices: all`
(FusionBench's): every layer matrix of pipeline/merging/subspaces.py, the rest the mean of
the task vectors. One layer in memory at a time, on the GPU where there is one.

The step is absolute, so how far 300 iterations get depends on the size of the task vectors:
the miniature world, fine-tuned at a 30x larger learning rate than the real checkpoints, sets
`lr: 1e-4` (its params.yaml says what it measured); the paper presets keep 1e-5."""
from typing import Annotated, Literal

import torch
from pydantic import Field

from pipeline.merging.inputs import MergeInputs
from pipeline.merging.registry import Merged, merge_method
from pipeline.merging.subspaces import is_block_linear, is_layer_matrix, per_matrix
from pipeline.merging.task_vectors import apply

def interference(merged: torch.Tensor, stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i weights_i ||(merged - tau_i) tau_i^T||_F^2 over the (T, m, n) task matrices."""
    product = (merged.unsqueeze(0) - stack) @ stack.transpose(1, 2)
    return (product.square() * weights[:, None, None]).sum()


def wudi_matrix(stack: torch.Tensor, iterations: int, lr: float) -> tuple[torch.Tensor, tuple[float, float]]:
    """(T, m, n) task matrices -> the merged one, and the objective at the start and the end. A
    task whose matrix is zero weighs nothing (the reference would divide by its zero norm)."""
    norms = stack.flatten(1).norm(dim=1).square()
    weights = torch.where(norms > 0, 1 / norms, torch.zeros_like(norms))
    merged = torch.nn.Parameter(stack.sum(0))
    optimiser = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    start = interference(merged.detach(), stack, weights).item()
    for _ in range(iterations):
        loss = interference(merged, stack, weights)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return merged.detach(), (start, interference(merged.detach(), stack, weights).item())


@merge_method("wudi_merging", label="WUDI", needs=("device",))
def wudi_merging(inputs: MergeInputs, *, iterations: Annotated[int, Field(ge=0)] = 300,
                 lr: Annotated[float, Field(gt=0)] = 1e-5, matrices: Literal["linear", "all"] = "linear") -> Merged:
    """`info`: the objective summed over the layers at the start (Task Arithmetic at scaling 1)
    and the end: how far the iterations got (Adam's step is absolute, so a family of larger task
    vectors needs a larger `lr` to get as far)."""
    objective = []  # (start, end) per merged matrix

    def merge(stack: torch.Tensor) -> torch.Tensor:
        merged, ends = wudi_matrix(stack, iterations, lr)
        objective.append(ends)
        return merged

    delta = per_matrix(inputs.vectors, merge, device=inputs.device, progress=inputs.progress, desc="WUDI",
                       chosen=is_block_linear if matrices == "linear" else is_layer_matrix,
                       others="pretrained" if matrices == "linear" else "mean")
    start, end = (sum(values) for values in zip(*objective)) if objective else (0.0, 0.0)
    return Merged(apply(inputs.pretrained, delta),
                  {"objective": {"start": start, "end": end, "ratio": end / start if start else 1.0}})
