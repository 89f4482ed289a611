"""The adapter registry: an adapter is one class in one module of this package.

    @adapter("prob_surgery", label="ProbSurgery")
    class ProbSurgery(Adapter):
        WEIGHTS = ("down", "mean", "logvar")
        class Params(AdapterParams):
            kl_weight: ... = 1e-4
        def loss(self, z, target, criterion, lanes=None): ...

An adapter maps the merged encoder's features z toward the individual encoders' (surgery's
target) after the merge. It is trained on cached features only, as L lanes side by side: lane
l is task l % T of copy l // T (one copy per merge entry), and each copy comes out exactly as
if it were trained alone. Its own params (`Params`) are params.yaml's `adapters.<name>`;
`surgery.adapter` picks the one the pipeline trains, the `adapters` analysis compares them all.
Every module here is imported, so a new adapter is one file plus one params entry.
"""
from __future__ import annotations

import importlib
import math
import pkgutil
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict

from pipeline.errors import PipelineError

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (L, B, d) x 2 -> (L,) per-lane loss


class AdapterParams(BaseModel):
    """An adapter's own params (params.yaml `adapters.<name>`), checked like a merge entry's."""
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Adapter(torch.nn.Module):
    """Weights held per row, in the layout the batched matmuls read: a (rows, d, r) or
    (rows, r, d) parameter `<name>_t` for each name in WEIGHTS (checkpoints store nn.Linear's
    layout, the transpose). A per-task adapter has one row per lane; `SHARED` adapters one per
    copy, which every task of that copy reads."""

    name: str = ""
    label: str = ""
    WEIGHTS: tuple[str, ...] = ()
    INFERENCE: tuple[str, ...] | None = None  # the weights evaluation reads (None: all of them)
    SHARED = False
    Params: type[AdapterParams] = AdapterParams

    def __init__(self, n_tasks: int, dim: int, rank: int, seed: int = 0, copies: int = 1, **params):
        super().__init__()
        if rank <= 0:
            raise PipelineError(f"surgery.rank must be a positive integer, got {rank}")
        self.n_tasks, self.seed, self.settings = n_tasks, seed, self.Params(**params)
        rows = 1 if self.SHARED else n_tasks
        for name, weight in self.initial(rows, dim, rank, torch.Generator().manual_seed(seed)).items():
            setattr(self, f"{name}_t", torch.nn.Parameter(weight.repeat(copies, 1, 1).contiguous()))

    def initial(self, rows: int, dim: int, rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One copy's initial weights, in the held layout, by name."""
        raise NotImplementedError

    @staticmethod
    def kaiming(rows: int, dim: int, rank: int, generator: torch.Generator) -> torch.Tensor:
        """nn.Linear(dim, rank)'s default init (kaiming-uniform, a = sqrt(5): bound 1 / sqrt(dim)),
        as (rows, dim, rank)."""
        bound = 1.0 / math.sqrt(dim)
        return ((torch.rand(rows, rank, dim, generator=generator) * 2 - 1) * bound).transpose(1, 2)

    # --- lanes and rows -------------------------------------------------------------------
    def held(self, name: str, lanes: torch.Tensor | None = None) -> torch.Tensor:
        """Weight `name` for each lane (all lanes when None): per-task adapters read their own
        row, shared ones their copy's (gradients add up over the tasks that share it)."""
        weight = getattr(self, f"{name}_t")
        if not self.SHARED:
            return weight if lanes is None else weight[lanes]
        if lanes is None:
            return weight.repeat_interleave(self.n_tasks, 0)
        lanes = torch.arange(len(weight) * self.n_tasks, device=weight.device)[lanes]
        return weight[lanes // self.n_tasks]

    def rows(self, lanes: torch.Tensor) -> torch.Tensor:
        """The weight rows (a boolean mask) that lanes `lanes` (a boolean mask) read."""
        if not self.SHARED:
            return lanes
        return lanes.view(-1, self.n_tasks).any(1)

    def task_row(self, task: int) -> int:
        return 0 if self.SHARED else task

    # --- what training and evaluation call ------------------------------------------------
    def forward(self, z: torch.Tensor, task: int | None = None, lanes: torch.Tensor | None = None) -> torch.Tensor:
        """The adapted features: z (B, d) of `task`, or (L, B, d) for all lanes or those `lanes`
        selects. Deterministic (evaluation's transform)."""
        raise NotImplementedError

    def loss(self, z: torch.Tensor, target: torch.Tensor, criterion: Criterion,
             lanes: torch.Tensor | None = None) -> torch.Tensor:
        """Per-lane training loss (L,) on (L, B, d) features: the objective is its sum, so each
        per-task lane gets only its own gradient."""
        return criterion(self(z, lanes=lanes), target)

    # --- checkpoints ------------------------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        """nn.Linear's layout of every weight, by name: what a checkpoint holds."""
        return {name: getattr(self, f"{name}_t").detach().transpose(1, 2).contiguous() for name in self.WEIGHTS}

    @classmethod
    def from_weights(cls, weights: dict[str, torch.Tensor], n_tasks: int, seed: int = 0, **params) -> "Adapter":
        """A module holding copies of these weights (nn.Linear's layout)."""
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        module.n_tasks, module.seed, module.settings = n_tasks, seed, cls.Params(**params)
        for name in cls.WEIGHTS:
            setattr(module, f"{name}_t", torch.nn.Parameter(weights[name].detach().transpose(1, 2).contiguous()))
        return module

    def select(self, rows) -> "Adapter":
        """A new module holding copies of the given weight rows (trainable on their own)."""
        return type(self).from_weights({n: w[rows] for n, w in self.weights().items()}, self.n_tasks, self.seed,
                                       **self.settings.model_dump())

    def split(self, copies: int) -> list["Adapter"]:
        """The copies as separate modules (copies of the weights, on the CPU)."""
        n = len(getattr(self, f"{self.WEIGHTS[0]}_t")) // copies
        return [self.cpu().select(slice(g * n, (g + 1) * n)) for g in range(copies)]

    def added_parameters(self) -> int:
        """What the adapter adds to the merged model at inference, in parameters."""
        return sum(getattr(self, f"{n}_t").numel() for n in (self.INFERENCE or self.WEIGHTS))


REGISTRY: dict[str, type[Adapter]] = {}


def adapter(name: str, *, label: str):
    def register(cls: type[Adapter]) -> type[Adapter]:
        if name in REGISTRY:
            raise PipelineError(f"adapter {name!r} is registered twice ({REGISTRY[name].__module__}, {cls.__module__})")
        cls.name, cls.label = name, label
        REGISTRY[name] = cls
        return cls
    return register


def available() -> dict[str, type[Adapter]]:
    """Every registered adapter, by name (every module of this package imported once)."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return dict(sorted(REGISTRY.items()))


def get(name: str) -> type[Adapter]:
    known = available()
    if name not in known:
        raise PipelineError(f"unknown adapter {name!r}: choose one of {', '.join(known)} (`repsurgery list adapters`)")
    return known[name]
