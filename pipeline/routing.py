"""Surgery without an oracle task id: a router picks each test image's task (which adapter and
which head) from the merged encoder's feature, the only thing a deployed merged model has.

It is fitted on seeded images of each task, knowing only which task each came from (class
labels are never read): of its train split (the world's default; a real source that imports
it), or of its test split, like surgery's own transductive use of those images, and then it is
scored on the rest only: a 1-NN router would be perfect on the images it memorised.
Features are compared by cosine, as CLIP's are. With disjoint label spaces, a routed
prediction is right exactly when the router picked the right task and the oracle path (that
task's adapter and head) is right, so routed accuracy is oracle accuracy on the rest with the
misrouted images counted wrong.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.reporting.metrics import percent

METHODS = ("nearest_centroid", "knn", "linear")


def split_rows(n: int, images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, rest): sorted rows of a task's n images, `images` seeded ones to fit on (at most
    n - 1 of a test split: at least one is left to score)."""
    if n < 2:
        raise PipelineError(f"a task with {n} test image(s) cannot be split into images to fit the router on "
                            "and images to score it on (params `router.images`)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = min(n - 1, images)
    return order[:k].sort().values, order[k:].sort().values


def train_rows(n: int, images: int, seed: int) -> list[int]:
    """The rows of a task's train split (n images) the router is fitted on: `images` seeded ones
    (all of them where there are fewer)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:images].sort().values.tolist()


class Router:
    """Task = argmax of a score per task, from L2-normalised features."""

    def __init__(self, method: str, *, k: int = 10, steps: int = 200, lr: float = 0.01):
        if method not in METHODS:
            raise PipelineError(f"unknown router {method!r}: choose one of {', '.join(METHODS)} "
                                "(params `router.method`)")
        self.method, self.k, self.steps, self.lr = method, k, steps, lr

    def fit(self, features: list[torch.Tensor]) -> "Router":
        """features[t]: (N_t, d) images known to come from task t."""
        self.points = F.normalize(torch.cat(features).float(), dim=1)
        self.tasks = torch.cat([torch.full((len(z),), t) for t, z in enumerate(features)])
        self.n_tasks = len(features)
        if self.method == "nearest_centroid":
            self.centroids = F.normalize(torch.stack([F.normalize(z.float(), dim=1).mean(0) for z in features]), dim=1)
        elif self.method == "linear":
            self.probe = self._fit_probe()
        return self

    def _fit_probe(self) -> torch.nn.Linear:
        """Multinomial logistic regression, full-batch Adam from zero (deterministic)."""
        probe = torch.nn.Linear(self.points.shape[1], self.n_tasks)
        torch.nn.init.zeros_(probe.weight), torch.nn.init.zeros_(probe.bias)
        optimiser = torch.optim.Adam(probe.parameters(), lr=self.lr)
        for _ in range(self.steps):
            optimiser.zero_grad(set_to_none=True)
            F.cross_entropy(probe(self.points), self.tasks).backward()
            optimiser.step()
        return probe.requires_grad_(False)

    @torch.no_grad()
    def predict(self, z: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """The task index of each row of z (N, d)."""
        return torch.cat([self._scores(F.normalize(z[i:i + chunk].float(), dim=1)).argmax(1)
                          for i in range(0, len(z), chunk)]) if len(z) else torch.empty(0, dtype=torch.long)

    def _scores(self, z: torch.Tensor) -> torch.Tensor:
        if self.method == "nearest_centroid":
            return z @ self.centroids.T
        if self.method == "linear":
            return self.probe(z)
        top = (z @ self.points.T).topk(min(self.k, len(self.points)), dim=1).indices  # knn: votes of the k nearest
        return torch.zeros(len(z), self.n_tasks).scatter_add_(1, self.tasks[top], torch.ones(top.shape))


@dataclass
class Routing:
    """A router's decisions on the images it was not fitted on, per task."""
    rest: list[torch.Tensor]       # rows scored (the rest of each task's test split)
    predicted: list[torch.Tensor]  # the task the router picked for each of them

    def router_accuracy(self, task: int) -> float:
        return percent(self.predicted[task] == task)

    def routed_accuracy(self, task: int, correct: torch.Tensor) -> float:
        """`correct`: the oracle path's per-image correctness on the task's whole split."""
        return percent(correct[self.rest[task]] & (self.predicted[task] == task))

    def heldout_accuracy(self, task: int, correct: torch.Tensor) -> float:
        """The oracle's accuracy on the same images (like for like with the routed one)."""
        return percent(correct[self.rest[task]])


def route(features: list[torch.Tensor], cfg, fit: list[torch.Tensor] | None = None) -> Routing:
    """A router (params `router`) fitted on `fit` (each task's train-split features) and deciding
    on every test image, or, without them, fitted on `cfg.images` of each task's test features
    and deciding on the rest."""
    if fit is None:
        rows = [split_rows(len(z), cfg.images, cfg.seed + t) for t, z in enumerate(features)]
        fit, rest = [z[f] for z, (f, _) in zip(features, rows)], [r for _, r in rows]
    else:
        rest = [torch.arange(len(z)) for z in features]
    router = Router(cfg.method, k=cfg.k, steps=cfg.steps, lr=cfg.lr).fit(fit)
    return Routing(rest, [router.predict(z[r]) for z, r in zip(features, rest)])
