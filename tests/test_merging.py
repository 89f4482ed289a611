"""The merges do what the recipe says, on small hand-checkable state dicts."""
import pytest
import torch

from pipeline import config
from pipeline.errors import PipelineError
from pipeline.merging import registry
from pipeline.merging.inputs import MergeInputs


def merge(name, pre, fts, **params):
    """Run a registered method on in-memory weights, its params validated as params.yaml's are."""
    method = registry.get(name)
    inputs = MergeInputs(name, [f"t{i}" for i in range(len(fts))], pre, fts)
    return method.run(inputs, method.params.model_validate(params)).state


def states(seed=0, n_tasks=3):
    g = torch.Generator().manual_seed(seed)
    pre = {"a.weight": torch.randn(4, 5, generator=g), "b.bias": torch.randn(7, generator=g),
           "steps": torch.tensor([3])}  # integer buffers carry no task vector
    fts = [{k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()) for k, v in pre.items()}
           for _ in range(n_tasks)]
    return pre, fts


def test_weight_averaging_is_the_mean_of_all_finetuned_models():
    pre, fts = states()
    merged = merge("weight_averaging", pre, fts)
    for key in ("a.weight", "b.bias"):
        assert torch.allclose(merged[key], torch.stack([ft[key] for ft in fts]).mean(0), atol=1e-6)
    assert torch.equal(merged["steps"], pre["steps"])


def test_task_arithmetic_adds_scaled_sum_of_task_vectors():
    pre, fts = states()
    merged = merge("task_arithmetic", pre, fts, scaling=0.3)
    expected = pre["a.weight"] + 0.3 * sum(ft["a.weight"] - pre["a.weight"] for ft in fts)
    assert torch.allclose(merged["a.weight"], expected, atol=1e-6)


def test_ties_keeps_global_top_k_per_task_elects_sign_and_sums_agreeing_entries():
    pre = {"w": torch.zeros(5)}
    fts = [{"w": torch.tensor([3.0, -1.0, 0.5, 2.0, -4.0])},
           {"w": torch.tensor([-2.0, 1.0, 0.2, 1.5, -0.1])}]
    # k = 40% of d = 5: the reference's mask |x| >= kthvalue(d - int(d * k)) keeps 3 entries
    merged = merge("ties_merging", pre, fts, k=40, scaling=1.0, merge="sum")
    # task 1 keeps [3, _, _, 2, -4], task 2 keeps [-2, 1, _, 1.5, _]; elected signs + + (+) + -
    assert torch.allclose(merged["w"], torch.tensor([3.0, 1.0, 0.0, 3.5, -4.0]))
    mean = merge("ties_merging", pre, fts, k=100, scaling=1.0, merge="mean")
    # nothing trimmed: entry 0 sum=+1 -> only +3 agrees; entry 3: (2 + 1.5) / 2
    assert torch.allclose(mean["w"][[0, 3]], torch.tensor([3.0, 1.75]))


def test_ties_threshold_is_global_across_tensors_not_per_tensor():
    pre = {"big": torch.zeros(2), "small": torch.zeros(2)}
    fts = [{"big": torch.tensor([10.0, 9.0]), "small": torch.tensor([0.1, 0.2])}]
    merged = merge("ties_merging", pre, fts, k=25, scaling=1.0)
    assert torch.equal(merged["small"], torch.zeros(2))  # a per-tensor top-k would have kept 0.2
    assert torch.equal(merged["big"], torch.tensor([10.0, 9.0]))


def test_unknown_method_and_bad_ties_params_are_refused_naming_the_key():
    with pytest.raises(PipelineError, match="`merge.avg.method` = 'avg'.*ties_merging"):
        config.merge_entries({"avg": {}})
    with pytest.raises(PipelineError, match="`merge.ties_merging.merge` = 'max'.*'sum' or 'mean'"):
        config.merge_entries({"ties_merging": {"merge": "max"}})
    with pytest.raises(PipelineError, match="`merge.ties_merging.k` = 0"):
        config.merge_entries({"ties_merging": {"k": 0}})


def test_a_method_runs_under_several_keys_with_its_own_params_and_readable_labels():
    entries = config.merge_entries({"task_arithmetic": {}, "ta_half": {"method": "task_arithmetic", "scaling": 0.5},
                                    "lw": {"method": "adamerging", "layer_wise": True}})
    assert entries["ta_half"].method == "task_arithmetic" and entries["ta_half"].params.scaling == 0.5
    assert entries["task_arithmetic"].params.scaling == 0.3  # the signature's default
    assert entries["task_arithmetic"].label == "Task Arithmetic (task_arithmetic)"
    assert entries["ta_half"].label == "Task Arithmetic (ta_half)"
    assert entries["lw"].label == "Layer-wise AdaMerging"
