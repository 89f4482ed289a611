"""The reference code's choices, each against a literal transcription of what the reference
computes (FusionBench @54c9e8c: concrete_subspace/clip_concrete_adamerging.py,
fisher_merging/clip_fisher_merging.py; torch's RelaxedBernoulli), on a tiny CLIP image tower."""
import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from pipeline.merging import registry
from pipeline.merging.inputs import MergeInputs
from pipeline.merging.methods.adamerging import MergeCoefficients, entropy
from pipeline.merging.methods.concrete import InnerStep, final, learn_mask
from pipeline.merging.methods.fisher_merging import expected_fisher

TINY = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "width": 16, "layers": 1, "head_width": 8, "patch_size": 8},
        "text_cfg": {"width": 16, "layers": 1, "heads": 2, "context_length": 8, "vocab_size": 32}}


def tiny(n_tasks: int = 3, scale: float = 0.3):
    torch.manual_seed(0)
    encoder = open_clip.CLIP(**TINY).visual.eval()
    g = torch.Generator().manual_seed(1)
    pre = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    vectors = [{k: scale * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(n_tasks)]
    heads = [torch.randn(3 + t, 16, generator=g) * 10 for t in range(n_tasks)]
    return encoder, pre, vectors, heads, g


def fusionbench_entropy(logits: torch.Tensor) -> torch.Tensor:
    """fusion_bench/method/adamerging/entropy_loss.py"""
    probs = logits.softmax(-1)
    return -(probs * torch.log(probs + 1e-8)).sum(-1).mean()


def exact_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The same without the 1e-8 inside the log (the loop's transcription uses it: Adam turns the
    eps's ~1e-8 change of near-zero gradients into visible steps of the mask logits)."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()


def test_the_entropy_is_the_reference_s_up_to_its_eps():
    logits = torch.randn(64, 10) * 5
    assert entropy(logits).item() == pytest.approx(fusionbench_entropy(logits).item(), abs=1e-6)
    assert entropy(logits).item() == pytest.approx(exact_entropy(logits).item(), rel=1e-6)


def head_logits(encoder, state, images, head):
    return F.normalize(functional_call(encoder, state, (images,)), dim=-1) @ head.T


@pytest.fixture
def float64():
    """Both sides in float64: Adam's steps on near-zero gradients (lr 1 on the coefficients)
    magnify float32 rounding, which differs with the order of the sums."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("layer_wise", [False, True])
def test_the_bilevel_mask_step_is_fusionbench_s_concrete_adamerging_loop(layer_wise, float64):
    encoder, pre, vectors, heads, g = tiny()
    keys = sorted(vectors[0])  # the layer-wise coefficients' columns, in MergeCoefficients' order
    steps, temperature, init, n = 3, 0.5, 0.3, len(vectors)
    # per task: the inner batch, then the mask step's batch, of every step
    batches = [[torch.randn(4, 3, 16, 16, generator=g) for _ in range(2 * steps)] for _ in range(n)]

    coeffs = MergeCoefficients(pre, vectors, layer_wise=layer_wise, init=init, clamp=False)
    inner = InnerStep(coeffs, init=init, lr=1.0, gradient_at="previous")
    logits, _ = learn_mask(encoder, vectors[0], coeffs.merged, heads, [iter(b) for b in batches],
                           temperature=temperature, steps=steps, lr=1e-3, init_logit=0.0,
                           generator=torch.Generator().manual_seed(5), device=torch.device("cpu"), inner=inner)

    # the transcription: clip_concrete_adamerging.py's mask loop (L139-198 task-wise, L412-471
    # layer-wise), with the same logistic noise (RelaxedBernoulli.rsample at logits l)
    noise_source = torch.Generator().manual_seed(5)
    merge_weight = torch.full((n, len(keys)) if layer_wise else (n,), init, requires_grad=True)
    init_weight = copy.deepcopy(merge_weight.detach())
    mask_logits = {k: torch.zeros(v.shape, requires_grad=True) for k, v in vectors[0].items()}
    base_optimizer = torch.optim.Adam([merge_weight], lr=1.0)
    optimizer = torch.optim.Adam(list(mask_logits.values()), lr=1e-3)

    def merge_weights(task_vector_mask):  # TaskWiseMergedModel / LayerWiseMergedModel.merge_weights
        state = dict(pre)
        for i, key in enumerate(keys):
            for t in range(n):
                w = merge_weight[t, i] if layer_wise else merge_weight[t]
                state[key] = state[key] + vectors[t][key] * (w * task_vector_mask[key])
        return state

    for step in range(steps):
        mask = {}
        for k, logit in mask_logits.items():
            u = torch.rand(logit.shape, generator=noise_source).clamp(1e-6, 1 - 1e-6)
            mask[k] = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / temperature)
        mask = {k: m / torch.mean(m) for k, m in mask.items()}
        state = merge_weights({k: m.detach() for k, m in mask.items()})  # (a): merged eagerly, then the reset
        merge_weight.data = copy.deepcopy(init_weight)                    # (b)
        total_loss = sum(exact_entropy(head_logits(encoder, state, batches[t][2 * step], heads[t]))
                         for t in range(n))
        base_optimizer.zero_grad()
        total_loss.backward()
        base_optimizer.step()                                             # (c)
        state = merge_weights(mask)                                       # (d)
        total_loss = sum(exact_entropy(head_logits(encoder, state, batches[t][2 * step + 1], heads[t]))
                         for t in range(n))
        optimizer.zero_grad()
        total_loss.backward()
        optimizer.step()                                                  # (e)

    moved = 0
    for k in keys:
        torch.testing.assert_close(logits[k], mask_logits[k].detach(), rtol=1e-6, atol=1e-9)
        moved += (logits[k] != 0).sum().item()
    assert moved > 0  # the mask did learn
    torch.testing.assert_close(coeffs.values().reshape(n, -1), merge_weight.detach().reshape(n, -1),
                               rtol=1e-6, atol=1e-9)
    assert (coeffs.values() - init).abs().max() > 0.5  # the inner Adam at lr 1 moves far, unclamped


def test_the_continuous_final_mask_is_one_relaxed_bernoulli_sample_rescaled_per_tensor():
    values = (-1.0, 0.0, 2.0)
    logits = {f"t{i}": torch.full((200_000,), v) for i, v in enumerate(values)}
    mask, info = final(logits, "continuous", 0.5, torch.Generator().manual_seed(0))
    again, _ = final(logits, "continuous", 0.5, torch.Generator().manual_seed(0))
    assert all(torch.equal(mask[k], again[k]) for k in logits)  # seeded
    quantiles = torch.linspace(0.1, 0.9, 9, dtype=torch.float64)
    for (key, logit), value in zip(logits.items(), values):
        torch.testing.assert_close(mask[key].double().mean(), torch.tensor(1.0, dtype=torch.float64))
        relaxed = torch.distributions.RelaxedBernoulli(torch.tensor(0.5), logits=torch.tensor(value))
        reference = relaxed.sample((200_000,))
        # the rescale is one factor per tensor: the shape of the distribution is RelaxedBernoulli's
        ours, theirs = mask[key].double(), reference.double()
        torch.testing.assert_close(torch.quantile(ours, quantiles) / ours.mean(),
                                   torch.quantile(theirs, quantiles) / theirs.mean(), rtol=0.03, atol=0.01)
    assert info["final"] == "continuous" and info["mean_value"] == pytest.approx(1.0)
    assert info["kept"] == pytest.approx(2 / 3)  # logits >= 0: probability >= 1/2
    discrete, _ = final(logits, "discrete", 0.5, torch.Generator().manual_seed(0))
    kept = (discrete["t2"] > 0).double().mean().item()
    assert kept == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item(), abs=0.01)
    zero, one = discrete["t2"].unique().tolist()
    assert zero == 0.0 and one == pytest.approx(1 / kept, rel=1e-5)


def test_the_expected_fisher_and_its_normalisation_are_fusionbench_s():
    encoder, pre, vectors, heads, g = tiny(n_tasks=2, scale=0.05)
    fts = [{k: pre[k] + tv[k] for k in pre} for tv in vectors]
    images = [torch.randn(6, 3, 16, 16, generator=g) for _ in fts]

    def transcription(t: int, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """clip_fisher_merging.py L124-186: the squared gradient of each batch's summed
        sqrt(p) log p, summed over batches, divided by the examples."""
        model = copy.deepcopy(encoder)
        model.load_state_dict(fts[t])
        fisher = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
        for batch in batches:
            logits = F.normalize(model(batch), dim=-1) @ heads[t].T
            labels_probabilities = torch.softmax(logits, dim=-1).detach()
            labels_log_probabilities = torch.log_softmax(logits, dim=-1)
            labels_expectations = torch.sqrt(labels_probabilities) * labels_log_probabilities
            sum_labels_expectations = labels_expectations.sum(dim=-1).sum(dim=0)
            model.zero_grad()
            sum_labels_expectations.backward()
            for k, p in model.named_parameters():
                fisher[k] += p.grad.detach() ** 2
        return {k: v / sum(len(b) for b in batches) for k, v in fisher.items()}

    ours, n = expected_fisher(encoder, fts[0], heads[0], [images[0][:4], images[0][4:]], device=torch.device("cpu"))
    reference = transcription(0, [images[0][:4], images[0][4:]])
    assert n == 6 and set(ours) == set(reference)
    for k in reference:
        torch.testing.assert_close(ours[k], reference[k], rtol=1e-4, atol=1e-10)

    # the merge with `normalize`: c_t (F_t + 1e-6) weights, c_t = 1 / (||F_t|| + 1e-6) (fisher_merging.py L95-187);
    # one batch of all six images per task, so the shuffled order cannot change the estimate
    method = registry.get("fisher_merging")
    inputs = MergeInputs("fisher_merging", ["a", "b"], pre, fts, encoder=encoder, _heads=heads, _datasets=images)
    merged = method.run(inputs, method.params.model_validate(
        {"estimator": "expected", "normalize": True, "images": 6, "batch_size": 6, "split": "test"})).state
    fishers = [transcription(t, [images[t]]) for t in range(2)]
    norms = [torch.sqrt(sum(f.double().pow(2).sum() for f in fisher.values())) for fisher in fishers]
    for k in fishers[0]:
        weights = [(fishers[t][k].double() + 1e-6) / (norms[t] + 1e-6) for t in range(2)]
        expected = sum(w * fts[t][k].double() for t, w in enumerate(weights)) / sum(weights)
        torch.testing.assert_close(merged[k].double(), expected, rtol=1e-4, atol=1e-6)
