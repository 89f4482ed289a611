"""The merges do what the recipe says, on small hand-checkable state dicts."""
import pytest
import torch

from pipeline import config
from pipeline.errors import PipelineError
from pipeline.merging import registry
from pipeline.merging.inputs import MergeInputs


def merge(name, pre, fts, text_entries=None, **params):
    """Run a registered method on in-memory weights, its params validated as params.yaml's are."""
    method = registry.get(name)
    inputs = MergeInputs(name, [f"t{i}" for i in range(len(fts))], pre, fts, _reference_text_entries=text_entries)
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


def test_weight_averaging_as_the_reference_ran_it_leaves_out_the_last_task_but_still_divides_by_all():
    pre, fts = states(n_tasks=4)
    merged = merge("weight_averaging", pre, fts, drop_last=True)
    expected = pre["a.weight"] + sum(ft["a.weight"] - pre["a.weight"] for ft in fts[:3]) / 4  # 1/T, T - 1 tasks
    assert torch.allclose(merged["a.weight"], expected, atol=1e-6)
    assert config.merge_entries({"weight_averaging": {"drop_last": True}})["weight_averaging"].label == \
        "Weight Averaging (last task dropped)"


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


def test_ties_trim_over_the_reference_state_dict_counts_its_zero_text_side_entries():
    """As if the zero task vectors of the text-side tensors were flattened with the rest: the
    threshold of the longer row, so more of the image encoder's entries are kept."""
    pre, fts = states(n_tasks=3)
    n_zeros = 9
    padded_pre = {**pre, "text": torch.zeros(n_zeros)}
    padded_fts = [{**ft, "text": torch.zeros(n_zeros)} for ft in fts]
    for name, params in (("ties_merging", {"k": 30, "scaling": 1.0}),):
        reference = merge(name, pre, fts, text_entries=n_zeros, trim_over="state_dict", **params)
        literal = merge(name, padded_pre, padded_fts, **params)
        assert all(torch.equal(reference[key], literal[key]) for key in pre)
        clean = merge(name, pre, fts, **params)
        changed = lambda state: sum(int((state[k] != pre[k]).sum()) for k in ("a.weight", "b.bias"))
        assert changed(reference) > changed(clean)
    with pytest.raises(PipelineError, match="layout is that of a CLIP image encoder"):
        merge("ties_merging", pre, fts, trim_over="state_dict")


@pytest.mark.parametrize("arch, kept", [("ViT-B-32-quickgelu", 25.8), ("ViT-B-16-quickgelu", 25.9),
                                        ("ViT-L-14-quickgelu", 22.5)])
def test_the_reference_ties_top_20_percent_keeps_the_published_share_of_the_image_encoder(arch, kept):
    """The recipe's figures, from the architectures alone (meta device, no weights)."""
    from pipeline.models import clip

    spec = clip.spec_from_open_clip(arch)
    visual = sum(p.numel() for p in clip.build_clip(spec, device="meta").visual.state_dict().values())
    layout = clip.reference_layout(spec)
    assert [k for k in layout if not k.startswith("visual.")] == ["positional_embedding", "text_projection",
                                                                   "logit_scale", "token_embedding.weight",
                                                                   "ln_final.weight", "ln_final.bias"]
    total = sum(layout.values())
    assert total - visual == MergeInputs("ties_merging", [], {}, [], spec=spec).reference_text_entries
    assert round(100 * int(total * 0.2) / visual, 1) == kept


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


def test_a_learned_merge_decodes_each_image_of_a_small_split_once():
    from pipeline.data.datasets import Remembered, loader

    class Counting(torch.utils.data.Dataset):
        def __init__(self, rows: int, side: int = 4):
            self.rows, self.side, self.decoded = rows, side, 0

        def __len__(self):
            return self.rows

        def __getitem__(self, index):
            self.decoded += 1
            return torch.full((3, self.side, self.side), float(index))

    small = Counting(40)
    assert Remembered.fits(small)
    kept = Remembered(small)
    epochs = [torch.cat(list(loader(kept, 16, shuffle=True, seed=epoch))) for epoch in range(3)]
    assert small.decoded == 1 + 40  # the size check, then each image once over three epochs
    assert sorted(epochs[2][:, 0, 0, 0].tolist()) == list(range(40))
    assert not Remembered.fits(Counting(4097)), "splits read by loader workers are decoded as before"
    assert not Remembered.fits(Counting(1000, side=224)), "and so are splits over the memory budget"


def test_the_phases_of_a_learned_merge_share_a_small_split_s_decodes():
    """Concrete AM's mask phase and its AdaMerging phase read the same images: decoded once."""
    class Counting(torch.utils.data.Dataset):
        decoded = 0

        def __len__(self):
            return 40

        def __getitem__(self, index):
            Counting.decoded += 1
            return torch.full((3, 4, 4), float(index))

    inputs = MergeInputs("m", ["a"], {}, [], _datasets=[Counting()])
    for phase_seed in (0, 1):  # two streams over the split, as two phases open them
        stream = inputs.stream(0, 8, seed=phase_seed)
        for _ in range(5):
            next(stream)
    assert Counting.decoded == 1 + 40  # the size check, then each image once


def test_every_tasks_stream_of_a_large_split_gets_its_share_of_the_decode_workers(monkeypatch):
    """A learned merge reads all tasks' streams at every step: 8 tasks on 16 cores get 2 workers
    each rather than 15 each (120 processes)."""
    from pipeline.data import datasets

    seen = []
    monkeypatch.setattr(datasets, "cores", lambda: 16)
    monkeypatch.setattr(datasets, "loader", lambda *a, workers=None, **kw: seen.append(workers) or [torch.zeros(1)])
    large = torch.utils.data.TensorDataset(torch.zeros(5000, 1))
    inputs = MergeInputs("m", [f"t{i}" for i in range(8)], {}, [], _datasets=[large] * 8)
    next(inputs.stream(0, 8, seed=0))
    assert seen == [2]
