"""What a merge method works from: the pretrained and fine-tuned weights, and, where it
declares the need, the zero-shot heads, unlabeled images and a device."""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from pipeline.errors import PipelineError
from pipeline.merging.task_vectors import StateDict, task_vector


@dataclass
class MergeInputs:
    method: str
    tasks: list[str]
    pretrained: StateDict
    finetuned: list[StateDict]
    encoder: torch.nn.Module | None = None          # the pretrained image tower, for functional calls
    _heads: list[torch.Tensor] | None = None         # one zero-shot head per task
    _datasets: list | None = None                    # unlabeled, preprocessed images per task
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: Callable = lambda it, **kw: it

    @functools.cached_property
    def vectors(self) -> list[StateDict]:
        """Task vectors tau_t = theta_t - theta_0 (floating-point tensors only)."""
        return [task_vector(ft, self.pretrained) for ft in self.finetuned]

    def _need(self, what: str, value):
        if value is None:
            raise PipelineError(f"merge method {self.method!r} uses {what} but does not declare it: add "
                                f"needs=({what!r},) to its @merge_method registration")
        return value

    @property
    def heads(self) -> list[torch.Tensor]:
        return self._need("heads", self._heads)

    @property
    def datasets(self) -> list:
        return self._need("images", self._datasets)

    def stream(self, task: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        """Endless shuffled batches of task `task`'s unlabeled images, reshuffled every epoch."""
        from pipeline.data.datasets import loader

        dataset = self.datasets[task]
        for epoch in itertools.count():
            yield from loader(dataset, batch_size, shuffle=True, seed=seed + epoch)


def load_inputs(method, tasks: list[str], *, device: torch.device, progress: Callable) -> MergeInputs:
    """Read the workspace's pretrained and fine-tuned encoders, and whatever else `method` needs."""
    from pipeline import workspace
    from pipeline.data.datasets import ImageDataset
    from pipeline.models import clip
    from pipeline.models.checkpoints import load_heads, load_state

    encoder = clip.image_encoder(workspace.PRETRAINED)
    pretrained = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    finetuned = [load_state(workspace.finetuned_checkpoint(t), like=pretrained,
                            hint="Run `repsurgery prepare-finetuned` to create it.") for t in tasks]
    inputs = MergeInputs(method.name, list(tasks), pretrained, finetuned, encoder=encoder, progress=progress,
                         device=device if "device" in method.needs else torch.device("cpu"))
    if "heads" in method.needs:
        heads = load_heads(workspace.HEADS, tasks)
        inputs._heads = [heads[t] for t in tasks]
    if "images" in method.needs:
        transform = clip.preprocess_for(clip.read_spec(workspace.PRETRAINED))
        inputs._datasets = [ImageDataset(workspace.DATA, t, workspace.SPLIT, transform) for t in tasks]
    return inputs
