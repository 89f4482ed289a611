"""Pretraining the text world's tiny BERT by masked language modelling on its unlabeled corpus
(BERT's objective without next-sentence prediction: the corpus has no documents).

BERT's recipe at miniature scale: `mask` of the non-special tokens are chosen, 80 % of those
replaced by [MASK], 10 % by a random word, 10 % kept; cross-entropy on the chosen ones;
AdamW with linear warm-up (first 10 %) and linear decay. The pooler, which only BERT's
next-sentence objective trains, keeps its seeded initialisation: fine-tuning trains it.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

SPECIAL_IDS = 5  # [PAD] [UNK] [CLS] [SEP] [MASK] (pipeline.models.bert.SPECIAL)
MASK_ID = 4


def masked(ids: torch.Tensor, share: float, vocab: int, generator: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption of a batch: (inputs, targets), targets -100 where nothing is predicted."""
    chosen = (torch.rand(ids.shape, generator=generator) < share) & (ids >= SPECIAL_IDS)
    targets = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=generator)
    inputs = torch.where(chosen & (roll < 0.8), torch.full_like(ids, MASK_ID), ids)
    random = torch.randint(SPECIAL_IDS, vocab, ids.shape, generator=generator)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random, inputs)
    return inputs, targets


def pretrain(encoder: torch.nn.Module, ids: torch.Tensor, *, steps: int, batch_size: int, lr: float,
             weight_decay: float, mask: float, seed: int, device: torch.device,
             progress: Callable = lambda it: it) -> list[float]:
    """Train `encoder` (a pipeline.models.bert TextEncoder) in place; returns the loss per step."""
    from transformers import BertModel
    from transformers.models.bert.modeling_bert import BertOnlyMLMHead

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = encoder.config
    head = BertOnlyMLMHead(config)
    head.predictions.decoder.weight = encoder.embeddings.word_embeddings.weight  # tied, as BERT's
    encoder.to(device).train()
    head.to(device).train()
    parameters = {id(p): p for p in [*encoder.parameters(), *head.parameters()]}.values()
    optimiser = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    curve = []
    for _ in progress(range(steps)):
        batch = ids[torch.randint(len(ids), (batch_size,), generator=generator)]
        inputs, targets = masked(batch, mask, config.vocab_size, generator)
        inputs, targets = inputs.to(device), targets.to(device)
        hidden = BertModel.forward(encoder, input_ids=inputs, attention_mask=(inputs != 0).long()).last_hidden_state
        loss = F.cross_entropy(head(hidden).flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        curve.append(loss.item())
    encoder.eval()
    return curve
