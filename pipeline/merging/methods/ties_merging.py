"""Ties-Merging (Yadav et al., 2023) as the reference runs it: the task vectors flattened
(keys sorted), one global top-k% threshold per task, sign election by the sum of the trimmed
vectors, then the disjoint sum (reference default) or disjoint mean (the TIES paper).

`trim_over: state_dict` counts what the reference code flattens: its ImageEncoder state dict
still holds six text-side tensors whose task vectors are zero, so its "top 20 %" keeps 25.8 %
(ViT-B/32), 25.9 % (B/16) or 22.5 % (L/14) of the image encoder's entries."""
from typing import Annotated, Literal

from pydantic import Field

from pipeline.merging.inputs import MergeInputs
from pipeline.merging.registry import merge_method
from pipeline.merging.task_vectors import StateDict, apply, disjoint_merge, elect_sign, flatten, trim, unflatten

TrimOver = Literal["image_encoder", "state_dict"]  # what k% is a share of


def zeros_counted(inputs: MergeInputs, trim_over: TrimOver) -> int:
    return inputs.reference_text_entries if trim_over == "state_dict" else 0


@merge_method("ties_merging", label="Ties-Merging")
def ties_merging(inputs: MergeInputs, *, k: Annotated[float, Field(gt=0, le=100)] = 20.0,
                 scaling: Annotated[float, Field(gt=0)] = 0.3, merge: Literal["sum", "mean"] = "sum",
                 trim_over: TrimOver = "image_encoder") -> StateDict:
    trimmed = trim(flatten(inputs.vectors), k, zeros_counted(inputs, trim_over))
    merged = disjoint_merge(trimmed, elect_sign(trimmed), mean=merge == "mean")
    return apply(inputs.pretrained, unflatten(merged, inputs.vectors[0]), scaling)
