"""Fisher Merging, RegMean, Concrete TA/AM, AdaMerging++ and the checkpoint method, each against
an independent formulation on tiny hand-checkable examples (CPU, no data on disk)."""
import copy
import hashlib
import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from pipeline import config
from pipeline.errors import PipelineError
from pipeline.merging import registry
from pipeline.merging.inputs import MergeInputs
from pipeline.merging.methods.concrete import masked_task_arithmetic
from pipeline.merging.methods.fisher_merging import diagonal_fisher, fisher_weighted_mean
from pipeline.merging.methods.regmean import covered_layers, hooks
from pipeline.merging.task_vectors import sum_vectors
from pipeline.models.checkpoints import save_state


TINY = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "width": 16, "layers": 1, "head_width": 8, "patch_size": 8},
        "text_cfg": {"width": 16, "layers": 1, "heads": 2, "context_length": 8, "vocab_size": 32}}


def tiny_encoder(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.CLIP(**TINY).visual.eval()


def tiny_setup(n_tasks: int = 3, images: int = 6, scale: float = 0.05, seed: int = 0):
    """A tiny CLIP image tower, fine-tuned copies, zero-shot heads and unlabeled images per task."""
    encoder = tiny_encoder(seed)
    g = torch.Generator().manual_seed(seed + 1)
    pre = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    fts = [{k: v + scale * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(n_tasks)]
    heads = [torch.randn(3 + t, 16, generator=g) * 10 for t in range(n_tasks)]
    datasets = [[torch.randn(3, 16, 16, generator=g) for _ in range(images)] for _ in range(n_tasks)]
    return encoder, pre, fts, heads, datasets


def run(name, pre, fts, *, encoder=None, heads=None, datasets=None, splits=None, text_entries=None, spec=None,
        **params):
    """Run a registered method on in-memory inputs, its params validated as params.yaml's are."""
    method = registry.get(name)
    inputs = MergeInputs(name, [f"t{i}" for i in range(len(fts))], pre, fts, encoder=encoder, _heads=heads,
                         _datasets=datasets, _splits=splits or {}, _reference_text_entries=text_entries, spec=spec)
    return method.run(inputs, method.params.model_validate(params))


# --- RegMean ------------------------------------------------------------------------------------

def linear_tasks(counts=(10, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(4, 3)
    pre = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in counts]
    # correlated inputs, so the off-diagonal Gram entries matter
    mix = torch.randn(4, 4, generator=g)
    data = [[torch.randn(4, generator=g) @ mix for _ in range(n)] for n in counts]
    return layer, pre, fts, data


def test_regmean_on_one_linear_layer_is_the_least_squares_fit_to_every_task_models_outputs():
    layer, pre, fts, data = linear_tasks(counts=(10, 5))
    # RegMean reads the train splits by default; the test splits are other images
    train = [data[0], data[1]]
    test = [[x * 2 + 1 for x in d] for d in data]
    merged = run("regmean", pre, fts, encoder=layer, datasets=test, splits={"train": train},
                 alpha=1.0, images=100, batch_size=3)
    assert merged.info["images"] == {"t0": 10, "t1": 5}
    xs = [torch.stack(train[0]).double(), torch.stack(train[1]).double()]
    # argmin_W sum_t ||X_t W^T - X_t W_t^T||^2 / n_t: rows of task t weighted by 1/sqrt(n_t)
    x = torch.cat([xt / len(xt) ** 0.5 for xt in xs])
    y = torch.cat([xt / len(xt) ** 0.5 @ ft["weight"].double().T for xt, ft in zip(xs, fts)])
    expected = torch.linalg.lstsq(x, y).solution.T
    torch.testing.assert_close(merged.state["weight"].double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.state["bias"], (fts[0]["bias"] + fts[1]["bias"]) / 2)  # averaged
    assert merged.info["layers"] == ["weight"]


def test_regmean_scales_the_off_diagonal_gram_entries_by_alpha():
    layer, pre, fts, data = linear_tasks(counts=(8, 8), seed=1)
    alpha = 0.4
    merged = run("regmean", pre, fts, encoder=layer, datasets=data, alpha=alpha, images=8, batch_size=8, split="test")
    lhs, rhs = np.zeros((4, 4)), np.zeros((4, 3))
    for xs, ft in zip(data, fts):
        x = torch.stack(xs).double().numpy()
        gram = x.T @ x / len(x)
        gram = alpha * gram + (1 - alpha) * np.diag(np.diag(gram))
        lhs += gram
        rhs += gram @ ft["weight"].double().numpy().T
    np.testing.assert_allclose(merged.state["weight"].double().numpy(), np.linalg.solve(lhs, rhs).T, rtol=1e-5,
                               atol=1e-6)
    # alpha = 0: each input column weighs the task models by its energy alone
    diag = run("regmean", pre, fts, encoder=layer, datasets=data, alpha=0.0, images=8, batch_size=8, split="test")
    energy = [torch.stack(xs).double().pow(2).mean(0) for xs in data]  # (in,) per task
    w = sum(e * ft["weight"].double() for e, ft in zip(energy, fts)) / sum(energy)
    torch.testing.assert_close(diag.state["weight"].double(), w, rtol=1e-5, atol=1e-6)


def test_regmean_captures_the_inputs_each_open_clip_layer_really_multiplies():
    encoder, pre, _, _, datasets = tiny_setup()
    records, seen = {}, {}
    handles = hooks(encoder, lambda key, x: records.__setitem__(key, x.detach()))
    block = encoder.transformer.resblocks[0]
    handles += [block.ln_1.register_forward_hook(lambda m, a, out: seen.__setitem__("ln_1", out)),
                block.ln_2.register_forward_hook(lambda m, a, out: seen.__setitem__("ln_2", out)),
                block.attn.register_forward_hook(lambda m, a, out: seen.__setitem__("attn", out[0])),
                block.mlp.gelu.register_forward_hook(lambda m, a, out: seen.__setitem__("gelu", out))]
    with torch.no_grad():
        features = encoder(torch.stack(datasets[0]))
    for h in handles:
        h.remove()
    p = "transformer.resblocks.0."
    assert set(covered_layers(encoder)) == set(records) == {p + "attn.in_proj_weight", p + "attn.out_proj.weight",
                                                          p + "mlp.c_fc.weight", p + "mlp.c_proj.weight", "proj"}
    torch.testing.assert_close(records[p + "attn.in_proj_weight"], seen["ln_1"])
    # what out_proj multiplies: out_proj of it is the attention module's output
    torch.testing.assert_close(F.linear(records[p + "attn.out_proj.weight"], block.attn.out_proj.weight,
                                        block.attn.out_proj.bias), seen["attn"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(records[p + "mlp.c_fc.weight"], seen["ln_2"])
    torch.testing.assert_close(records[p + "mlp.c_proj.weight"], seen["gelu"])
    torch.testing.assert_close(records["proj"] @ encoder.proj, features, rtol=1e-5, atol=1e-6)


def test_regmean_of_identical_models_is_that_model_and_other_tensors_are_averaged():
    encoder, pre, fts, _, datasets = tiny_setup(n_tasks=2)
    same = run("regmean", pre, [fts[0], copy.deepcopy(fts[0])], encoder=encoder, datasets=datasets, images=4,
               batch_size=3, alpha=0.9, split="test", proj="regmean")
    for key, value in fts[0].items():
        torch.testing.assert_close(same.state[key], value, rtol=1e-4, atol=1e-5)
    merged = run("regmean", pre, fts, encoder=encoder, datasets=datasets, images=4, batch_size=3, split="test")
    assert merged.info["images"] == {"t0": 4, "t1": 4} and merged.info["singular"] == []
    assert merged.info["alpha"] == 0.95 and "proj" not in merged.info["layers"]  # FusionBench's defaults
    average = (fts[0]["proj"] + fts[1]["proj"]) / 2
    torch.testing.assert_close(merged.state["ln_post.bias"], (fts[0]["ln_post.bias"] + fts[1]["ln_post.bias"]) / 2)
    torch.testing.assert_close(merged.state["proj"], average)  # proj averaged, as FusionBench leaves it
    solved = run("regmean", pre, fts, encoder=encoder, datasets=datasets, images=4, batch_size=3, split="test",
                 proj="regmean")
    assert "proj" in solved.info["layers"] and not torch.allclose(solved.state["proj"], average)


# --- Fisher Merging -----------------------------------------------------------------------------

def test_fisher_merging_with_equal_fishers_is_weight_averaging_and_a_dominant_fisher_wins():
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g), "steps": torch.tensor([7])}
    fts = [{k: v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone() for k, v in pre.items()}
           for _ in range(3)]
    equal = {k: torch.rand(v.shape, generator=g) for k, v in pre.items() if v.is_floating_point()}
    merged = fisher_weighted_mean(pre, fts, [equal] * 3)
    average = run("weight_averaging", pre, fts).state
    for key in pre:
        torch.testing.assert_close(merged[key], average[key])
    # all-zero Fishers: the floor alone weighs, the plain average again
    floor = {k: torch.full_like(v, 1e-6) for k, v in equal.items()}
    torch.testing.assert_close(fisher_weighted_mean(pre, fts, [floor] * 3)["w"], average["w"])
    # task 1's Fisher 1e6 times the others': the merge is (nearly) task 1's weights
    big = [{k: v * (1e6 if t == 1 else 1.0) + 1e-3 for k, v in equal.items()} for t in range(3)]
    dominated = fisher_weighted_mean(pre, fts, big)
    torch.testing.assert_close(dominated["w"], fts[1]["w"], rtol=0, atol=1e-4)
    assert torch.equal(dominated["steps"], pre["steps"])


def test_diagonal_fisher_is_the_mean_squared_per_image_gradient_of_the_sampled_labels_log_likelihood():
    encoder, pre, fts, heads, datasets = tiny_setup()
    images = torch.stack(datasets[0][:5])
    fisher, n = diagonal_fisher(encoder, fts[0], heads[0], [images[:3], images[3:]],
                                generator=torch.Generator().manual_seed(7), device=torch.device("cpu"))
    assert n == 5
    # independently: an ordinary module, one image at a time, labels drawn as documented
    model = copy.deepcopy(encoder)
    model.load_state_dict(fts[0])
    generator = torch.Generator().manual_seed(7)
    expected = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    for batch in (images[:3], images[3:]):
        with torch.no_grad():
            probs = (F.normalize(model(batch), dim=-1) @ heads[0].T).softmax(-1)
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        for image, label in zip(batch, labels):
            logp = (F.normalize(model(image[None]), dim=-1) @ heads[0].T).log_softmax(-1)[0, label]
            grads = torch.autograd.grad(logp, list(model.parameters()))
            for (key, _), grad in zip(model.named_parameters(), grads):
                expected[key] += grad.pow(2) / 5
    assert set(fisher) == set(expected)
    for key in expected:
        torch.testing.assert_close(fisher[key], expected[key], rtol=1e-4, atol=1e-9)


def test_fisher_merging_is_an_entrywise_convex_combination_and_reports_each_tasks_fisher():
    encoder, pre, fts, heads, datasets = tiny_setup(n_tasks=2)
    merged = run("fisher_merging", pre, fts, encoder=encoder, heads=heads, datasets=datasets, images=4, batch_size=3,
                 split="test")
    info = merged.info
    assert [info["fisher"][t]["images"] for t in ("t0", "t1")] == [4, 4]
    assert all(info["fisher"][t]["norm"] > 0 for t in ("t0", "t1"))
    for key, value in merged.state.items():
        low = torch.minimum(fts[0][key], fts[1][key])
        high = torch.maximum(fts[0][key], fts[1][key])
        assert ((value >= low - 1e-6) & (value <= high + 1e-6)).all(), key
    again = run("fisher_merging", pre, fts, encoder=encoder, heads=heads, datasets=datasets, images=4, batch_size=3,
                split="test")
    assert all(torch.equal(again.state[k], merged.state[k]) for k in merged.state)  # seeded


# --- AdaMerging++ -------------------------------------------------------------------------------

@pytest.mark.parametrize("layer_wise, trim_over", [(False, "image_encoder"), (True, "image_encoder"),
                                                   (True, "state_dict")])
def test_adamerging_pp_with_frozen_coefficients_is_ties_merging(layer_wise, trim_over):
    encoder, pre, fts, heads, datasets = tiny_setup()
    zeros = sum(v.numel() for v in pre.values()) // 2  # text-side entries, as the reference flattens them
    frozen = run("adamerging_pp", pre, fts, encoder=encoder, heads=heads, datasets=datasets, layer_wise=layer_wise,
                 k=30.0, init=0.3, lr=1e-12, steps=1, batch_size=2, batches_per_task=1, trim_over=trim_over,
                 text_entries=zeros)
    ties = run("ties_merging", pre, fts, k=30.0, scaling=0.3, merge="sum", trim_over=trim_over,
               text_entries=zeros).state
    for key in pre:
        torch.testing.assert_close(frozen.state[key], ties[key], rtol=0, atol=1e-6)
    assert np.allclose(frozen.info["lambdas"], 0.3)
    # the top 30% of each task vector (of 1.5 times as many entries with the text side), less
    # the entries that disagree with the elected sign
    share = 0.3 * (1.5 if trim_over == "state_dict" else 1)
    assert all(0.5 * share < kept < share + 1e-3 for kept in frozen.info["kept"].values())


def test_adamerging_pp_learns_its_coefficients():
    encoder, pre, fts, heads, datasets = tiny_setup(scale=0.5)
    learned = run("adamerging_pp", pre, fts, encoder=encoder, heads=heads, datasets=datasets, layer_wise=False,
                  lr=0.01, steps=5, batch_size=6, batches_per_task=1)
    assert not np.allclose(learned.info["lambdas"], 0.3)
    assert learned.info["loss_last"] < learned.info["loss_first"]


# --- published AdaMerging coefficients ----------------------------------------------------------

def authors_file(path, tables: dict) -> None:
    """A coefficient file in the authors' layout (src/merging_cofficient.py), with their WA row too."""
    lines = ["def get_merging_cofficients(method='task_arithmetic', model='ViT-B-32'):",
             "    avg_weight = 1 / 8", "    if method == 'weight_averaging':", "        ralpha = [[1.0, avg_weight]]"]
    for (method, model), rows in tables.items():
        lines += [f"    elif method == '{method}' and model == '{model}':", "        # learned", f"        ralpha = {rows}"]
    path.write_text("\n".join(lines + ["    return ralpha", ""]))


@pytest.mark.parametrize("layer_wise", [False, True])
def test_published_coefficients_merge_as_the_authors_code_applies_its_table(tmp_path, layer_wise):
    """Their forward: one row per tensor of the flattened ImageEncoder state dict (text side
    included, zero task vectors), merged = sum_i row[i] * [theta_0, tau_1, ..., tau_T][i]."""
    from pipeline.models import clip

    encoder, pre, fts, heads, datasets = tiny_setup()
    spec = {"model_cfg": TINY}
    layout = list(clip.reference_layout(spec))
    g = torch.Generator().manual_seed(3)
    rows = [[1.0, *torch.rand(len(fts), generator=g).round(decimals=4).tolist()]
            for _ in range(len(layout) if layer_wise else 1)]
    table = "lw_adamerging" if layer_wise else "tw_adamerging"
    authors_file(tmp_path / "merging_cofficient.py", {(table, "Tiny"): rows, ("lw_adamerging", "Other"): rows[:2]})
    result = run("adamerging", pre, fts, encoder=encoder, heads=heads, datasets=datasets, spec=spec,
                 layer_wise=layer_wise, coefficients=str(tmp_path / "merging_cofficient.py"),
                 coefficients_model="Tiny")
    # the reference's forward, over its own layout (text-side tensors: pretrained only)
    shapes = {k: v.shape for k, v in clip.build_clip(spec, device="meta").state_dict().items()}
    reference = {}
    for i, name in enumerate(layout):
        key = name.removeprefix("visual.")
        params = ([pre[key], *[ft[key] - pre[key] for ft in fts]] if name.startswith("visual.")
                  else [torch.zeros(shapes[name])] * (len(fts) + 1))
        reference[name] = sum(p * alpha for p, alpha in zip(params, rows[i if layer_wise else 0]))
    for key in pre:
        torch.testing.assert_close(result.state[key], reference["visual." + key], rtol=0, atol=1e-6)
    assert result.info["table"] == table and "loss_first" not in result.info  # nothing learned
    label = registry.get("adamerging").display(registry.get("adamerging").params(layer_wise=layer_wise,
                                                                                   coefficients="f"))
    assert label.endswith("(published coefficients)")


def test_a_coefficient_table_that_does_not_fit_is_refused_with_what_is_wrong(tmp_path):
    encoder, pre, fts, heads, datasets = tiny_setup()
    spec = {"model_cfg": TINY}
    path = tmp_path / "merging_cofficient.py"
    kw = dict(encoder=encoder, heads=heads, datasets=datasets, spec=spec, coefficients=str(path))

    authors_file(path, {("lw_adamerging", "ViT-B-32"): [[1.0, 0.3, 0.3, 0.3]] * 158})
    with pytest.raises(PipelineError, match="158 rows, expected one per tensor.*another architecture"):
        run("adamerging", pre, fts, coefficients_model="ViT-B-32", **kw)
    with pytest.raises(PipelineError, match="no `ralpha` table for method 'tw_adamerging' and model 'ViT-B-32'.*"
                                            "found: lw_adamerging/ViT-B-32"):
        run("adamerging", pre, fts, layer_wise=False, coefficients_model="ViT-B-32", **kw)
    with pytest.raises(PipelineError, match="not a named open_clip architecture.*coefficients_model"):
        run("adamerging", pre, fts, **kw)
    authors_file(path, {("tw_adamerging", "Tiny"): [[1.0, 0.3, 0.3]]})
    with pytest.raises(PipelineError, match="4 numbers for the 3 tasks"):
        run("adamerging", pre, fts, layer_wise=False, coefficients_model="Tiny", **kw)
    authors_file(path, {("tw_adamerging", "Tiny"): [[0.5, 0.3, 0.3, 0.3]]})
    with pytest.raises(PipelineError, match="first column .* must be 1.0"):
        run("adamerging", pre, fts, layer_wise=False, coefficients_model="Tiny", **kw)
    from pipeline.models import clip

    names = list(clip.reference_layout(spec))
    (tmp_path / "t.json").write_text(json.dumps({"names": names[1:] + names[:1], "rows": [[1.0, .3, .3, .3]] * len(names)}))
    with pytest.raises(PipelineError, match="names differ from the reference layout at row 0"):
        run("adamerging", pre, fts, **{**kw, "coefficients": str(tmp_path / "t.json")})
    with pytest.raises(PipelineError, match="does not exist"):
        run("adamerging", pre, fts, **{**kw, "coefficients": str(tmp_path / "none.py")})


# --- Concrete TA / AM ---------------------------------------------------------------------------

def test_concrete_with_an_all_ones_mask_is_task_arithmetic():
    encoder, pre, fts, heads, datasets = tiny_setup()
    ta = run("task_arithmetic", pre, fts, scaling=0.3).state
    vectors = [{k: ft[k] - v for k, v in pre.items()} for ft in fts]
    ones = masked_task_arithmetic(pre, sum_vectors(vectors), {k: torch.ones_like(v) for k, v in pre.items()}, 0.3)
    # the learned method, its logits far above 0 (probability ~1): the thresholded mask is all ones
    learned = run("concrete_task_arithmetic", pre, fts, encoder=encoder, heads=heads, datasets=datasets,
                  init_logit=8.0, steps=2, batch_size=3, final_mask="threshold")
    for key in pre:
        torch.testing.assert_close(ones[key], ta[key])
        torch.testing.assert_close(learned.state[key], ta[key])
    assert learned.info["mask"]["kept"] == 1.0 and set(learned.info["mask"]["kept_per_tensor"].values()) == {1.0}


def test_concrete_mask_reports_its_sparsity_and_masks_what_it_drops():
    encoder, pre, fts, heads, datasets = tiny_setup()
    none = run("concrete_task_arithmetic", pre, fts, encoder=encoder, heads=heads, datasets=datasets,
               init_logit=-8.0, steps=2, batch_size=3, final_mask="threshold")
    assert none.info["mask"]["kept"] == 0.0 and none.info["mask"]["mean_probability"] < 1e-3
    for key in pre:
        torch.testing.assert_close(none.state[key], pre[key])  # nothing kept: the pretrained encoder
    learned = run("concrete_task_arithmetic", pre, fts, encoder=encoder, heads=heads, datasets=datasets,
                  lr=0.05, steps=4, batch_size=3, final_mask="threshold")
    mask = learned.info["mask"]
    assert mask["final"] == "threshold" and 0 < mask["kept"] < 1 and 0 < mask["mean_probability"] < 1
    sizes = {k: v.numel() for k, v in pre.items()}
    weighted = sum(mask["kept_per_tensor"][k] * sizes[k] for k in sizes) / sum(sizes.values())
    assert mask["kept"] == pytest.approx(weighted)
    # each merged entry is either the pretrained one (dropped) or TA's delta rescaled by 1/kept of its tensor
    ta = run("task_arithmetic", pre, fts, scaling=0.3).state
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    delta, ta_delta = learned.state[key] - pre[key], ta[key] - pre[key]
    kept = delta.abs() > 0
    assert kept.float().mean().item() == pytest.approx(mask["kept_per_tensor"][key])
    torch.testing.assert_close(delta[kept], ta_delta[kept] / mask["kept_per_tensor"][key], rtol=1e-4, atol=1e-6)


def test_concrete_mask_learning_lowers_the_entropy():
    # a warm relaxation (temperature 20) keeps the sampling noise small against the gradient's
    # signal, so a few steps show the objective's descent rather than the noise
    encoder, pre, fts, heads, datasets = tiny_setup(images=4, scale=0.5)
    learned = run("concrete_task_arithmetic", pre, fts, encoder=encoder, heads=heads, datasets=datasets,
                  lr=1.0, steps=5, batch_size=4, temperature=20.0)
    assert learned.info["mask_loss_last"] < learned.info["mask_loss_first"] / 2


def test_concrete_adamerging_learns_a_mask_then_coefficients_over_the_masked_vectors():
    encoder, pre, fts, heads, datasets = tiny_setup()
    result = run("concrete_adamerging", pre, fts, encoder=encoder, heads=heads, datasets=datasets, init_logit=8.0,
                 mask_steps=2, lr=1e-12, steps=1, batch_size=3, final_mask="threshold")
    ta = run("task_arithmetic", pre, fts, scaling=0.3).state  # all-ones mask, coefficients frozen at 0.3
    for key in pre:
        torch.testing.assert_close(result.state[key], ta[key], rtol=0, atol=1e-6)
    assert np.array(result.info["lambdas"]).shape == (3, len(pre)) and result.info["mask"]["kept"] == 1.0
    assert registry.get("concrete_adamerging").display(registry.get("concrete_adamerging").params()) == "Concrete AM"


# --- the checkpoint method ----------------------------------------------------------------------

def test_checkpoint_method_round_trips_a_saved_encoder_and_records_its_hash(tmp_path):
    _, pre, fts, _, _ = tiny_setup()
    path = tmp_path / "mine.safetensors"
    save_state(path, fts[1])
    result = run("checkpoint", pre, fts, path=str(path))
    for key in pre:
        assert torch.equal(result.state[key], fts[1][key])
    assert result.info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert result.info["format"] == "safetensors"
    # a whole-CLIP torch file (keys under `visual.`), as `repsurgery convert` reads it too
    whole = tmp_path / "whole.pt"
    torch.save({f"visual.{k}": v for k, v in fts[2].items()} | {"logit_scale": torch.tensor(1.0)}, whole)
    assert all(torch.equal(run("checkpoint", pre, fts, path=str(whole)).state[k], fts[2][k]) for k in pre)
    entry = config.merge_entries({"mine": {"method": "checkpoint", "path": str(path)}})["mine"]
    assert entry.label == "Checkpoint mine.safetensors"


def test_checkpoint_method_missing_or_mismatched_file_is_one_clear_line(tmp_path):
    _, pre, fts, _, _ = tiny_setup()
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(PipelineError, match=r"nope\.safetensors does not exist.*set the entry's `path`") as exc:
        run("checkpoint", pre, fts, path=str(missing))
    assert "\n" not in str(exc.value)
    wrong = dict(fts[0], proj=torch.zeros(16, 8))
    save_state(tmp_path / "wrong.safetensors", wrong)
    with pytest.raises(PipelineError, match=r"wrong\.safetensors.*'proj' has shape \(16, 8\)") as exc:
        run("checkpoint", pre, fts, path=str(tmp_path / "wrong.safetensors"))
    assert "\n" not in str(exc.value)
    with pytest.raises(PipelineError, match="`merge.mine.path` is missing"):
        config.merge_entries({"mine": {"method": "checkpoint"}})


# --- params and splits --------------------------------------------------------------------------

@pytest.mark.parametrize("entry, message", [
    ({"regmean": {"alpha": 1.5}}, "`merge.regmean.alpha` = 1.5"),
    ({"regmean": {"alpha": -0.1}}, "`merge.regmean.alpha` = -0.1"),
    ({"fisher_merging": {"images": -1}}, "`merge.fisher_merging.images` = -1"),
    ({"fisher_merging": {"floor": 0.0}}, "`merge.fisher_merging.floor` = 0.0"),
    ({"ct": {"method": "concrete_task_arithmetic", "temperature": 0}}, "`merge.ct.temperature` = 0"),
    ({"ct": {"method": "concrete_task_arithmetic", "final_mask": "soft"}}, "`merge.ct.final_mask` = 'soft'"),
    ({"am": {"method": "concrete_adamerging", "mask_steps": 0}}, "`merge.am.mask_steps` = 0"),
    ({"pp": {"method": "adamerging_pp", "k": 120}}, "`merge.pp.k` = 120"),
    ({"pp": {"method": "adamerging_pp", "split": "val"}}, "`merge.pp.split` = 'val'"),
])
def test_bad_params_of_the_new_methods_are_refused_naming_the_key(entry, message):
    with pytest.raises(PipelineError, match=message.replace(".", r"\.").replace("(", r"\(")):
        config.merge_entries(entry)


def test_table_one_entries_validate_with_readable_labels():
    entries = config.merge_entries({
        "fisher_merging": {}, "regmean": {}, "concrete_task_arithmetic": {}, "concrete_adamerging": {},
        "tw_adamergingpp": {"method": "adamerging_pp", "layer_wise": False},
        "lw_adamergingpp": {"method": "adamerging_pp", "layer_wise": True}})
    assert {k: e.label for k, e in entries.items()} == {
        "fisher_merging": "Fisher Merging", "regmean": "RegMean", "concrete_task_arithmetic": "Concrete TA",
        "concrete_adamerging": "Concrete AM", "tw_adamergingpp": "Task-wise AdaMerging++",
        "lw_adamergingpp": "Layer-wise AdaMerging++"}


def test_a_split_is_read_as_named_and_a_task_without_it_is_a_clear_error(tmp_path):
    from pipeline.data.datasets import has_split

    inputs = MergeInputs("m", ["a", "b"], {}, [], _datasets=[["ta"], ["tb"]], _splits={"train": [["xa"], None]})
    assert inputs.dataset(0, "train") == ["xa"] and inputs.dataset(1, "test") == ["tb"]
    with pytest.raises(PipelineError, match=r"learns on the train split, which b lacks .*`source.splits`") as exc:
        inputs.dataset(1, "train")
    assert "\n" not in str(exc.value)
    opened = []
    def open_split(task, split):
        opened.append((task, split))
        return [task + split]

    lazy = MergeInputs("m", ["a", "b"], {}, [], _datasets=[["ta"], ["tb"]], _open=open_split)
    assert lazy.check_split("train") == "train" and [lazy.dataset(t, "train") for t in (0, 1)] == [["atrain"], ["btrain"]]
    assert opened == [("a", "train"), ("b", "train")]  # opened once, on first use
    (tmp_path / "a" / "data").mkdir(parents=True)
    (tmp_path / "a" / "data" / "train-00000-of-00001.parquet").write_bytes(b"")
    assert has_split(tmp_path, "a", "train") and not has_split(tmp_path, "a", "test")
    assert not has_split(tmp_path, "zzz", "train")
