"""The task router: fitted on a share of each task's images, scored only on the rest; routed
accuracy is the oracle's when the router is perfect and drops with each misrouted image."""
import pytest
import torch

from pipeline import routing
from pipeline.errors import PipelineError


def clusters(n_tasks=4, per_task=60, dim=16, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_tasks, dim, generator=g) * 3
    return [centres[t] + spread * torch.randn(per_task, dim, generator=g) for t in range(n_tasks)]


def test_fit_and_scored_images_of_a_test_split_are_disjoint_seeded_and_cover_it():
    fit, rest = routing.split_rows(100, 10, seed=3)
    assert len(fit) == 10 and len(rest) == 90
    assert set(fit.tolist()).isdisjoint(rest.tolist()) and set(fit.tolist()) | set(rest.tolist()) == set(range(100))
    again, _ = routing.split_rows(100, 10, seed=3)
    assert torch.equal(fit, again)
    assert len(routing.split_rows(5, 50, seed=0)[1]) == 1  # at least one image is left to score
    with pytest.raises(PipelineError, match="cannot be split"):
        routing.split_rows(1, 1, seed=0)


def test_a_router_fitted_on_other_images_decides_on_every_test_image():
    from types import SimpleNamespace

    features = clusters()
    cfg = SimpleNamespace(method="nearest_centroid", k=1, steps=1, lr=0.1, images=10, seed=0)
    routes = routing.route(features, cfg, fit=[z[:5] + 0.01 for z in features])
    assert all(torch.equal(rest, torch.arange(len(z))) for rest, z in zip(routes.rest, features))
    assert routing.train_rows(50, 10, seed=1) == sorted(routing.train_rows(50, 10, seed=1))
    assert len(set(routing.train_rows(50, 10, seed=1))) == 10 and routing.train_rows(5, 10, seed=1) == list(range(5))


@pytest.mark.parametrize("method", routing.METHODS)
def test_every_router_separates_well_separated_tasks(method):
    features = clusters()
    router = routing.Router(method, k=5, steps=100, lr=0.05).fit([z[:20] for z in features])
    for t, z in enumerate(features):
        assert (router.predict(z[20:]) == t).all(), method


def test_routed_accuracy_is_the_oracles_when_the_router_is_perfect_and_drops_as_it_errs():
    correct = torch.tensor([True, True, False, True, True, False, True, True])  # the oracle path, whole split
    rest = torch.tensor([1, 2, 3, 5, 6, 7])  # the router was fitted on rows 0 and 4
    perfect = routing.Routing([rest], [torch.zeros(6, dtype=torch.long)])
    assert perfect.router_accuracy(0) == 100.0
    assert perfect.routed_accuracy(0, correct) == perfect.heldout_accuracy(0, correct) == pytest.approx(100 * 4 / 6)
    wrong = torch.zeros(6, dtype=torch.long)
    wrong[[0, 1]] = 2  # rows 1 (right by the oracle) and 2 (wrong anyway) sent to another task
    erring = routing.Routing([rest], [wrong])
    assert erring.router_accuracy(0) == pytest.approx(100 * 4 / 6)
    assert erring.routed_accuracy(0, correct) == pytest.approx(100 * 3 / 6)  # one right answer lost
    assert erring.heldout_accuracy(0, correct) == perfect.heldout_accuracy(0, correct)  # the oracle is unchanged


def test_the_router_is_never_scored_on_the_images_it_was_fitted_on():
    """A 1-NN router is perfect on the images it memorised: `route` scores it on the rest only."""
    from types import SimpleNamespace

    features = clusters(spread=3.0)  # overlapping tasks: 1-NN errs on unseen images
    cfg = SimpleNamespace(method="knn", k=1, steps=1, lr=0.1, images=30, seed=0)
    routes = routing.route(features, cfg)
    for t, z in enumerate(features):
        fit = sorted(set(range(len(z))) - set(routes.rest[t].tolist()))
        assert len(routes.predicted[t]) == len(routes.rest[t]) == len(z) - len(fit)
    assert sum(map(routes.router_accuracy, range(4))) / 4 < 100.0


def test_an_unknown_router_is_refused_with_the_choices():
    with pytest.raises(PipelineError, match="nearest_centroid, knn, linear"):
        routing.Router("oracle")
