"""AdaMerging++ (Yang et al., 2024, "AdaMerging: Adaptive Model Merging for Multi-Task
Learning", ICLR): AdaMerging over Ties-Merging's processed task vectors.

    tau_t' = the entries of tau_t that survive Ties-Merging's trim (top-k% magnitudes of each
             task vector with ONE global threshold per task, tensors flattened in sorted-key
             order) and agree with the elected sign (sign of the sum of the trimmed vectors)
    theta  = theta_0 + sum_t lambda_t * tau_t'

with lambda one coefficient per task (task-wise, metrics key `tw_adamergingpp`) or per task
and parameter tensor (layer-wise, `lw_adamergingpp`), learned exactly as AdaMerging learns
them (`methods/adamerging.py`: init 0.3, clamped to [0, 1], entropy of the zero-shot head's
predictions summed over tasks, Adam lr 1e-3, 500 steps, 2 batches of 16 images per task and
step, gradients accumulated task by task). The processing is `task_vectors.ties_vectors`,
the same trim / sign election Ties-Merging runs; with the coefficients left at `init`,
theta equals Ties-Merging with `merge: sum` and `scaling: init`.

Defaults: layer_wise true, k 20, init 0.3, lr 1e-3, steps 500, batch_size 16,
batches_per_task 2, seed 0, split test (the paper's unlabeled test images), trim_over
image_encoder (`state_dict`: k% of what the reference code flattens, as Ties-Merging's
`trim_over`). `coefficients: FILE` takes the authors'
published table instead of learning (as `adamerging`); their tables were learned over the
reference trim, so pair it with `trim_over: state_dict`.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

from pipeline.merging.inputs import MergeInputs, Split
from pipeline.merging.methods.adamerging import Positive, Precision, adapt, label, table_name
from pipeline.merging.methods.ties_merging import TrimOver, zeros_counted
from pipeline.merging.registry import Merged, merge_method
from pipeline.merging.task_vectors import ties_vectors


@merge_method("adamerging_pp", needs=("heads", "images", "device"), label=label("AdaMerging++"))
def adamerging_pp(inputs: MergeInputs, *, layer_wise: bool = True, k: Annotated[float, Field(gt=0, le=100)] = 20.0,
                  init: Annotated[float, Field(ge=0, le=1)] = 0.3, lr: Annotated[float, Field(gt=0)] = 1e-3,
                  steps: Positive = 500, batch_size: Positive = 16, batches_per_task: Positive = 2, seed: int = 0,
                  split: Split = "test", trim_over: TrimOver = "image_encoder", coefficients: str | None = None,
                  coefficients_model: str = "auto", precision: Precision = "float32") -> Merged:
    vectors = ties_vectors(inputs.vectors, k, zeros_counted(inputs, trim_over))
    result = adapt(inputs, vectors, layer_wise=layer_wise, init=init, lr=lr, steps=steps,
                   per_task=batch_size * batches_per_task, seed=seed, split=split, coefficients=coefficients,
                   coefficients_model=coefficients_model, table=table_name(layer_wise, "pp"), precision=precision)
    kept = [sum(int((v != 0).sum()) for v in tv.values()) / max(1, sum(v.numel() for v in tv.values()))
            for tv in vectors]
    result.info.update({"k": k,
                        "kept": dict(zip(inputs.tasks, kept))})  # share of each task vector's entries kept
    return result
