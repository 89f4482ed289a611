"""Fine-tuning one encoder per task (Task Arithmetic's recipe: AdamW, weight decay 0.1, cosine
schedule with warm-up, cross-entropy, no label smoothing): an image encoder with its zero-shot
head frozen; a text encoder, which has no zero-shot head, with its own head trained beside it
(`train_head`), from the normalised class means of the pretrained features (x HEAD_SCALE).

Every head has the zero-shot heads' form, logits = normalize(features) @ head.T, so evaluation,
surgery and the learned merges use a fine-tuned text head exactly as they use a CLIP one."""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.data import datasets
from pipeline.models import encoders
from pipeline.models.heads import logits

HEAD_SCALE = 20.0  # a new head's row norm: the logit of a class whose mean the feature points at
HEAD_SAMPLE = 8192  # train rows a new head's class means are taken over (a real split has up to 1.4 M)


def cosine_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero: the fine-tuning schedule."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_inputs(root: Path, task: str, model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A task's whole train split as the encoder in `model_dir` takes it (images decoded and
    preprocessed once, or token ids), with its labels."""
    dataset = encoders.dataset(root, task, "train", model_dir)
    return torch.cat(list(datasets.loader(dataset, 1024))), torch.as_tensor(dataset.labels)


@torch.no_grad()
def initial_head(encoder: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, classes: int,
                 device: torch.device) -> torch.Tensor:
    """A new head: each class's mean normalised feature under `encoder`, less the mean of the
    classes' (pretrained features share one direction, which tells no class apart), normalised,
    x HEAD_SCALE; over a seeded sample of HEAD_SAMPLE rows where the split has more."""
    if len(inputs) > HEAD_SAMPLE:
        rows = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))[:HEAD_SAMPLE]
        inputs, labels = inputs[rows], torch.as_tensor(labels)[rows]
    encoder = encoder.to(device).eval()
    features = torch.cat([F.normalize(encoder(inputs[i:i + 512].to(device)).float(), dim=-1).cpu()
                          for i in range(0, len(inputs), 512)])
    labels = torch.as_tensor(labels)
    sums = torch.zeros(classes, features.shape[1]).index_add_(0, labels, features)
    means = sums / torch.bincount(labels, minlength=classes).clamp(min=1)[:, None]
    return F.normalize(means - means.mean(0), dim=-1) * HEAD_SCALE


def finetune(encoder: torch.nn.Module, head: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor, *,
             steps: int, batch_size: int, lr: float, weight_decay: float, warmup: int, seed: int,
             device: torch.device, train_head: bool = False, progress: Callable = lambda it: it
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The fine-tuned encoder's state dict and the head (trained beside it with `train_head`)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # BERT's dropout draws from the global generator: the same run from scratch
    encoder = copy.deepcopy(encoder).to(device).train()
    head = torch.nn.Parameter(head.detach().clone().to(device), requires_grad=train_head)
    optimiser = torch.optim.AdamW([*encoder.parameters(), *([head] if train_head else [])], lr=lr,
                                  weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: cosine_factor(s, steps, warmup))
    labels = torch.as_tensor(labels)
    for _ in progress(range(steps)):
        rows = torch.randint(len(inputs), (batch_size,), generator=generator)
        loss = F.cross_entropy(logits(encoder(inputs[rows].to(device)), head), labels[rows].to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    return {k: v.detach().cpu() for k, v in encoder.state_dict().items()}, head.detach().cpu()
