"""Stage `heads`: one zero-shot head per task from the pretrained text tower."""
from __future__ import annotations

import torch

from pipeline import workspace
from pipeline.config import Params
from pipeline.data import datasets
from pipeline.models import clip
from pipeline.models.checkpoints import save_state
from pipeline.models.heads import zeroshot_weights


def build_heads(params: Params, device: torch.device) -> None:
    model, spec = clip.load_clip(workspace.PRETRAINED)
    tokenizer = clip.tokenizer_for(spec)
    heads = {}
    for task in params.tasks:
        info = datasets.task_info(workspace.DATA, task)
        heads[task] = zeroshot_weights(model, tokenizer, info.classnames, info.templates, device)
    save_state(workspace.HEADS, heads)
    for task, head in heads.items():
        unit = head / head.norm(dim=1, keepdim=True)
        cos = unit @ unit.T
        off = cos[~torch.eye(len(cos), dtype=torch.bool)]
        print(f"head {task}: {len(head)} classes, mean/max within-task cosine {off.mean():.2f}/{off.max():.2f}")
    print(f"zero-shot heads written to {workspace.HEADS}")
