"""Top-1 accuracy through the zero-shot heads, and the representation bias of Eq. 1."""
from __future__ import annotations

import numpy as np
import torch

from cache import mean_abs_diffs
from pipeline.models.heads import logits


@torch.no_grad()
def accuracy(features: torch.Tensor, head: torch.Tensor, labels: np.ndarray, batch: int = 8192) -> float:
    """Top-1 accuracy in percent."""
    labels = torch.as_tensor(labels)
    correct = sum((logits(features[i:i + batch], head).argmax(1) == labels[i:i + batch]).sum().item()
                  for i in range(0, len(features), batch))
    return 100.0 * correct / len(features)


NEAR_CHANCE = 0.1  # within this share of the way from chance (100 / classes) to 100 %


def near_chance(accuracy: dict[str, float], classes: dict[str, int]) -> dict[str, float]:
    """The tasks whose accuracy is near chance, each with its chance level (%). For a fine-tuned
    encoder on its own task, that is how a label-order or loader mismatch shows (FusionBench
    once shipped such a config silently); for zero-shot, a task the text tower cannot read."""
    out = {}
    for task, n in classes.items():
        chance = 100.0 / n
        if accuracy[task] < chance + NEAR_CHANCE * (100.0 - chance):
            out[task] = round(chance, 2)
    return out


def biases(pairs: list[tuple]) -> list[float]:
    """Eq. 1 for each (merged, individual) pair: (1 / (k N)) * ||Z_merged - Z_individual||_1,
    in float64 (streamed over the stores' chunks for pairs of stores, all in one pass)."""
    return mean_abs_diffs(pairs)


def normalized(accuracy: dict[str, float], individual: dict[str, float]) -> dict[str, float]:
    """Accuracy as a share (%) of each task's individual (fine-tuned) encoder's, as the field
    reports it beside the absolute figure; its average is the mean of these shares."""
    return {t: 100.0 * accuracy[t] / individual[t] for t in accuracy}


def parameters(module: torch.nn.Module) -> int:
    """What a module adds to the merged encoder, in parameters (surgery: its adapters)."""
    return sum(p.numel() for p in module.parameters())


SUMMARY = ("acc", "surgery_acc", "bias", "surgery_bias")  # summary.json's figures: `dvc exp show` stays narrow


def summary(results: dict) -> dict:
    """metrics.json's averages only (entry -> figure -> its `avg`): one column per figure and
    entry, so `dvc exp show` and `dvc metrics diff` stay readable; per-task figures stay in
    metrics.json."""
    return {key: {name: values["avg"] for name, values in figures.items() if name in SUMMARY and "avg" in values}
            for key, figures in results.items()}
