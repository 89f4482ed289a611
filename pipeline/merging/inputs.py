"""What a merge method works from: the pretrained and fine-tuned weights, and, where it
declares the need, the zero-shot heads, unlabeled images and a device."""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import torch

from pipeline import workspace
from pipeline.errors import PipelineError
from pipeline.merging.task_vectors import StateDict, task_vector

SPLITS = ("train", "test")
# A data-using method's `split` param: the unlabeled images it learns from, the same param in
# every such method with its paper's default (test: transductive, AdaMerging and Concrete;
# train: Fisher Merging and RegMean); recorded per entry in metrics.json.
Split = Literal["train", "test"]


@dataclass
class MergeInputs:
    method: str
    tasks: list[str]
    pretrained: StateDict
    finetuned: list[StateDict]
    encoder: torch.nn.Module | None = None          # the pretrained image tower, for functional calls ("images")
    _heads: list[torch.Tensor] | None = None         # one zero-shot head per task
    _datasets: list | None = None                    # unlabeled, preprocessed images per task (test split)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: Callable = lambda it, **kw: it
    # other splits, per task (None: the task has no such split); filled lazily by `_open`
    _splits: dict[str, list[Any | None]] = field(default_factory=dict)
    _open: Callable[[str, str], Any | None] | None = None  # (task name, split) -> dataset or None
    _remembered: dict[int, Any] = field(default_factory=dict)  # id(dataset) -> its Remembered decodes
    spec: dict | None = None  # the pretrained CLIP's spec (pipeline.models.clip): the reference code's layout
    _reference_text_entries: int | None = None  # given directly where there is no spec (tests)

    @functools.cached_property
    def vectors(self) -> list[StateDict]:
        """Task vectors tau_t = theta_t - theta_0 (floating-point tensors only)."""
        return [task_vector(ft, self.pretrained) for ft in self.finetuned]

    def _need(self, what: str, value):
        if value is None:
            raise PipelineError(f"merge method {self.method!r} uses {what} but does not declare it: add "
                                f"needs=({what!r},) to its @merge_method registration")
        return value

    @functools.cached_property
    def reference_layout(self) -> dict[str, int]:
        """The reference code's flattened ImageEncoder state dict, in order: name -> entries."""
        from pipeline.models import clip

        if self.spec is None:
            raise PipelineError(f"merge method {self.method!r}: the reference code's state-dict layout is that of a "
                                "CLIP image encoder, and the pretrained model here is none (a text encoder, or a test's "
                                "bare weights): use the method's default, which needs no layout")
        return clip.reference_layout(self.spec)

    @property
    def reference_text_entries(self) -> int:
        """Entries of the text-side tensors that layout holds (their task vectors are zero)."""
        if self._reference_text_entries is None:
            self._reference_text_entries = sum(n for key, n in self.reference_layout.items()
                                               if not key.startswith("visual."))
        return self._reference_text_entries

    @property
    def heads(self) -> list[torch.Tensor]:
        return self._need("heads", self._heads)

    @property
    def datasets(self) -> list:
        return self._need("images", self._datasets)

    def _split_datasets(self, split: str) -> list:
        if split == "test":
            return self.datasets
        if split not in SPLITS:
            raise PipelineError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
        self._need("images", self._datasets)  # the one declaration covers every split
        if split not in self._splits:
            opened = [self._open(t, split) if self._open else None for t in self.tasks]
            self._splits[split] = opened
        return self._splits[split]

    def has_split(self, task: int, split: str) -> bool:
        return self._split_datasets(split)[task] is not None

    def check_split(self, split: str) -> str:
        """`split`, once every task is known to have it (else one line naming the fix)."""
        lacking = [t for i, t in enumerate(self.tasks) if not self.has_split(i, split)]
        if lacking:
            raise PipelineError(f"merge method {self.method!r} learns on the {split} split, which "
                                f"{', '.join(lacking)} lack{'s' if len(lacking) == 1 else ''} under {workspace.DATA}/: "
                                f"with a real source add {split} to params `source.splits` and run `repsurgery fetch`, "
                                "or set the entry's `split`")
        return split

    def dataset(self, task: int, split: str = "test"):
        """Task `task`'s unlabeled images of `split`."""
        if not self.has_split(task, split):
            self.check_split(split)
        return self._split_datasets(split)[task]

    def stream(self, task: int, batch_size: int, seed: int, split: str = "test") -> Iterator[torch.Tensor]:
        """Endless shuffled batches of task `task`'s unlabeled images, reshuffled every epoch; every
        task's stream is read at each step, so they share the cores' decode workers."""
        from pipeline.data.datasets import Remembered, cores, loader, loader_workers

        dataset = self.dataset(task, split)
        if id(dataset) not in self._remembered and Remembered.fits(dataset):
            self._remembered[id(dataset)] = Remembered(dataset)  # one per split: phases (Concrete AM) share it
        dataset = self._remembered.get(id(dataset), dataset)
        workers = loader_workers(len(dataset))
        if workers:
            workers = max(1, min(workers, cores() // len(self.tasks)))
        for epoch in itertools.count():
            yield from loader(dataset, batch_size, shuffle=True, seed=seed + epoch, workers=workers)

    def sample(self, task: int, images: int, batch_size: int, seed: int, split: str = "test") -> Iterator[torch.Tensor]:
        """`images` images of the task (all of them where it has fewer), in seeded shuffled order, in
        batches of at most `batch_size`; each image at most once."""
        left = min(images, len(self.dataset(task, split)))
        stream = self.stream(task, batch_size, seed, split)
        while left > 0:
            batch = next(stream)[:left]
            left -= len(batch)
            yield batch


def load_inputs(method, tasks: list[str], *, device: torch.device, progress: Callable) -> MergeInputs:
    """Read the workspace's pretrained and fine-tuned encoders, and whatever else `method` needs."""
    from pipeline.data.datasets import has_split
    from pipeline.models import clip, encoders
    from pipeline.models.checkpoints import load_heads, load_state

    model_dir = workspace.PRETRAINED
    if "images" in method.needs:  # forward passes: the encoder itself
        encoder = encoders.encoder(model_dir)
        pretrained = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    else:  # weights only, without building the model (and importing open_clip: seconds per merge)
        encoder, pretrained = None, encoders.weights(model_dir)
    finetuned = [load_state(workspace.finetuned_checkpoint(t), like=pretrained,
                            hint="Run `repsurgery prepare-finetuned` to create it.") for t in tasks]
    inputs = MergeInputs(method.name, list(tasks), pretrained, finetuned, encoder=encoder, progress=progress,
                         device=device if "device" in method.needs else torch.device("cpu"),
                         spec=None if encoders.is_text(model_dir) else clip.read_spec(model_dir))
    if "heads" in method.needs:
        heads = load_heads(workspace.HEADS, tasks)
        inputs._heads = [heads[t] for t in tasks]
    if "images" in method.needs:  # a text encoder's batches are token ids: the same declaration
        inputs._datasets = [encoders.dataset(workspace.DATA, t, workspace.SPLIT, model_dir) for t in tasks]
        inputs._open = lambda task, split: (encoders.dataset(workspace.DATA, task, split, model_dir)
                                            if has_split(workspace.DATA, task, split) else None)
    return inputs
