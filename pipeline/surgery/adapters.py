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
    """

    def __init__(self, n_tasks: int, dim: int, rank: int, seed: int = 0, copies: int = 1):
        super().__init__()
        if rank <= 0:
            raise PipelineError(f"surgery.rank must be a positive integer, got {rank}")
        generator = torch.Generator().manual_seed(seed)
        # nn.Linear's default init (kaiming-uniform, a = sqrt(5)): bound 1 / sqrt(fan_in)
        bound = 1.0 / math.sqrt(dim)
        down = (torch.rand(n_tasks, rank, dim, generator=generator) * 2 - 1) * bound
        self.down = torch.nn.Parameter(down.repeat(copies, 1, 1))
        self.up = torch.nn.Parameter(torch.zeros(n_tasks * copies, dim, rank))

    def select(self, lanes) -> "Surgery":
        """A new module holding copies of the given lanes' weights (trainable on their own)."""
        part = Surgery.__new__(Surgery)
        torch.nn.Module.__init__(part)
        part.down = torch.nn.Parameter(self.down[lanes].detach().clone())
        part.up = torch.nn.Parameter(self.up[lanes].detach().clone())
        return part

    def split(self, copies: int) -> list["Surgery"]:
        """The G sets of lanes as separate modules (copies of the weights, on the CPU)."""
        n = len(self.down) // copies
        return [self.cpu().select(slice(g * n, (g + 1) * n)) for g in range(copies)]

    def forward(self, z: torch.Tensor, task: int | None = None, lanes: torch.Tensor | None = None) -> torch.Tensor:
        """z: (T, B, d) for all tasks at once, (B, d) with `task` given, or (L, B, d) for the
        lanes `lanes` selects (gradients reach only those)."""
        if task is not None:
            return z - F.relu(z @ self.down[task].T) @ self.up[task].T
        down, up = (self.down, self.up) if lanes is None else (self.down[lanes], self.up[lanes])
        return z - torch.bmm(F.relu(torch.bmm(z, down.transpose(1, 2))), up.transpose(1, 2))



def inputs_digest(**identity) -> str:
    """A short hash of everything a trained adapter depends on (features, tasks, settings)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def save_surgery(key: str, module: Surgery, *, tasks: list[str], inputs: str) -> Path:
    path = workspace.surgery_checkpoint(key)
    save_state(path, module.state_dict(), method=key, tasks=json.dumps(tasks), inputs=inputs)
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
    n_tasks, rank, dim = state["down"].shape
    module = Surgery(n_tasks, dim, rank)
    module.load_state_dict(state)
    return module.eval()
