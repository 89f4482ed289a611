"""Adapters as a registry: ProbSurgery against the paper's formula, the shared (task-agnostic)
module against a plain formulation, params checked once, checkpoints that hold every seed."""
import math

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.surgery import adapters
from pipeline.surgery.adapters.prob_surgery import ProbSurgery
from pipeline.surgery.training import loss_fn, plan, train


def test_every_registered_adapter_has_a_params_entry_in_the_default_params():
    from pipeline.config import load

    params = load()
    assert set(params.adapters) == set(adapters.available())  # one module, one params entry
    assert params.surgery.adapter == params.analyses.surgery.adapter == "surgery"  # the paper's by default


def reference_prob_surgery_loss(z, target, up_proj, linear_mean, linear_var, eps, kl_weight):
    """ProbSurgery's training loss as the authors' code writes it for one task (AlphaWrapper.forward,
    KL_reg, reparameterize; run_ProbSurgery.py's loss = L1Loss + KL_weight * kl_loss)."""
    feature_sub = torch.relu(up_proj(z))
    mu, log_var = linear_mean(feature_sub), linear_var(feature_sub)
    std = torch.exp(0.5 * log_var)
    revised = z - (eps * std + mu)
    kld = torch.mean(-0.5 * torch.sum(1 + log_var - mu ** 2 - log_var.exp(), dim=1), dim=0)
    return torch.nn.L1Loss()(revised, target) + kl_weight * kld


def test_prob_surgery_loss_is_the_papers_formula_lane_by_lane(monkeypatch):
    g = torch.Generator().manual_seed(0)
    n_tasks, dim, rank, batch = 3, 10, 4, 6
    module = ProbSurgery(n_tasks, dim, rank, seed=0, kl_weight=0.05)
    with torch.no_grad():  # trained-looking heads (both start at zero)
        module.mean_t.copy_(torch.randn(module.mean_t.shape, generator=g) * 0.3)
        module.logvar_t.copy_(torch.randn(module.logvar_t.shape, generator=g) * 0.3)
    z, target = torch.randn(n_tasks, batch, dim, generator=g), torch.randn(n_tasks, batch, dim, generator=g)
    eps = torch.randn(n_tasks, batch, dim, generator=g)
    monkeypatch.setattr(module, "noise", lambda z, lanes: eps)
    lanes = module.loss(z, target, loss_fn("l1"))
    weights = module.weights()  # nn.Linear's layout
    for t in range(n_tasks):
        linears = []
        for name in ("down", "mean", "logvar"):
            w = weights[name][t]
            linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            linear.weight.data.copy_(w)
            linears.append(linear)
        expected = reference_prob_surgery_loss(z[t], target[t], *linears, eps[t], kl_weight=0.05)
        torch.testing.assert_close(lanes[t], expected)


def test_prob_surgery_starts_as_the_identity_and_evaluates_with_the_mean_only():
    module = ProbSurgery(2, 8, 3, seed=1)
    z = torch.randn(2, 5, 8)
    assert torch.equal(module(z), z) and torch.equal(module(z[0], task=0), z[0])  # zero mean head
    with torch.no_grad():
        module.mean_t.normal_()
        module.logvar_t.normal_()
    assert torch.equal(module(z), module(z))  # deterministic: no sampling at evaluation
    mu = torch.relu(z[1] @ module.weights()["down"][1].T) @ module.weights()["mean"][1].T
    torch.testing.assert_close(module(z[1], task=1), z[1] - mu)
    assert module.added_parameters() == 2 * 2 * 8 * 3  # the log-variance head is not needed at inference


def test_prob_surgery_noise_is_seeded_and_shared_by_every_copy():
    z = torch.zeros(2 * 3, 4, 5)  # 2 copies of 3 tasks
    first, again = ProbSurgery(3, 5, 2, seed=4, copies=2), ProbSurgery(3, 5, 2, seed=4, copies=2)
    eps = first.noise(z, None)
    assert torch.equal(eps, again.noise(z, None))
    assert torch.equal(eps[:3], eps[3:])  # each copy draws what it would draw alone
    assert not torch.equal(eps, first.noise(z, None))  # a new draw every step


def test_the_shared_adapter_is_one_surgery_module_trained_on_every_task():
    """Against a plain formulation: one (W_down, W_up) pair, torch's Adam, the objective the sum
    over tasks of each task's mean L1 on the batches the trainer's plan visits."""
    g = torch.Generator().manual_seed(2)
    sizes, dim, rank, steps, batch, lr = (40, 24, 32), 9, 3, 15, 8, 1e-2
    individual = [torch.randn(n, dim, generator=g) for n in sizes]
    merged = [x + 0.5 * torch.randn(x.shape, generator=g) for x in individual]
    module, _ = train(merged, individual, rank=rank, lr=lr, steps=steps, batch_size=batch, seed=5,
                      adapter="shared_surgery")
    assert module.weights()["down"].shape == (1, rank, dim)  # one module, not one per task

    init = adapters.get("shared_surgery")(len(sizes), dim, rank, seed=5)
    down = init.weights()["down"][0].clone().requires_grad_()
    up = torch.zeros(dim, rank, requires_grad=True)
    optimiser = torch.optim.Adam([down, up], lr=lr)
    index = plan(list(sizes), batch, steps, seed=5)
    for step in range(steps):
        loss = 0
        for t in range(len(sizes)):
            z, target = merged[t][index[step, t]], individual[t][index[step, t]]
            loss = loss + (z - torch.relu(z @ down.T) @ up.T - target).abs().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    torch.testing.assert_close(module.weights()["down"][0], down.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.weights()["up"][0], up.detach(), rtol=1e-5, atol=1e-6)
    z = merged[0][:4]
    assert all(torch.equal(module(z, task=t), module(z, task=0)) for t in range(len(sizes)))  # task-agnostic


def test_unknown_adapters_and_bad_adapter_params_are_one_line_naming_the_key(tmp_path):
    import yaml

    from pipeline.config import load

    base = yaml.safe_load(open("params.yaml"))
    for change, message in (
            (lambda p: p["surgery"].update(adapter="lora"),
             "`surgery.adapter` = 'lora': expected a registered adapter"),
            (lambda p: p["adapters"].update(lora={}), "`adapters` = 'lora': expected a registered adapter"),
            (lambda p: p["adapters"]["prob_surgery"].update(kl_weight=-1), "`adapters.prob_surgery.kl_weight` = -1"),
            (lambda p: p["surgery"].update(seeds=[0, 0]), "`surgery.seeds`"),
            (lambda p: p["router"].update(images=0), "`router.images` = 0"),
            (lambda p: p["router"].update(split="validation"), "`router.split` = 'validation'")):
        params = yaml.safe_load(yaml.safe_dump(base))
        change(params)
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(params))
        with pytest.raises(PipelineError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load(path)


def test_a_checkpoint_holds_every_seed_and_loads_as_the_adapter_it_was(tmp_path, monkeypatch):
    from pipeline.surgery.checkpoints import load_surgery, save_surgery

    monkeypatch.chdir(tmp_path)
    modules = {seed: ProbSurgery(2, 6, 3, seed=seed, kl_weight=0.5) for seed in (0, 7)}
    for module in modules.values():
        with torch.no_grad():
            module.mean_t.normal_()
    save_surgery("task_arithmetic", modules, tasks=["a", "b"], inputs="x")
    loaded = load_surgery("task_arithmetic", ["a", "b"])
    assert list(loaded) == [0, 7] and all(isinstance(m, ProbSurgery) for m in loaded.values())
    assert loaded[7].settings.kl_weight == 0.5
    z = torch.randn(4, 6)
    assert all(torch.equal(loaded[s](z, 1), modules[s](z, 1)) for s in modules)
    with pytest.raises(PipelineError, match="trained for tasks"):
        load_surgery("task_arithmetic", ["a", "c"])


def test_seeds_are_reported_as_mean_and_population_std():
    from pipeline.reporting.metrics import over_seeds

    mean, std = over_seeds([{"a": 60.0, "avg": 60.0}])
    assert mean == {"a": 60.0, "avg": 60.0} and std == {"a": 0.0, "avg": 0.0}  # one seed: std 0
    mean, std = over_seeds([{"a": 1.0, "avg": 2.0}, {"a": 3.0, "avg": 6.0}])
    assert mean == {"a": 2.0, "avg": 4.0} and std == {"a": 1.0, "avg": 2.0}
    assert math.isclose(std["avg"], torch.tensor([2.0, 6.0]).std(unbiased=False).item())
