"""Fine-tuning one image encoder per task with its zero-shot head frozen (Task Arithmetic's recipe:
AdamW, weight decay 0.1, cosine schedule with warm-up, cross-entropy, no label smoothing)."""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.data import datasets
from pipeline.models import clip
from pipeline.models.heads import logits


def cosine_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero: the fine-tuning schedule."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_images(root: Path, task: str, spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A task's whole train split, decoded and preprocessed once, with its labels."""
    dataset = datasets.ImageDataset(root, task, "train", clip.preprocess_for(spec))
    return torch.cat(list(datasets.loader(dataset, 1024))), torch.as_tensor(dataset.labels)


def finetune(encoder: torch.nn.Module, head: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, *,
             steps: int, batch_size: int, lr: float, weight_decay: float, warmup: int, seed: int,
             device: torch.device, progress: Callable = lambda it: it) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    encoder = copy.deepcopy(encoder).to(device).train()
    head = head.to(device)
    optimiser = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: cosine_factor(s, steps, warmup))
    labels = torch.as_tensor(labels)
    for _ in progress(range(steps)):
        rows = torch.randint(len(images), (batch_size,), generator=generator)
        loss = F.cross_entropy(logits(encoder(images[rows].to(device)), head), labels[rows].to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    return {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
