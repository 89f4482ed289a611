"""Concrete TA and Concrete AM (Tang et al., 2023, "Concrete Subspace Learning based
Interference Elimination for Multi-task Model Fusion"): a mask shared by all task vectors,
learned through its Concrete (relaxed Bernoulli) relaxation by entropy minimisation on
unlabeled test images, then Task Arithmetic or AdaMerging inside the masked subspace. The
reference is FusionBench's `concrete_subspace` (docs/fidelity.md); its original code,
tanganke/subspace_fusion, runs the same scheme.

The mask has one logit l per entry of every floating-point tensor (init `init_logit`, 0:
probability 1/2), the same for every task. One sample draws logistic noise
g = log u - log(1 - u), u ~ U(0, 1) (a seeded generator), and the relaxed mask

    m = sigmoid((l + g) / temperature),   rescaled per tensor: m / mean(m)

(torch's RelaxedBernoulli.rsample, as the reference draws it), and the merged weights are
theta_0 + m * sum_t lambda_t tau_t. A mask step takes one Adam step on l against the summed
entropy of every task's zero-shot predictions on a batch of its images. Gradients are
accumulated group by group (the mask recomputed from the same noise for each group), tasks
sharing a graph as far as memory allows, as in AdaMerging (`Grouping`): task by task, memory is
that of one task's graph plus a few encoder-sized tensors, flat in the number of tasks.

The final mask (`final_mask`), used by the merged model (and by Concrete AM's AdaMerging phase):
- continuous (default, the reference's `eval_mask_type: continuous`): one relaxed sample at
  `temperature`, rescaled; reproducible through the seed (the reference sets none).
- discrete (the reference's other choice): one Bernoulli(sigmoid(l)) sample, rescaled.
- threshold (no reference uses it): m = 1 where sigmoid(l) >= 1/2, else 0, rescaled. The sign
  of the first entropy gradients decides it, so it is a structured mask (two seeds agree on
  93 % of its entries in the miniature world) that keeps about 44 % of the entries and scales
  them by about 2.25 (up to 5x on some tensors): the world's predictions collapse onto single
  classes (24 % against zero-shot's 43 %).

concrete_task_arithmetic (Concrete TA): lambda_t = `scaling` throughout:
  theta = theta_0 + scaling * m * sum_t tau_t.
  Params (defaults, the reference's CLIP setting): scaling 0.3, temperature 0.5, lr 1e-3
  (Adam), steps 2000, batch_size 16 (per task and step), init_logit 0, seed 0, final_mask
  continuous, split test.
concrete_adamerging (Concrete AM): the mask learned bi-level (`bilevel: true`, the reference's
  scheme), then AdaMerging over the masked task vectors m * tau_t with the final mask.
  One bi-level mask step, in the reference's order:
    1. sample m; the inner loss is the entropy, on one batch per task, of the model merged with
       the coefficients the previous inner step left (the reference merges before it resets
       them; `inner_gradient_at: initial` takes the gradient at `scaling` instead) and with m
       detached;
    2. reset the coefficients to `scaling` and take one step of the inner Adam (lr `inner_lr`,
       1; its state kept across mask steps) with that gradient;
    3. the mask loss is the entropy, on the next batch of every task, of the model merged with
       the updated coefficients and m; one Adam step (lr `mask_lr`) on the logits. No gradient
       flows through the inner step (first order, as the reference).
  `bilevel: false` learns the mask with the coefficients at `scaling` (Concrete TA's objective,
  half the compute). The AdaMerging phase: coefficients init `scaling`, unclamped (`clamp`,
  the reference's `clamp_weights: false`), Adam lr 1e-3, `steps` steps, batch_size images per
  task and step. Params (defaults): layer_wise true, scaling 0.3, temperature 0.5, mask_lr 1e-3,
  mask_steps 1000, inner_lr 1, lr 1e-3, steps 1000, batch_size 16, seed 0, final_mask continuous,
  split test.

The entry's JSON records the loss curve's ends and the final mask: `kept` (share of all entries
with learned probability >= 1/2), `kept_per_tensor`, `mean_probability`, the mean and spread of
the mask used (`mean_value`, `std_value`, `max_value`), and for Concrete AM the learned
coefficients.
"""
from __future__ import annotations

from typing import Annotated, Callable, Iterator, Literal

import torch
from pydantic import Field

from pipeline.merging.inputs import MergeInputs, Split
from pipeline.merging.methods.adamerging import (Grouping, MergeCoefficients, Precision, adapt, at_precision,
                                                 entropy_backward)
from pipeline.merging.registry import Merged, merge_method
from pipeline.merging.task_vectors import StateDict, apply, sum_vectors

Positive = Annotated[int, Field(gt=0)]
Rate = Annotated[float, Field(gt=0)]
FinalMask = Literal["continuous", "discrete", "threshold"]
InnerPoint = Literal["previous", "initial"]


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


class InnerStep:
    """The bi-level scheme's inner merge step (steps 1 and 2 of the module docstring): the
    coefficients' own Adam (lr `lr`, state kept across mask steps), reset to `init` before each
    step. `merged(mask)` is the model the mask step then sees (the coefficients held fixed)."""

    def __init__(self, coeffs: MergeCoefficients, *, init: float, lr: float, gradient_at: InnerPoint):
        self.coeffs, self.init, self.gradient_at = coeffs, float(init), gradient_at
        self.optimiser = torch.optim.Adam([coeffs.lambdas], lr=lr, betas=(0.9, 0.999))
        self.grouping = Grouping.on(coeffs.lambdas.device)

    def __call__(self, encoder: torch.nn.Module, mask: Callable[[], StateDict], heads: list[torch.Tensor],
                 batches: list[torch.Tensor]) -> float:
        lambdas = self.coeffs.lambdas
        lambdas.requires_grad_(True)
        self.optimiser.zero_grad(set_to_none=True)
        if self.gradient_at == "initial":
            with torch.no_grad():
                lambdas.fill_(self.init)
        loss = entropy_backward(encoder, lambda: self.coeffs.merged({k: v.detach() for k, v in mask().items()}),
                                heads, batches, self.grouping)
        with torch.no_grad():
            lambdas.fill_(self.init)
        self.optimiser.step()
        lambdas.requires_grad_(False)  # the mask step does not move them
        return loss


def learn_mask(encoder: torch.nn.Module, shapes: StateDict, merged: Callable[[StateDict], StateDict],
               heads: list[torch.Tensor], streams: list[Iterator[torch.Tensor]], *, temperature: float, steps: int,
               lr: float, init_logit: float, generator: torch.Generator, device: torch.device,
               inner: InnerStep | None = None, progress: Callable = lambda it: it) -> tuple[StateDict, list[float]]:
    """Adam on the shared mask logits (one per entry of each tensor in `shapes`) against the
    entropy summed over tasks of the model `merged(mask)`, after the `inner` step where there is
    one; returns the logits (on CPU) and the mask loss curve."""
    encoder = encoder.to(device).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    heads = [h.to(device) for h in heads]
    mask_logits = {k: torch.full(v.shape, float(init_logit), device=device, requires_grad=True)
                   for k, v in shapes.items()}
    optimiser = torch.optim.Adam(list(mask_logits.values()), lr=lr, betas=(0.9, 0.999))
    grouping = Grouping.on(device)
    curve = []
    for _ in progress(range(steps)):
        noise = {k: logistic_noise(v, generator) for k, v in mask_logits.items()}

        def mask() -> StateDict:  # rebuilt for each task group, so one group's graph is alive at a time
            return {k: relaxed(v, noise[k], temperature) for k, v in mask_logits.items()}

        if inner is not None:
            inner(encoder, mask, heads, [next(stream).to(device) for stream in streams])
        optimiser.zero_grad(set_to_none=True)
        batches = [next(stream).to(device) for stream in streams]
        curve.append(entropy_backward(encoder, lambda: merged(mask()), heads, batches, grouping))
        optimiser.step()
    return {k: v.detach().cpu() for k, v in mask_logits.items()}, curve


def final(mask_logits: StateDict, kind: FinalMask, temperature: float,
          generator: torch.Generator) -> tuple[StateDict, dict]:
    """The mask the merged model uses, and what to report of it."""
    keep = {k: (v >= 0) for k, v in mask_logits.items()}  # learned probability >= 1/2
    if kind == "threshold":
        mask = {k: rescaled(v.float()) for k, v in keep.items()}
    elif kind == "discrete":
        mask = {k: rescaled(torch.bernoulli(torch.sigmoid(v.to(generator.device)), generator=generator).cpu())
                for k, v in mask_logits.items()}
    else:
        mask = {k: relaxed(v, logistic_noise(v.to(generator.device), generator).cpu(), temperature).detach()
                for k, v in mask_logits.items()}
    total = sum(v.numel() for v in keep.values())
    values = torch.cat([v.flatten().double() for v in mask.values()])
    info = {"final": kind, "kept": sum(int(v.sum()) for v in keep.values()) / total,
            "kept_per_tensor": {k: v.float().mean().item() for k, v in sorted(keep.items())},
            "mean_probability": sum(torch.sigmoid(v.double()).sum().item() for v in mask_logits.values()) / total,
            "mean_value": values.mean().item(), "std_value": values.std().item(), "max_value": values.max().item()}
    return mask, info


def _mask_phase(inputs: MergeInputs, merged: Callable[[StateDict], StateDict], *, temperature, lr, steps,
                batch_size, init_logit, seed, split, final_mask, precision: Precision,
                inner: InnerStep | None = None) -> tuple[StateDict, dict]:
    streams = [inputs.stream(t, batch_size, seed + 1000 * t, split) for t in range(len(inputs.tasks))]
    generator = torch.Generator(device=inputs.device).manual_seed(seed)
    with at_precision(precision, inputs.device):
        mask_logits, curve = learn_mask(
            inputs.encoder, inputs.vectors[0], merged, inputs.heads, streams, temperature=temperature, steps=steps,
            lr=lr, init_logit=init_logit, generator=generator, device=inputs.device, inner=inner,
            progress=lambda it: inputs.progress(it, desc=f"{inputs.method} mask", unit="step"))
    mask, mask_info = final(mask_logits, final_mask, temperature, generator)
    return mask, {"mask": mask_info, "mask_loss_first": curve[0], "mask_loss_last": curve[-1]}


def at_scaling(inputs: MergeInputs, scaling: float) -> Callable[[StateDict], StateDict]:
    """mask -> the merged weights with every coefficient at `scaling` (on the merge device)."""
    pretrained = {k: v.to(inputs.device) for k, v in inputs.pretrained.items()}
    summed = {k: v.to(inputs.device) for k, v in sum_vectors(inputs.vectors).items()}
    return lambda mask: masked_task_arithmetic(pretrained, summed, mask, scaling)


@merge_method("concrete_task_arithmetic", label="Concrete TA", needs=("heads", "images", "device"))
def concrete_task_arithmetic(inputs: MergeInputs, *, scaling: Rate = 0.3, temperature: Rate = 0.5, lr: Rate = 1e-3,
                             steps: Positive = 2000, batch_size: Positive = 16, init_logit: float = 0.0, seed: int = 0,
                             final_mask: FinalMask = "continuous", split: Split = "test",
                             precision: Precision = "float32") -> Merged:
    mask, info = _mask_phase(inputs, at_scaling(inputs, scaling), temperature=temperature, lr=lr, steps=steps,
                             batch_size=batch_size, init_logit=init_logit, seed=seed, split=split,
                             final_mask=final_mask, precision=precision)
    return Merged(masked_task_arithmetic(inputs.pretrained, sum_vectors(inputs.vectors), mask, scaling), info)


@merge_method("concrete_adamerging", needs=("heads", "images", "device"),
              label=lambda p: "Concrete AM" if p.layer_wise else "Task-wise Concrete AM")
def concrete_adamerging(inputs: MergeInputs, *, layer_wise: bool = True, scaling: Annotated[float, Field(ge=0)] = 0.3,
                        temperature: Rate = 0.5, mask_lr: Rate = 1e-3, mask_steps: Positive = 1000,
                        bilevel: bool = True, inner_lr: Rate = 1.0, inner_gradient_at: InnerPoint = "previous",
                        lr: Rate = 1e-3, steps: Positive = 1000, batch_size: Positive = 16, init_logit: float = 0.0,
                        clamp: bool = False, seed: int = 0, final_mask: FinalMask = "continuous",
                        split: Split = "test", precision: Precision = "float32") -> Merged:
    inner = None
    if bilevel:
        coeffs = MergeCoefficients(inputs.pretrained, inputs.vectors, layer_wise=layer_wise, init=scaling,
                                   clamp=clamp).to(inputs.device)
        inner = InnerStep(coeffs, init=scaling, lr=inner_lr, gradient_at=inner_gradient_at)
    merged = inner.coeffs.merged if inner else at_scaling(inputs, scaling)
    mask, info = _mask_phase(inputs, merged, temperature=temperature, lr=mask_lr, steps=mask_steps,
                             batch_size=batch_size, init_logit=init_logit, seed=seed, split=split,
                             final_mask=final_mask, precision=precision, inner=inner)
    del inner, merged  # the bi-level coefficients' stacked task vectors, before AdaMerging stacks its own
    masked = [{k: mask[k] * v for k, v in tv.items()} for tv in inputs.vectors]
    result = adapt(inputs, masked, layer_wise=layer_wise, init=scaling, lr=lr, steps=steps, per_task=batch_size,
                   seed=seed + 1, split=split, clamp=clamp, precision=precision)
    result.info.update(info)
    return result
