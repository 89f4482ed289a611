"""ProbSurgery (Wei et al., ICML 2025): the representation bias modelled as a Gaussian per
sample. h = ReLU(W_down z); mean mu = W_mean h, log-variance W_logvar h; training subtracts a
reparameterised sample, z_hat = z - (mu + exp(logvar / 2) * eps), and adds
kl_weight * KL(N(mu, exp(logvar)) || N(0, I)), its batch mean of -1/2 sum_d (1 + logvar - mu^2 - exp(logvar));
evaluation subtracts the mean, z_hat = z - mu. As the authors' code (1998v7/ProbSurgery):
W_down nn.Linear's init, both heads zero (the sample starts as N(0, I) noise), L1 to the
individual feature plus kl_weight 1e-4."""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from pipeline.surgery.adapters import Adapter, AdapterParams, adapter


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per lane: summed over dimensions, meaned over the batch."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)).mean(-1)


@adapter("prob_surgery", label="ProbSurgery")
class ProbSurgery(Adapter):
    WEIGHTS = ("down", "mean", "logvar")
    INFERENCE = ("down", "mean")  # the log-variance head serves training only

    class Params(AdapterParams):
        kl_weight: Annotated[float, Field(ge=0)] = 1e-4

    def initial(self, rows, dim, rank, generator):
        return {"down": self.kaiming(rows, dim, rank, generator), "mean": torch.zeros(rows, rank, dim),
                "logvar": torch.zeros(rows, rank, dim)}

    def forward(self, z, task=None, lanes=None):
        if task is not None:
            row = self.task_row(task)
            return z - F.relu(z @ self.down_t[row]) @ self.mean_t[row]
        return z - torch.bmm(F.relu(torch.bmm(z, self.held("down", lanes))), self.held("mean", lanes))

    def loss(self, z, target, criterion, lanes=None):
        hidden = F.relu(torch.bmm(z, self.held("down", lanes)))
        mu, logvar = torch.bmm(hidden, self.held("mean", lanes)), torch.bmm(hidden, self.held("logvar", lanes))
        sample = mu + (0.5 * logvar).exp() * self.noise(z, lanes)
        return criterion(z - sample, target) + self.settings.kl_weight * kl_to_standard_normal(mu, logvar)

    def noise(self, z: torch.Tensor, lanes: torch.Tensor | None) -> torch.Tensor:
        """eps ~ N(0, I): one (T, B, d) draw per step, seeded, that every copy reads alike, so a
        merge entry's adapters get the noise they would get trained alone."""
        if getattr(self, "_generator", None) is None or self._generator.device != z.device:
            self._generator = torch.Generator(z.device).manual_seed(self.seed + 2)
        eps = torch.randn(self.n_tasks, *z.shape[1:], generator=self._generator, device=z.device, dtype=z.dtype)
        every = eps.repeat(len(self.held("down")) // self.n_tasks, 1, 1)
        return every if lanes is None else every[lanes]
