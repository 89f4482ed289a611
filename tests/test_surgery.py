"""Surgery adapters: identity at init, the paper's parameter count, per-task independence."""
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.surgery.adapters.surgery import Surgery
from pipeline.surgery.training import loss_fn, train


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


@pytest.mark.parametrize("adapter", ["surgery", "prob_surgery", "shared_surgery"])
@pytest.mark.parametrize("optimiser", ["per_task", "shared"])
def test_methods_trained_side_by_side_equal_each_trained_alone_bit_for_bit(optimiser, adapter):
    from pipeline.surgery.training import train_groups

    g = torch.Generator().manual_seed(3)
    individual = [torch.randn(n, 12, generator=g) for n in (50, 30)]
    merged_sets = [[torch.randn(n, 12, generator=g) for n in (50, 30)] for _ in range(3)]
    settings = dict(rank=4, lr=1e-2, steps=25, batch_size=8, loss="l1", seed=1, optimiser=optimiser, adapter=adapter)
    together = train_groups(merged_sets, individual, **settings)
    for merged, (module, curve) in zip(merged_sets, together):
        alone, alone_curve = train(merged, individual, **settings)
        assert module.weights().keys() == alone.weights().keys()
        assert all(torch.equal(w, alone.weights()[name]) for name, w in module.weights().items())
        assert curve == alone_curve


def test_the_shared_optimiser_is_the_authors_loop_under_torch_1_8_zero_grad():
    """A literal transcription of the reference: one nn.Linear pair per task, ONE Adam over all
    of them, tasks in turn with two batches each, `zero_grad()` leaving zero gradients (torch
    1.8's default; `set_to_none=False` today), on the rows the reference's loop would draw."""
    from pipeline.surgery.training import VISIT, visit_plan

    n_tasks, dim, rank, batch, steps, lr = 3, 6, 2, 16, 3 * VISIT, 1e-2
    g = torch.Generator().manual_seed(0)
    merged = [torch.randn(40 + 5 * t, dim, generator=g) for t in range(n_tasks)]
    individual = [z + torch.randn(z.shape, generator=g) for z in merged]
    module, _ = train(merged, individual, rank=rank, lr=lr, steps=steps, batch_size=batch, seed=0, optimiser="shared")

    init = Surgery(n_tasks, dim, rank, seed=0)
    downs = [torch.nn.Linear(dim, rank, bias=False) for _ in range(n_tasks)]
    ups = [torch.nn.Linear(rank, dim, bias=False) for _ in range(n_tasks)]
    with torch.no_grad():
        for t in range(n_tasks):
            downs[t].weight.copy_(init.down[t])
            ups[t].weight.copy_(init.up[t])
    optimizer = torch.optim.Adam([w for t in range(n_tasks) for w in (downs[t].weight, ups[t].weight)], lr=lr,
                                 betas=(0.9, 0.999), weight_decay=0.0)
    rows = visit_plan([len(z) for z in merged], batch, steps, seed=0)
    for turn in range(steps // VISIT):
        for t in range(n_tasks):
            for step in range(turn * VISIT, (turn + 1) * VISIT):
                x, target = merged[t][rows[step, t]], individual[t][rows[step, t]]
                loss = torch.nn.L1Loss()(x - ups[t](torch.relu(downs[t](x))), target)
                optimizer.zero_grad(set_to_none=False)
                loss.backward()
                optimizer.step()
    for t in range(n_tasks):
        torch.testing.assert_close(module.down[t], downs[t].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(module.up[t], ups[t].weight, rtol=1e-5, atol=1e-6)
    # the stale momentum moved the other tasks' modules: not what independent Adams give
    independent, _ = train(merged, individual, rank=rank, lr=lr, steps=steps, batch_size=batch, seed=0)
    assert not torch.allclose(independent.up, module.up, atol=1e-4)


def test_the_shared_optimisers_rows_reshuffle_at_every_turn_of_a_task():
    from pipeline.surgery.training import VISIT, visit_plan

    rows = visit_plan([10, 7], batch_size=2, steps=3 * VISIT, seed=0)
    for t, n in enumerate((10, 7)):
        turns = rows[:, t].reshape(3, VISIT * 2)
        assert all(len(set(turn.tolist())) == VISIT * 2 and max(turn.tolist()) < n for turn in turns)
        assert len({tuple(turn.tolist()) for turn in turns}) == 3
    few = visit_plan([3], batch_size=2, steps=VISIT, seed=0)[:, 0].flatten().tolist()  # fewer rows than a turn
    assert sorted(few[:3]) == [0, 1, 2] and len(few) == VISIT * 2
