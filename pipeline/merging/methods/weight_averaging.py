"""Weight Averaging: the mean of the fine-tuned encoders, theta_0 + (1/T) sum_t tau_t.

The correct mean over ALL tasks (the reference surgery code's coefficient row silently
dropped the last task, DTD)."""
from pipeline.merging.inputs import MergeInputs
from pipeline.merging.registry import merge_method
from pipeline.merging.task_vectors import StateDict, apply, sum_vectors


@merge_method("weight_averaging", label="Weight Averaging")
def weight_averaging(inputs: MergeInputs) -> StateDict:
    return apply(inputs.pretrained, sum_vectors(inputs.vectors), 1.0 / len(inputs.vectors))
