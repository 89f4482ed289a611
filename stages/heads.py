"""Stage `heads`: one classification head per task, every head of the form logits =
normalize(features) @ head.T (pipeline/models/heads.py): a CLIP's zero-shot heads from its
pretrained text tower; a text encoder has none, so its heads are the ones fine-tuned with each
task's encoder (stage finetuned)."""
from __future__ import annotations

import torch

from pipeline import workspace
from pipeline.config import Params
from pipeline.data import datasets
from pipeline.models import clip, encoders
from pipeline.models.checkpoints import load_heads, save_state
from pipeline.models.heads import zeroshot_weights


def zero_shot_heads(params: Params, device: torch.device) -> dict[str, torch.Tensor]:
    model, spec = clip.load_clip(workspace.PRETRAINED)
    tokenizer = clip.tokenizer_for(spec)
    heads = {}
    for task in params.tasks:
        info = datasets.task_info(workspace.DATA, task)
        heads[task] = zeroshot_weights(model, tokenizer, info.classnames, info.templates, device)
    return heads


def build_heads(params: Params, device: torch.device) -> None:
    if encoders.is_text(workspace.PRETRAINED):
        heads, made = load_heads(workspace.FINETUNED_HEADS, params.tasks), "fine-tuned"
        heads = {t: heads[t] for t in params.tasks}
    else:
        heads, made = zero_shot_heads(params, device), "zero-shot"
    save_state(workspace.HEADS, heads)
    for task, head in heads.items():
        unit = head / head.norm(dim=1, keepdim=True)
        cos = unit @ unit.T
        off = cos[~torch.eye(len(cos), dtype=torch.bool)]
        print(f"head {task}: {len(head)} classes, mean/max within-task cosine {off.mean():.2f}/{off.max():.2f}")
    print(f"{made} heads written to {workspace.HEADS}")
