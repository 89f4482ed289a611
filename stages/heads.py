"""Stage: one zero-shot head per task from the pretrained text tower."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from pipeline import clip_model, data
from pipeline.heads import zeroshot_weights
from stages.common import DATA, HEADS, PRETRAINED, tasks


def build_heads(params: dict, device: torch.device) -> None:
    model, spec = clip_model.load_clip(PRETRAINED)
    tokenizer = clip_model.tokenizer_for(spec)
    heads = {}
    for task in tasks(params):
        info = data.task_info(DATA, task)
        heads[task] = zeroshot_weights(model, tokenizer, info.classnames, info.templates, device)
    HEADS.parent.mkdir(parents=True, exist_ok=True)
    tmp = HEADS.with_name(HEADS.name + ".tmp")
    save_file(heads, str(tmp))
    tmp.replace(HEADS)
    for task, head in heads.items():
        unit = head / head.norm(dim=1, keepdim=True)
        cos = unit @ unit.T
        off = cos[~torch.eye(len(cos), dtype=torch.bool)]
        print(f"head {task}: {len(head)} classes, mean/max within-task cosine {off.mean():.2f}/{off.max():.2f}")
    print(f"zero-shot heads written to {HEADS}")
