"""The surgery adapters z_hat = z - W_up ReLU(W_down z), one per task, and their checkpoints."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline import workspace
from pipeline.errors import PipelineError
from pipeline.models.checkpoints import load_state, read_metadata, save_state


class Surgery(torch.nn.Module):
    """T independent adapters, one per task; identity at initialisation (W_up = 0).

    With `copies`, the T adapters' initialisation is repeated: G sets of T lanes (one set per
    merge method, say) trained side by side, each exactly as if it were trained alone.

    The weights are held transposed, (lanes, d, r) and (lanes, r, d), the layout the batched
    matmuls read (half the step time of transposing them on every step); `down` and `up` are
    nn.Linear's layout, (lanes, r, d) and (lanes, d, r), as checkpoints store them.
    """

    def __init__(self, n_tasks: int, dim: int, rank: int, seed: int = 0, copies: int = 1):
        super().__init__()
        if rank <= 0:
            raise PipelineError(f"surgery.rank must be a positive integer, got {rank}")
        generator = torch.Generator().manual_seed(seed)
        # nn.Linear's default init (kaiming-uniform, a = sqrt(5)): bound 1 / sqrt(fan_in)
        bound = 1.0 / math.sqrt(dim)
        down = (torch.rand(n_tasks, rank, dim, generator=generator) * 2 - 1) * bound
        self.down_t = torch.nn.Parameter(down.repeat(copies, 1, 1).transpose(1, 2).contiguous())
        self.up_t = torch.nn.Parameter(torch.zeros(n_tasks * copies, rank, dim))

    @property
    def down(self) -> torch.Tensor:
        return self.down_t.transpose(1, 2)

    @property
    def up(self) -> torch.Tensor:
        return self.up_t.transpose(1, 2)

    @classmethod
    def from_weights(cls, down: torch.Tensor, up: torch.Tensor) -> "Surgery":
        """A module holding copies of these weights (nn.Linear's layout)."""
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        module.down_t = torch.nn.Parameter(down.detach().transpose(1, 2).contiguous())
        module.up_t = torch.nn.Parameter(up.detach().transpose(1, 2).contiguous())
        return module

    def weights(self) -> dict[str, torch.Tensor]:
        """{"down", "up"} in nn.Linear's layout: what a checkpoint holds."""
        return {"down": self.down.detach().contiguous(), "up": self.up.detach().contiguous()}

    def select(self, lanes) -> "Surgery":
        """A new module holding copies of the given lanes' weights (trainable on their own)."""
        return Surgery.from_weights(self.down[lanes], self.up[lanes])

    def split(self, copies: int) -> list["Surgery"]:
        """The G sets of lanes as separate modules (copies of the weights, on the CPU)."""
        n = len(self.down_t) // copies
        return [self.cpu().select(slice(g * n, (g + 1) * n)) for g in range(copies)]

    def forward(self, z: torch.Tensor, task: int | None = None, lanes: torch.Tensor | None = None) -> torch.Tensor:
        """z: (T, B, d) for all tasks at once, (B, d) with `task` given, or (L, B, d) for the
        lanes `lanes` selects (gradients reach only those)."""
        if task is not None:
            return z - F.relu(z @ self.down_t[task]) @ self.up_t[task]
        down, up = (self.down_t, self.up_t) if lanes is None else (self.down_t[lanes], self.up_t[lanes])
        return z - torch.bmm(F.relu(torch.bmm(z, down)), up)


def inputs_digest(**identity) -> str:
    """A short hash of everything a trained adapter depends on (features, tasks, settings)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def save_surgery(key: str, module: Surgery, *, tasks: list[str], inputs: str) -> Path:
    path = workspace.surgery_checkpoint(key)
    save_state(path, module.weights(), method=key, tasks=json.dumps(tasks), inputs=inputs)
    return path


def trained_inputs(key: str) -> str | None:
    """The inputs digest a merge entry's saved adapters were trained from (None if there are none)."""
    path = workspace.surgery_checkpoint(key)
    try:
        return read_metadata(path).get("inputs") if path.exists() else None
    except PipelineError:  # damaged: train again (the new checkpoint replaces it atomically)
        return None


def load_surgery(key: str, tasks: list[str]) -> Surgery:
    """A merge entry's trained adapters, refused if they were trained for other tasks."""
    path, hint = workspace.surgery_checkpoint(key), f"run `repsurgery surgery {key}`"
    state = load_state(path, hint=hint[0].upper() + hint[1:] + ".")
    trained_on = json.loads(read_metadata(path, required=("tasks",))["tasks"])
    if trained_on != tasks:
        raise PipelineError(f"{path} was trained for tasks {trained_on}, params list {tasks}: {hint}")
    return Surgery.from_weights(state["down"], state["up"]).eval()
