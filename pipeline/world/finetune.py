"""Fine-tuning one image encoder per task with its zero-shot head frozen (Task Arithmetic's recipe:
AdamW, weight decay 0.1, cosine schedule with warm-up, cross-entropy, no label smoothing)."""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.heads import logits


def finetune(encoder: torch.nn.Module, head: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, *,
             steps: int, batch_size: int, lr: float, weight_decay: float, warmup: int, seed: int,
             device: torch.device, progress: Callable = lambda it: it) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    encoder = copy.deepcopy(encoder).to(device).train()
    head = head.to(device)
    optimiser = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=weight_decay)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
    labels = torch.as_tensor(labels)
    for _ in progress(range(steps)):
        rows = torch.randint(len(images), (batch_size,), generator=generator)
        loss = F.cross_entropy(logits(encoder(images[rows].to(device)), head), labels[rows].to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    return {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
