"""Concrete TA and Concrete AM (Tang et al., 2023, "Concrete Subspace Learning based
Interference Elimination for Multi-task Model Fusion"): a mask shared by all task vectors,
learned through its Concrete (relaxed Bernoulli) relaxation by entropy minimisation on
unlabeled images, then Task Arithmetic or AdaMerging inside the masked subspace.

The mask has one logit l per entry of every floating-point tensor (init `init_logit`, 0:
probability 1/2), the same for every task. One training step draws logistic noise
g = log u - log(1 - u), u ~ U(0, 1) (a seeded generator), and the relaxed mask

    m = sigmoid((l + g) / temperature),   rescaled per tensor: m / mean(m)

(the rescaling keeps each tensor's masked task vectors at their average scale, as the
authors' implementation in FusionBench does), merges theta = theta_0 + lambda * sum_t m * tau_t
(lambda = `scaling`), and takes one Adam step on l against the summed entropy of every task's
zero-shot predictions on a batch of its images. Gradients are accumulated task by task (the
mask recomputed from the same noise for each task), so memory is that of one task's graph
plus a few encoder-sized tensors (the sum of the task vectors, logits, their Adam state),
flat in the number of tasks; small images share a graph, as in AdaMerging (`task_groups`).

The final mask (`final_mask`):
- threshold (default): m = 1 where the learned probability sigmoid(l) >= 1/2, else 0, then
  rescaled per tensor by its mean (a tensor with nothing kept keeps the pretrained weights).
  Deterministic; with nothing learned (every l = init_logit >= 0) it is all ones, and
  Concrete TA is Task Arithmetic.
- sample: one relaxed sample at `temperature`, rescaled (FusionBench's evaluation default,
  `eval_mask_type: continuous`; random, reproducible through the seed).

concrete_task_arithmetic (Concrete TA): theta = theta_0 + scaling * m * sum_t tau_t.
  Params (defaults, FusionBench's CLIP setting): scaling 0.3, temperature 0.5, lr 1e-3 (Adam),
  steps 2000, batch_size 16 (per task and step), init_logit 0, seed 0, final_mask threshold,
  split auto.
concrete_adamerging (Concrete AM): the mask learned as above (mask_steps 1000, mask_lr 1e-3),
  then AdaMerging (methods/adamerging.py, layer-wise by default) over the masked task vectors
  m * tau_t: coefficients init `scaling`, clamped to [0, 1], Adam lr 1e-3, steps 1000,
  batch_size images per task and step.
  Deviation: the paper's bi-level meta-learning re-runs the inner merge (an AdaMerging step on
  the coefficients) inside every mask step; here the mask is learned with the coefficients at
  their initial value (= Concrete TA's mask objective), and AdaMerging runs once afterwards on
  the fixed mask. This keeps the mask phase's memory and time those of Concrete TA.

`split`: auto takes the task's train split where it has one, else its test split; the paper
learns on the test images (transductive): `split: test`. The entry's JSON records the split
per task, the loss curve's ends, and the final mask: `kept` (share of all entries with learned
probability >= 1/2; sparsity = 1 - kept), `kept_per_tensor`, `mean_probability`, and for
Concrete AM the learned coefficients.
"""
from __future__ import annotations

from typing import Annotated, Callable, Iterator, Literal

import torch
from pydantic import Field

from pipeline.merging.inputs import MergeInputs, Split
from pipeline.merging.methods.adamerging import adapt, group_entropy, task_groups
from pipeline.merging.registry import Merged, merge_method
from pipeline.merging.task_vectors import StateDict, apply, sum_vectors

Positive = Annotated[int, Field(gt=0)]
Rate = Annotated[float, Field(gt=0)]
FinalMask = Literal["threshold", "sample"]


def rescaled(mask: torch.Tensor) -> torch.Tensor:
    """m / mean(m); an all-zero mask stays zero."""
    mean = mask.mean()
    return mask / mean if mean > 0 else mask


def relaxed(logit: torch.Tensor, noise: torch.Tensor, temperature: float) -> torch.Tensor:
    """A Concrete (relaxed Bernoulli) sample, from logistic noise, rescaled by its mean."""
    return rescaled(torch.sigmoid((logit + noise) / temperature))


def logistic_noise(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(like.shape, generator=generator, device=like.device).clamp_(1e-6, 1 - 1e-6)
    return u.log() - (-u).log1p()


def masked_task_arithmetic(pretrained: StateDict, summed: StateDict, mask: StateDict, scaling: float) -> StateDict:
    """theta_0 + scaling * mask * sum_t tau_t (the mask is shared, so it multiplies the sum)."""
    return apply(pretrained, {k: mask[k] * v for k, v in summed.items()}, scaling)


def learn_mask(encoder: torch.nn.Module, pretrained: StateDict, summed: StateDict, heads: list[torch.Tensor],
               streams: list[Iterator[torch.Tensor]], *, scaling: float, temperature: float, steps: int, lr: float,
               init_logit: float, generator: torch.Generator, device: torch.device,
               progress: Callable = lambda it: it) -> tuple[StateDict, list[float]]:
    """Adam on the shared mask logits against the entropy summed over tasks (gradients accumulated
    task by task); returns the logits (on CPU) and the loss curve."""
    encoder = encoder.to(device).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    pretrained = {k: v.to(device) for k, v in pretrained.items()}
    summed = {k: v.to(device) for k, v in summed.items()}
    heads = [h.to(device) for h in heads]
    mask_logits = {k: torch.full(v.shape, float(init_logit), device=device, requires_grad=True)
                   for k, v in summed.items()}
    optimiser = torch.optim.Adam(list(mask_logits.values()), lr=lr, betas=(0.9, 0.999))
    curve = []
    for _ in progress(range(steps)):
        optimiser.zero_grad(set_to_none=True)
        noise = {k: logistic_noise(v, generator) for k, v in mask_logits.items()}
        batches = [next(stream).to(device) for stream in streams]
        total = 0.0
        for group in task_groups(batches):
            mask = {k: relaxed(v, noise[k], temperature) for k, v in mask_logits.items()}
            loss = group_entropy(encoder, masked_task_arithmetic(pretrained, summed, mask, scaling), group, heads,
                                 batches)
            loss.backward()
            total += loss.item()
        optimiser.step()
        curve.append(total)
    return {k: v.detach().cpu() for k, v in mask_logits.items()}, curve


def final(mask_logits: StateDict, kind: FinalMask, temperature: float,
          generator: torch.Generator) -> tuple[StateDict, dict]:
    """The mask the merged model uses, and what to report of it."""
    keep = {k: (v >= 0) for k, v in mask_logits.items()}  # learned probability >= 1/2
    if kind == "threshold":
        mask = {k: rescaled(v.float()) for k, v in keep.items()}
    else:
        mask = {k: relaxed(v, logistic_noise(v.to(generator.device), generator).cpu(), temperature).detach()
                for k, v in mask_logits.items()}
    total = sum(v.numel() for v in keep.values())
    info = {"final": kind, "kept": sum(int(v.sum()) for v in keep.values()) / total,
            "kept_per_tensor": {k: v.float().mean().item() for k, v in sorted(keep.items())},
            "mean_probability": sum(torch.sigmoid(v.double()).sum().item() for v in mask_logits.values()) / total}
    return mask, info


def _mask_phase(inputs: MergeInputs, *, scaling, temperature, lr, steps, batch_size, init_logit, seed, split,
                final_mask) -> tuple[StateDict, StateDict, dict]:
    splits = [inputs.resolve_split(t, split) for t in range(len(inputs.tasks))]
    summed = sum_vectors(inputs.vectors)
    streams = [inputs.stream(t, batch_size, seed + 1000 * t, split) for t in range(len(inputs.tasks))]
    generator = torch.Generator(device=inputs.device).manual_seed(seed)
    mask_logits, curve = learn_mask(
        inputs.encoder, inputs.pretrained, summed, inputs.heads, streams, scaling=scaling, temperature=temperature,
        steps=steps, lr=lr, init_logit=init_logit, generator=generator, device=inputs.device,
        progress=lambda it: inputs.progress(it, desc=f"{inputs.method} mask", unit="step"))
    mask, mask_info = final(mask_logits, final_mask, temperature, generator)
    info = {"split": dict(zip(inputs.tasks, splits)), "mask": mask_info,
            "mask_loss_first": curve[0], "mask_loss_last": curve[-1]}
    return mask, summed, info


@merge_method("concrete_task_arithmetic", label="Concrete TA", needs=("heads", "images", "device"))
def concrete_task_arithmetic(inputs: MergeInputs, *, scaling: Rate = 0.3, temperature: Rate = 0.5, lr: Rate = 1e-3,
                             steps: Positive = 2000, batch_size: Positive = 16, init_logit: float = 0.0, seed: int = 0,
                             final_mask: FinalMask = "threshold", split: Split = "auto") -> Merged:
    mask, summed, info = _mask_phase(inputs, scaling=scaling, temperature=temperature, lr=lr, steps=steps,
                                     batch_size=batch_size, init_logit=init_logit, seed=seed, split=split,
                                     final_mask=final_mask)
    return Merged(masked_task_arithmetic(inputs.pretrained, summed, mask, scaling), info)


@merge_method("concrete_adamerging", needs=("heads", "images", "device"),
              label=lambda p: "Concrete AM" if p.layer_wise else "Task-wise Concrete AM")
def concrete_adamerging(inputs: MergeInputs, *, layer_wise: bool = True,
                        scaling: Annotated[float, Field(ge=0, le=1)] = 0.3, temperature: Rate = 0.5,
                        mask_lr: Rate = 1e-3, mask_steps: Positive = 1000, lr: Rate = 1e-3, steps: Positive = 1000,
                        batch_size: Positive = 16, init_logit: float = 0.0, seed: int = 0,
                        final_mask: FinalMask = "threshold", split: Split = "auto") -> Merged:
    mask, _, info = _mask_phase(inputs, scaling=scaling, temperature=temperature, lr=mask_lr, steps=mask_steps,
                                batch_size=batch_size, init_logit=init_logit, seed=seed, split=split,
                                final_mask=final_mask)
    masked = [{k: mask[k] * v for k, v in tv.items()} for tv in inputs.vectors]
    result = adapt(inputs, masked, layer_wise=layer_wise, init=scaling, lr=lr, steps=steps, per_task=batch_size,
                   seed=seed + 1, split=split)
    result.info.update(info)
    return result
