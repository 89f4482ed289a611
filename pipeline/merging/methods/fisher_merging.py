"""Fisher Merging (Matena & Raffel, 2022, "Merging Models with Fisher-Weighted Averaging"):
a per-parameter weighted mean of the fine-tuned encoders, weighted by each one's diagonal
Fisher information:

    theta = sum_t c_t (F_t + floor) * theta_t / sum_t c_t (F_t + floor)     (per entry)

p_theta_t(y | x) is fine-tuned encoder t followed by task t's frozen zero-shot head (softmax
of its logits), on `images` unlabeled images of task t. Two estimators of F_t:
- sampled (default; the Fisher Merging paper's definition): the mean over images x of
  (d/d theta log p_theta_t(y | x))^2, one label y per image drawn from the model's own
  prediction (`torch.multinomial`, a seeded generator: the same seed gives the same labels).
  The squared gradients are per image (torch.func vmap over grad, with PyTorch's math
  attention kernel, which vmap can batch), so their memory is `batch_size` gradients.
- expected (FusionBench's `clip_fisher_merging`, after MergeLM): for each batch of
  `batch_size` images, the square of the gradient of sum_x sum_y sqrt(p(y | x)) log p(y | x)
  (sqrt(p) held constant), summed over batches and divided by the images: the expectation
  over every class in one backward per batch, cross terms between a batch's images included
  (so `batch_size` is part of the estimator: FusionBench's is 32).
c_t is 1, or with `normalize` 1 / (||F_t|| + 1e-6), the L2 norm over every entry of the raw
Fisher (FusionBench's `normalize_fisher_weight`, on for CLIP). Every floating-point tensor of
the encoder is weighted; integer buffers are the pretrained ones.

Params (defaults): images 256 per task (all of a task's images where it has fewer),
batch_size 32, seed 0, floor 1e-6, estimator sampled, normalize false, split train (as the
paper and FusionBench: training images; `split: test` is the transductive setting). images,
batch_size and floor are FusionBench's CLIP setting; its preset family
(`repsurgery preset paper-*`) also takes its estimator and normalisation. FusionBench takes
the first 256 training images in the dataset's order; here a seeded shuffle picks them (as
FusionBench did before Sep 2024). The entry's JSON records each task's Fisher: its L2 norm and
mean over all entries, and the number of images used.
"""
from __future__ import annotations

from typing import Annotated, Iterable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.merging.inputs import MergeInputs, Split
from pipeline.merging.registry import Merged, merge_method
from pipeline.merging.task_vectors import StateDict
from pipeline.models.heads import logits

Positive = Annotated[int, Field(gt=0)]


def diagonal_fisher(encoder: torch.nn.Module, state: StateDict, head: torch.Tensor,
                    batches: Iterable[torch.Tensor], *, generator: torch.Generator,
                    device: torch.device) -> tuple[StateDict, int]:
    """The diagonal Fisher of `encoder` with weights `state` + `head` over the images in `batches`,
    labels sampled from the model's own predictions; returns (Fisher per float tensor, images)."""
    encoder = encoder.to(device).eval()
    params = {k: v.to(device) for k, v in state.items() if v.is_floating_point()}
    rest = {k: v.to(device) for k, v in state.items() if k not in params}
    head = head.to(device)

    def log_likelihood(p: StateDict, image: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        logp = logits(functional_call(encoder, {**p, **rest}, (image.unsqueeze(0),)), head).log_softmax(-1)[0]
        return (logp * onehot).sum()  # log p(y | x); a one-hot product, as vmap cannot index by a tensor

    per_image = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
    fisher = {k: torch.zeros(v.shape, dtype=torch.float32, device=device) for k, v in params.items()}
    n = 0
    for images in batches:
        images = images.to(device)
        with torch.no_grad():
            probs = logits(functional_call(encoder, {**params, **rest}, (images,)), head).softmax(-1)
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        onehot = F.one_hot(labels, probs.shape[-1]).to(probs.dtype)
        with sdpa_kernel(SDPBackend.MATH):
            grads = per_image(params, images, onehot)
        for key, g in grads.items():
            fisher[key] += g.float().pow(2).sum(0)
        n += len(images)
    return {k: v / max(n, 1) for k, v in fisher.items()}, n


def expected_fisher(encoder: torch.nn.Module, state: StateDict, head: torch.Tensor,
                    batches: Iterable[torch.Tensor], *, device: torch.device) -> tuple[StateDict, int]:
    """FusionBench's estimator: per batch, the squared gradient of the batch's summed
    sqrt(p) log p over every class; their sum over batches divided by the images."""
    encoder = encoder.to(device).eval()
    params = {k: v.to(device) for k, v in state.items() if v.is_floating_point()}
    rest = {k: v.to(device) for k, v in state.items() if k not in params}
    head = head.to(device)

    def expectation(p: StateDict, images: torch.Tensor) -> torch.Tensor:
        logp = logits(functional_call(encoder, {**p, **rest}, (images,)), head).float().log_softmax(-1)
        return (logp.exp().detach().sqrt() * logp).sum()

    fisher = {k: torch.zeros(v.shape, dtype=torch.float32, device=device) for k, v in params.items()}
    n = 0
    for images in batches:
        for key, g in grad(expectation)(params, images.to(device)).items():
            fisher[key] += g.float().pow(2)
        n += len(images)
    return {k: v / max(n, 1) for k, v in fisher.items()}, n


Estimator = Literal["sampled", "expected"]


def fisher_weighted_mean(pretrained: StateDict, finetuned: Iterable[StateDict],
                         weights: Iterable[StateDict]) -> StateDict:
    """sum_t w_t theta_t / sum_t w_t per entry of every floating-point tensor (w_t: c_t (F_t + floor));
    other tensors from `pretrained`. Consumes the iterables one task at a time."""
    num = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in pretrained.items() if v.is_floating_point()}
    den = {k: torch.zeros_like(v) for k, v in num.items()}
    for theta, weight_t in zip(finetuned, weights):
        for key in num:
            weight = weight_t[key].to("cpu", torch.float64)
            num[key] += weight * theta[key].to(torch.float64)
            den[key] += weight
    return {k: (num[k] / den[k]).to(v.dtype) if k in num else v.clone() for k, v in pretrained.items()}


@merge_method("fisher_merging", label="Fisher Merging", needs=("heads", "images", "device"))
def fisher_merging(inputs: MergeInputs, *, images: Positive = 256, batch_size: Positive = 32, seed: int = 0,
                   floor: Annotated[float, Field(gt=0)] = 1e-6, estimator: Estimator = "sampled",
                   normalize: bool = False, split: Split = "train") -> Merged:
    stats: dict[str, dict] = {}

    def weights():
        for t, task in enumerate(inputs.progress(inputs.tasks, desc=inputs.method, unit="task")):
            batches = inputs.sample(t, images, batch_size, seed + 1000 * t, split)
            if estimator == "sampled":
                generator = torch.Generator(device=inputs.device).manual_seed(seed + 1000 * t)
                fisher, n = diagonal_fisher(inputs.encoder, inputs.finetuned[t], inputs.heads[t], batches,
                                            generator=generator, device=inputs.device)
            else:
                fisher, n = expected_fisher(inputs.encoder, inputs.finetuned[t], inputs.heads[t], batches,
                                            device=inputs.device)
            norm = torch.sqrt(sum(f.double().pow(2).sum() for f in fisher.values())).item()
            total = sum(f.numel() for f in fisher.values())
            mean = sum(f.double().sum() for f in fisher.values()).item() / total
            stats[task] = {"images": n, "norm": norm, "mean": mean}
            scale = 1.0 / (norm + 1e-6) if normalize else 1.0
            yield {k: (f.cpu().double() + floor) * scale for k, f in fisher.items()}

    merged = fisher_weighted_mean(inputs.pretrained, inputs.finetuned, weights())
    return Merged(merged, {"estimator": estimator, "fisher": stats})
