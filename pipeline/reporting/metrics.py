"""Top-1 accuracy through the zero-shot heads, and the representation bias of Eq. 1."""
from __future__ import annotations

import numpy as np
import torch

from cache import mean_abs_diffs
from pipeline.models.heads import logits


@torch.no_grad()
def correct(features: torch.Tensor, head: torch.Tensor, labels: np.ndarray, batch: int = 8192) -> torch.Tensor:
    """Whether each image's top-1 prediction is its label (a bool per row)."""
    labels = torch.as_tensor(labels)
    return torch.cat([logits(features[i:i + batch], head).argmax(1).cpu() == labels[i:i + batch]
                      for i in range(0, len(features), batch)])


def percent(hits: torch.Tensor) -> float:
    """The share of True entries of a bool tensor, in percent."""
    return 100.0 * hits.float().mean().item()


def accuracy(features: torch.Tensor, head: torch.Tensor, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return percent(correct(features, head, labels))


def over_seeds(values: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and standard deviation (population: 0 for one seed) of a figure over seeds, per key
    (the tasks and `avg`: the std of the seeds' averages, as the field reports it)."""
    keys = values[0]
    stacked = {k: np.array([v[k] for v in values], dtype=np.float64) for k in keys}
    return ({k: round(float(a.mean()), 4) for k, a in stacked.items()},
            {k: round(float(a.std()), 4) for k, a in stacked.items()})


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


# summary.json's figures (`dvc exp show` stays narrow); with several seeds also their `_std`
SUMMARY = ("acc", "surgery_acc", "bias", "surgery_bias", "routed_acc", "routed_surgery_acc")


def summary(results: dict) -> dict:
    """metrics.json's averages only (entry -> figure -> its `avg`): one column per figure and
    entry, so `dvc exp show` and `dvc metrics diff` stay readable; per-task figures stay in
    metrics.json."""
    return {key: {name: values["avg"] for name, values in figures.items()
                  if name.removesuffix("_std") in SUMMARY and "avg" in values}
            for key, figures in results.items()}
