"""Zero-shot classification heads from the pretrained text tower (never trained).

For each class: embed every template, L2-normalise each, average, re-normalise; stack and
multiply by logit_scale.exp(). The head L2-normalises its input, so logits = scale * cos.
Templates name the class as `{}` (miniature world) or `{c}` (the paper's templates).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def zeroshot_weights(model, tokenizer, classnames: list[str], templates: list[str],
                     device: torch.device | str = "cpu") -> torch.Tensor:
    model = model.to(device).eval()
    rows = []
    for name in classnames:
        tokens = tokenizer([t.format(name, c=name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1).mean(0)
        rows.append(F.normalize(emb, dim=0))
    return (torch.stack(rows) * model.logit_scale.exp().float()).cpu()


def logits(features: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Classify un-normalised encoder features with a (classes, dim) zero-shot head, in the head's
    precision (float32) at least."""
    dtype = torch.promote_types(head.dtype, torch.float32)
    return F.normalize(features.to(dtype), dim=-1) @ head.T.to(features.device, dtype)
