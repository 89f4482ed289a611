"""Fisher Merging (Matena & Raffel, 2022, "Merging Models with Fisher-Weighted Averaging"):
a per-parameter weighted mean of the fine-tuned encoders, weighted by each one's diagonal
Fisher information.

    F_t   = mean over n images x of task t of (d/d theta log p_theta_t(y | x))^2,
            y drawn from the model's own prediction p_theta_t(. | x) (the empirical Fisher
            would use the true label; no labels are used here)
    theta = sum_t (F_t + floor) * theta_t / sum_t (F_t + floor)     (per entry)

p_theta_t(y | x) is fine-tuned encoder t followed by task t's frozen zero-shot head (softmax
of its logits), on task t's unlabeled images; one label is sampled per image
(`torch.multinomial`, a seeded generator: the same seed gives the same labels). The squared
gradients are per image (torch.func vmap over grad, with PyTorch's math attention kernel,
which vmap can batch), so their memory is `batch_size` gradients, not `images`. Every
floating-point tensor of the encoder is weighted; integer buffers are the pretrained ones.

Params (defaults): images 256 per task (all of a task's images where it has fewer),
batch_size 32, seed 0, floor 1e-6, normalize false, split auto. The defaults for images and
floor follow FusionBench's CLIP setting (256 examples, minimal weight 1e-6), as does the
option `normalize` (each task's Fisher divided by its L2 norm over all entries before the
floor is added; FusionBench turns it on for CLIP; the definition above weighs the raw
Fishers, so it is off here).

`split`: auto takes the task's train split where it has one and its test split otherwise
(`split: test` for the transductive setting). The entry's JSON records the split per task and
each task's Fisher: its L2 norm and mean over all entries, and the number of images used.
"""
from __future__ import annotations

from typing import Annotated, Iterable

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


def fisher_weighted_mean(pretrained: StateDict, finetuned: Iterable[StateDict], fishers: Iterable[StateDict],
                         floor: float) -> StateDict:
    """sum_t (F_t + floor) theta_t / sum_t (F_t + floor) per entry of every floating-point tensor;
    other tensors from `pretrained`. Consumes the iterables one task at a time."""
    num = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in pretrained.items() if v.is_floating_point()}
    den = {k: torch.zeros_like(v) for k, v in num.items()}
    for theta, fisher in zip(finetuned, fishers):
        for key in num:
            weight = fisher[key].to("cpu", torch.float64) + floor
            num[key] += weight * theta[key].to(torch.float64)
            den[key] += weight
    return {k: (num[k] / den[k]).to(v.dtype) if k in num else v.clone() for k, v in pretrained.items()}


@merge_method("fisher_merging", label="Fisher Merging", needs=("heads", "images", "device"))
def fisher_merging(inputs: MergeInputs, *, images: Positive = 256, batch_size: Positive = 32, seed: int = 0,
                   floor: Annotated[float, Field(gt=0)] = 1e-6, normalize: bool = False,
                   split: Split = "auto") -> Merged:
    splits = [inputs.resolve_split(t, split) for t in range(len(inputs.tasks))]
    stats: dict[str, dict] = {}

    def fishers():
        for t, task in enumerate(inputs.progress(inputs.tasks, desc=inputs.method, unit="task")):
            generator = torch.Generator(device=inputs.device).manual_seed(seed + 1000 * t)
            fisher, n = diagonal_fisher(inputs.encoder, inputs.finetuned[t], inputs.heads[t],
                                        inputs.sample(t, images, batch_size, seed + 1000 * t, splits[t]),
                                        generator=generator, device=inputs.device)
            norm = torch.sqrt(sum(f.double().pow(2).sum() for f in fisher.values())).item()
            total = sum(f.numel() for f in fisher.values())
            mean = sum(f.double().sum() for f in fisher.values()).item() / total
            stats[task] = {"images": n, "norm": norm, "mean": mean}
            if normalize:
                fisher = {k: f / max(norm, 1e-30) for k, f in fisher.items()}
            yield {k: f.cpu() for k, f in fisher.items()}

    merged = fisher_weighted_mean(inputs.pretrained, inputs.finetuned, fishers(), floor)
    return Merged(merged, {"split": dict(zip(inputs.tasks, splits)), "fisher": stats})
