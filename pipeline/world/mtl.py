"""Traditional MTL (the paper's upper reference): one encoder fine-tuned jointly on every task's
training data, each task through its own frozen head (the zero-shot one, or in the text world
the head fine-tuned with the task's own encoder).

Same recipe and budget as the individual fine-tuning (AdamW, weight decay, cosine schedule
with warm-up): each step draws `batch_size` images of *every* task, so after `steps` steps each
task has contributed exactly the images its own fine-tuning saw. The step's loss is the mean
of the tasks' cross-entropies; gradients are accumulated task by task (memory of one task).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.models.heads import logits
from pipeline.world.finetune import cosine_factor


def train_multitask(encoder: torch.nn.Module, heads: list[torch.Tensor], images: list[torch.Tensor],
                    labels: list[torch.Tensor], *, steps: int, batch_size: int, lr: float, weight_decay: float,
                    warmup: int, seed: int, device: torch.device,
                    progress: Callable = lambda it: it) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Returns the jointly trained encoder's state dict and the mean loss per step."""
    if not (len(heads) == len(images) == len(labels)) or not heads:
        raise PipelineError("multi-task training needs one head, image set and label set per task")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # BERT's dropout draws from the global generator: the same run from scratch
    encoder = copy.deepcopy(encoder).to(device).train()
    heads = [h.to(device) for h in heads]
    labels = [torch.as_tensor(y) for y in labels]
    optimiser = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: cosine_factor(s, steps, warmup))
    curve = []
    for _ in progress(range(steps)):
        optimiser.zero_grad(set_to_none=True)
        total = 0.0
        for head, x, y in zip(heads, images, labels):
            rows = torch.randint(len(x), (batch_size,), generator=generator)
            loss = F.cross_entropy(logits(encoder(x[rows].to(device)), head), y[rows].to(device)) / len(heads)
            loss.backward()
            total += loss.item()
        optimiser.step()
        schedule.step()
        curve.append(total)
    return {k: v.detach().cpu() for k, v in encoder.state_dict().items()}, curve
