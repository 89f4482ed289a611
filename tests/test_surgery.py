"""Surgery adapters: identity at init, the paper's parameter count, per-task independence."""
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.surgery.training import Surgery, loss_fn, train


def test_surgery_is_the_identity_at_initialisation():
    module = Surgery(n_tasks=3, dim=32, rank=8, seed=0)
    z = torch.randn(3, 10, 32)
    assert torch.equal(module(z), z)
    assert torch.equal(module(z[1], task=1), z[1])


def test_parameter_count_matches_the_paper():
    module = Surgery(n_tasks=8, dim=512, rank=16)
    assert sum(p.numel() for p in module.parameters()) == 131_072


def test_down_projection_uses_nn_linear_default_init_range():
    module = Surgery(n_tasks=2, dim=100, rank=4, seed=1)
    assert module.down.abs().max() <= 1 / 100 ** 0.5
    assert module.down.std() > 0.5 / 100 ** 0.5 / 3 ** 0.5


def test_rank_must_be_positive():
    with pytest.raises(PipelineError, match="rank must be a positive integer"):
        Surgery(1, 8, 0)


def test_training_reduces_the_gap_to_the_individual_features():
    g = torch.Generator().manual_seed(0)
    individual = [torch.randn(200, 16, generator=g) for _ in range(2)]
    merged = [x + 0.5 * torch.randn(16, generator=g) + 0.2 * x.relu() for x in individual]
    before = sum((m - i).abs().mean() for m, i in zip(merged, individual))
    module, curve = train(merged, individual, rank=8, lr=1e-2, steps=300, batch_size=16)
    after = sum((module(m, t) - i).abs().mean() for t, (m, i) in enumerate(zip(merged, individual)))
    assert after < 0.6 * before
    assert curve[-1] < curve[0]


def test_tasks_train_independently_of_each_other():
    g = torch.Generator().manual_seed(1)
    a = [torch.randn(64, 8, generator=g) for _ in range(2)]
    b = [x + 1 for x in a]
    joint, _ = train(a, b, rank=4, lr=1e-2, steps=20, batch_size=8, seed=3)
    other, _ = train(a, [b[0], a[1] - 2], rank=4, lr=1e-2, steps=20, batch_size=8, seed=3)
    assert torch.allclose(joint.up[0], other.up[0]) and torch.allclose(joint.down[0], other.down[0])
    assert not torch.allclose(joint.up[1], other.up[1])


@pytest.mark.parametrize("name", ["l1", "mse", "smooth_l1", "cosine"])
def test_losses_are_zero_or_minimal_at_the_target(name):
    x = torch.randn(2, 4, 8)
    value = loss_fn(name)(x, x).sum()  # per-lane losses, summed over the 2 lanes
    assert value.item() == pytest.approx(-2.0 if name == "cosine" else 0.0, abs=1e-5)


def test_unknown_loss_is_refused():
    with pytest.raises(PipelineError, match="unknown surgery loss 'huber'"):
        loss_fn("huber")


def test_methods_trained_side_by_side_equal_each_trained_alone_bit_for_bit():
    from pipeline.surgery.training import train_groups

    g = torch.Generator().manual_seed(3)
    individual = [torch.randn(n, 12, generator=g) for n in (50, 30)]
    merged_sets = [[torch.randn(n, 12, generator=g) for n in (50, 30)] for _ in range(3)]
    settings = dict(rank=4, lr=1e-2, steps=25, batch_size=8, loss="l1", seed=1)
    together = train_groups(merged_sets, individual, **settings)
    for merged, (module, curve) in zip(merged_sets, together):
        alone, alone_curve = train(merged, individual, **settings)
        assert torch.equal(module.down, alone.down) and torch.equal(module.up, alone.up)
        assert curve == alone_curve
