"""Contrastive pretraining of the miniature world's small open_clip CLIP.

The images are the web's (`images.web_images`: every class, mostly in the web look, rarely
in the task's benchmark domain). An image's caption names its class with the task's own class
names for a fraction `named` of the images, with other words for the class (aliases:
numerals, compass points, ...) for a fraction `alias`, and is a broad, task-level caption
otherwise. Every class name is read in pretraining, so the zero-shot prompts mean something;
zero-shot stays weak because the benchmark's images look unlike the web's, and fine-tuning
adapts the features to the domain. The loss is CLIP's symmetric InfoNCE with every pair
sharing a caption meaning (task and class) counted as a positive (otherwise identical
captions in a batch fight each other and class embeddings collapse).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import open_clip
import torch
import torch.nn.functional as F

from pipeline.models.tokenizer import WordTokenizer


@dataclass
class Captions:
    """How one task's pretraining images are captioned."""
    task: str
    classnames: list[str]
    templates: list[str]
    aliases: list[str]
    alias_templates: list[str]
    named: float  # share of captions using the class names
    alias: float  # share using the aliases; the rest are broad

    def texts(self) -> list[str]:
        return ([broad_caption(self.task)] + [t.format(c) for t in self.templates for c in self.classnames]
                + [t.format(a) for t in self.alias_templates for a in self.aliases])

    def sample(self, label: int, generator: torch.Generator, in_domain: bool = False) -> tuple[str, bool]:
        """A caption for an image of class `label`, and whether it names the class at all. An
        image in the benchmark's domain is never captioned with the class names (the web calls
        an MNIST-like seven "7"), so the zero-shot prompts meet that domain only through the
        web look's images."""
        u = torch.rand(1, generator=generator).item()
        if u < self.named and not in_domain:
            names, templates = self.classnames, self.templates
        elif u < self.named + self.alias:
            names, templates = self.aliases, self.alias_templates
        else:
            return broad_caption(self.task), False
        return templates[int(torch.randint(len(templates), (1,), generator=generator))].format(names[label]), True


def broad_caption(task: str) -> str:
    return f"a {task} picture."


def build_tokenizer(captions: list[Captions], context_length: int) -> WordTokenizer:
    return WordTokenizer.from_texts([t for c in captions for t in c.texts()], context_length)


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
             in_domain: list[torch.Tensor], captions: list[Captions], *, steps: int, batch_size: int, lr: float,
             weight_decay: float, seed: int, device: torch.device, progress: Callable = lambda it: it) -> list[float]:
    """Pretrain on images[i] / labels[i] (in the benchmark's domain where in_domain[i]), captioned by captions[i]."""
    generator = torch.Generator().manual_seed(seed)
    model = model.to(device).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.1)
    sizes = torch.tensor([len(x) for x in images])
    n_classes = max(len(c.classnames) for c in captions) + 1
    curve = []
    for _ in progress(range(steps)):
        task_ids = torch.randint(len(images), (batch_size,), generator=generator)
        rows = (torch.rand(batch_size, generator=generator) * sizes[task_ids]).long()
        batch, texts, ids = [], [], []
        for t, r in zip(task_ids.tolist(), rows.tolist()):
            label = int(labels[t][r])
            batch.append(images[t][r])
            text, specific = captions[t].sample(label, generator, bool(in_domain[t][r]))
            texts.append(text)
            ids.append(t * n_classes + (label if specific else n_classes - 1))
        x = torch.stack(batch).to(device)
        loss = multi_positive_loss(model.encode_image(x), model.encode_text(tokenizer(texts).to(device)),
                                   model.logit_scale.exp(), torch.tensor(ids, device=device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # CLIP caps the scale at 100
        curve.append(loss.item())
    return curve
