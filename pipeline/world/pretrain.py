"""Contrastive pretraining of the miniature world's small open_clip CLIP.

Captions name an image's class only for a fraction of the images (`coverage`, per task);
the rest get a broad, task-level caption. That mimics web-scale pretraining, where some
tasks' label spaces are rare in captions: zero-shot accuracy is weak on those tasks, while
the image features still carry the information fine-tuning can unlock. The loss is CLIP's
symmetric InfoNCE with every pair sharing a caption meaning counted as a positive
(otherwise identical captions in a batch fight each other and class embeddings collapse).
"""
from __future__ import annotations

from typing import Callable

import open_clip
import torch
import torch.nn.functional as F

from pipeline.tokenizer import WordTokenizer


def broad_caption(task: str) -> str:
    return f"a {task} picture."


def build_tokenizer(tasks: dict[str, tuple[list[str], list[str]]], context_length: int) -> WordTokenizer:
    texts = [broad_caption(t) for t in tasks]
    for classnames, templates in tasks.values():
        texts += [tpl.format(c) for tpl in templates for c in classnames]
    return WordTokenizer.from_texts(texts, context_length)


def model_config(model: dict, image_size: int, vocab_size: int) -> dict:
    """An open_clip model config (the same shape as open_clip's own JSON configs)."""
    vision, text = model["vision"], model["text"]
    return {
        "embed_dim": model["embed_dim"],
        "quick_gelu": False,
        "vision_cfg": {"image_size": image_size, "patch_size": vision["patch_size"], "width": vision["width"],
                       "layers": vision["layers"], "head_width": vision["width"] // vision["heads"]},
        "text_cfg": {"context_length": text["context_length"], "vocab_size": vocab_size, "width": text["width"],
                     "heads": text["heads"], "layers": text["layers"]},
    }


def multi_positive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    same = (ids[:, None] == ids[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.log_softmax(0)).sum(0).mean())


def pretrain(model: open_clip.CLIP, tokenizer: WordTokenizer, images: list[torch.Tensor], labels: list[torch.Tensor],
             tasks: list[tuple[str, list[str], list[str], float]], *, steps: int, batch_size: int, lr: float,
             weight_decay: float, seed: int, device: torch.device, progress: Callable = lambda it: it) -> list[float]:
    """tasks[i] = (name, classnames, templates, coverage) for images[i] / labels[i]."""
    generator = torch.Generator().manual_seed(seed)
    model = model.to(device).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.1)
    sizes = torch.tensor([len(x) for x in images])
    offsets = torch.cumsum(sizes, 0) - sizes
    n_classes = max(len(t[1]) for t in tasks) + 1
    curve = []
    for _ in progress(range(steps)):
        task_ids = torch.randint(len(images), (batch_size,), generator=generator)
        rows = (torch.rand(batch_size, generator=generator) * sizes[task_ids]).long()
        batch, captions, ids = [], [], []
        for t, r in zip(task_ids.tolist(), rows.tolist()):
            name, classnames, templates, coverage = tasks[t]
            label = int(labels[t][r])
            batch.append(images[t][r])
            if torch.rand(1, generator=generator).item() < coverage:
                tpl = templates[torch.randint(len(templates), (1,), generator=generator).item()]
                captions.append(tpl.format(classnames[label]))
                ids.append(t * n_classes + label)
            else:
                captions.append(broad_caption(name))
                ids.append(t * n_classes + n_classes - 1)
        x = torch.stack(batch).to(device)
        loss = multi_positive_loss(model.encode_image(x), model.encode_text(tokenizer(captions).to(device)),
                                   model.logit_scale.exp(), torch.tensor(ids, device=device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # CLIP caps the scale at 100
        curve.append(loss.item())
    return curve
