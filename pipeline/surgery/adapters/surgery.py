"""The paper's surgery module (Eq. 3-4): one adapter per task, z_hat = z - W_up ReLU(W_down z),
W_down (r x d) initialised as nn.Linear, W_up (d x r) zero: identity at the start."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.surgery.adapters import Adapter, adapter


@adapter("surgery", label="Surgery")
class Surgery(Adapter):
    """T independent adapters (one per task); with `copies`, G sets of T lanes (one set per
    merge entry) trained side by side from the same initialisation."""

    WEIGHTS = ("down", "up")

    def initial(self, rows, dim, rank, generator):
        return {"down": self.kaiming(rows, dim, rank, generator), "up": torch.zeros(rows, rank, dim)}

    @property
    def down(self) -> torch.Tensor:  # nn.Linear's layout, (rows, r, d)
        return self.down_t.transpose(1, 2)

    @property
    def up(self) -> torch.Tensor:  # (rows, d, r)
        return self.up_t.transpose(1, 2)

    def forward(self, z, task=None, lanes=None):
        if task is not None:
            row = self.task_row(task)
            return z - F.relu(z @ self.down_t[row]) @ self.up_t[row]
        return z - torch.bmm(F.relu(torch.bmm(z, self.held("down", lanes))), self.held("up", lanes))
