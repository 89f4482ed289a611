"""Weight Averaging: the mean of the fine-tuned encoders, theta_0 + (1/T) sum_t tau_t.

The correct mean over ALL tasks by default. `drop_last: true` is what the reference surgery
code computes (and its published "Weight Averaging + Surgery" rows carry): its coefficient row
holds 1/T for only the first T - 1 tasks, so the last task (DTD) is silently left out."""
from pipeline.merging.inputs import MergeInputs
from pipeline.merging.registry import merge_method
from pipeline.merging.task_vectors import StateDict, apply, sum_vectors


@merge_method("weight_averaging", label=lambda p: "Weight Averaging (last task dropped)" if p.drop_last
              else "Weight Averaging")
def weight_averaging(inputs: MergeInputs, *, drop_last: bool = False) -> StateDict:
    kept = inputs.vectors[:-1] if drop_last else inputs.vectors
    return apply(inputs.pretrained, sum_vectors(kept), 1.0 / len(inputs.vectors))
