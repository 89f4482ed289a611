"""RegMean (Jin et al., 2023, "Dataless Knowledge Fusion by Merging Weights of Language
Models"): every linear layer of the image tower merged by the least-squares solution over the
tasks' layer inputs; every other tensor averaged.

For a linear layer y = x W^T (W: out x in), with X_t the layer's inputs (one row per token)
when fine-tuned encoder t runs on task t's unlabeled images:

    G_t = X_t^T X_t / n_t                     (n_t: images of task t, so tasks weigh equally)
    G_t~ = alpha * G_t + (1 - alpha) * diag(G_t)           (off-diagonal entries scaled)
    W   = [ (sum_t G_t~)^-1 sum_t G_t~ W_t^T ]^T

With alpha = 1 this minimises sum_t ||X_t W^T - X_t W_t^T||^2 / n_t, the regression of the
merged layer onto every task model's outputs; alpha < 1 pulls the solution towards a
per-column weighted average (alpha = 0 is an input-energy-weighted mean of the W_t).

Layers covered in open_clip's VisionTransformer (names of `CLIP.visual.state_dict()`):
- `transformer.resblocks.i.attn.in_proj_weight` (q, k and v stacked; input: the attention
  module's query input, captured by a forward pre-hook on the nn.MultiheadAttention);
- `transformer.resblocks.i.attn.out_proj.weight` (input: the attention's per-head outputs,
  concatenated; MultiheadAttention uses out_proj's weight without calling the module, so the
  pre-hook recomputes softmax(q k^T / sqrt(d_head)) v from the captured input, the layer's
  in_proj weights and its attention mask; the test checks out_proj of it is the module output);
- `transformer.resblocks.i.mlp.c_fc.weight`, `...mlp.c_proj.weight` (nn.Linear, pre-hooks);
- `proj` only with `proj: regmean` (the final projection, used as `pooled @ proj`, so proj is
  W^T; input: the pooled feature, recomputed from the transformer output by the encoder's own
  pooling; only when the encoder has no attentional pooler). The default, `proj: average`, is
  FusionBench's: it merges Hugging Face's CLIPVisionModel, which does not hold the projection
  (CLIPModel.visual_projection), so the projection is never solved for there.
Not covered, averaged (Weight Averaging): biases, LayerNorms, class and positional
embeddings, the patch embedding `conv1` (a convolution; RegMean's paper and FusionBench's
CLIP RegMean treat linear layers only), and `proj` by default. Any other encoder's nn.Linear
layers are covered too.

Memory is fixed, whatever the number of images or tasks: float64 accumulators per covered
layer (the current task's Gram matrix, the running sum of the scaled Gram matrices, the running
sum of G_t~ W_t^T), all on the merge device. The solve is torch.linalg.solve in float64; a
singular sum (an input dimension no image ever activates) falls back to the pseudo-inverse,
counted in the entry's JSON.

Params (defaults, FusionBench's CLIP setting): images 256 per task (all where a task has fewer),
batch_size 32, seed 0, alpha 0.95, proj average, split train (RegMean's paper merges with the
training data's inner products, as FusionBench does; `split: test` is the transductive
setting). alpha: the RegMean paper introduces the scaling of the off-diagonal entries (alpha
in [0, 1]) to keep the merge from degenerating and tunes it per setting; FusionBench's CLIP
configuration used 0.6 until Aug 2025 and 0.95 since. The entry's JSON records the covered
layers and the images used.
"""
from __future__ import annotations

import math
from typing import Annotated, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.func import functional_call

from pipeline.errors import PipelineError
from pipeline.merging.inputs import MergeInputs, Split
from pipeline.merging.methods.weight_averaging import weight_averaging
from pipeline.merging.registry import Merged, merge_method

Positive = Annotated[int, Field(gt=0)]
Record = Callable[[str, torch.Tensor], None]  # (weight key, layer inputs (..., in)) -> None


Proj = Literal["average", "regmean"]


def covered_layers(encoder: torch.nn.Module, proj: Proj = "regmean") -> dict[str, bool]:
    """The weights RegMean merges: state-dict key -> whether the tensor is stored transposed
    (`proj`, used as x @ proj) rather than as nn.Linear's (out, in)."""
    layers: dict[str, bool] = {}
    attention = {name for name, m in encoder.named_modules() if isinstance(m, torch.nn.MultiheadAttention)}
    for name, module in encoder.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, torch.nn.MultiheadAttention):
            layers[prefix + "in_proj_weight"] = False
            layers[prefix + "out_proj.weight"] = False
        elif isinstance(module, torch.nn.Linear) and name.rpartition(".")[0] not in attention:
            layers[prefix + "weight"] = False
    if proj == "regmean" and _pools_plainly(encoder):
        layers["proj"] = True
    return layers


def _pools_plainly(encoder: torch.nn.Module) -> bool:
    return (isinstance(getattr(encoder, "proj", None), torch.Tensor) and hasattr(encoder, "_pool")
            and isinstance(getattr(encoder, "transformer", None), torch.nn.Module)
            and getattr(encoder, "attn_pool", None) is None)


def _attention_pre_hook(key: str, record: Record):
    """Record the inputs of a MultiheadAttention's in_proj (its query) and out_proj (the heads'
    outputs, recomputed as the module computes them: softmax(q k^T / sqrt(d)) v)."""
    def hook(module: torch.nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
        names = ("query", "key", "value")
        q_in, k_in, v_in = (args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names))
        if module.in_proj_weight is None or k_in is not q_in or v_in is not q_in:
            raise PipelineError(f"RegMean covers self-attention with a packed in_proj only; {key} is not one")
        padding = kwargs.get("key_padding_mask", args[3] if len(args) > 3 else None)
        if padding is not None or kwargs.get("is_causal"):
            raise PipelineError(f"RegMean does not support key padding or causal masks ({key})")
        record(key + "in_proj_weight", q_in)
        x = q_in if module.batch_first else q_in.transpose(0, 1)  # (N, L, D)
        n, length, dim = x.shape
        heads = module.num_heads
        q, k, v = (t.reshape(n, length, heads, dim // heads).transpose(1, 2)
                   for t in F.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1))
        mask = kwargs.get("attn_mask", args[5] if len(args) > 5 else None)
        if mask is not None:
            if mask.dtype == torch.bool:  # MultiheadAttention: True = masked; here an additive mask
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, -math.inf)
            mask = mask.to(q.dtype)
            if mask.dim() == 3:
                mask = mask.reshape(n, heads, length, length)
        attention = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim // heads) + (0 if mask is None else mask), -1)
        record(key + "out_proj.weight", (attention @ v).transpose(1, 2).reshape(n, length, dim))
    return hook


def hooks(encoder: torch.nn.Module, record: Record, proj: Proj = "regmean") -> list:
    """Register the hooks that pass every covered layer's inputs to `record`; returns the handles."""
    handles = []
    attention = {name for name, m in encoder.named_modules() if isinstance(m, torch.nn.MultiheadAttention)}
    for name, module in encoder.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, torch.nn.MultiheadAttention):
            handles.append(module.register_forward_pre_hook(_attention_pre_hook(prefix, record), with_kwargs=True))
        elif isinstance(module, torch.nn.Linear) and name.rpartition(".")[0] not in attention:
            handles.append(module.register_forward_pre_hook(
                lambda m, args, key=prefix + "weight": record(key, args[0])))
    if proj == "regmean" and _pools_plainly(encoder):
        handles.append(encoder.transformer.register_forward_hook(
            lambda m, args, out: record("proj", encoder._pool(out)[0])))
    return handles


class RegMeanSums:
    """The running sums of RegMean's solve, per covered layer: sum_t G_t~ and sum_t G_t~ W_t^T,
    plus the current task's Gram matrices (float64, on `device`)."""

    def __init__(self, alpha: float, device: torch.device):
        self.alpha, self.device = alpha, device
        self.gram: dict[str, torch.Tensor] = {}       # the current task's X^T X
        self.lhs: dict[str, torch.Tensor] = {}        # sum_t G_t~
        self.rhs: dict[str, torch.Tensor] = {}        # sum_t G_t~ W_t^T

    def add(self, key: str, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(self.device, torch.float64)
        if key in self.gram:
            self.gram[key].addmm_(x.T, x)
        else:
            self.gram[key] = x.T @ x

    def end_task(self, weights_t: dict[str, torch.Tensor], n: int) -> None:
        """Close the current task: `weights_t` maps each key to that task's W^T (in, out)."""
        for key, gram in self.gram.items():
            gram /= max(n, 1)
            diagonal = gram.diagonal().clone()
            gram.mul_(self.alpha).diagonal().copy_(diagonal)  # off-diagonal entries scaled by alpha
            w = weights_t[key].to(self.device, torch.float64)
            if key in self.lhs:
                self.lhs[key] += gram
                self.rhs[key].addmm_(gram, w)
            else:
                self.lhs[key], self.rhs[key] = gram, gram @ w
        self.gram = {}

    def solve(self) -> tuple[dict[str, torch.Tensor], list[str]]:
        """W^T (in, out) per layer, and the layers whose sum was singular (pseudo-inverse)."""
        out, singular = {}, []
        for key, lhs in self.lhs.items():
            solution, info = torch.linalg.solve_ex(lhs, self.rhs[key])
            if info.item() != 0 or not torch.isfinite(solution).all():
                solution = torch.linalg.pinv(lhs, hermitian=True) @ self.rhs[key]
                singular.append(key)
            out[key] = solution
        return out, singular


@merge_method("regmean", label="RegMean", needs=("images", "device"))
def regmean(inputs: MergeInputs, *, images: Positive = 256, batch_size: Positive = 32, seed: int = 0,
            alpha: Annotated[float, Field(ge=0, le=1)] = 0.95, proj: Proj = "average",
            split: Split = "train") -> Merged:
    encoder = inputs.encoder.to(inputs.device).eval()
    layers = covered_layers(encoder, proj)
    if not layers:
        raise PipelineError("RegMean: the encoder has no linear layer to merge")
    sums = RegMeanSums(alpha, inputs.device)
    counts = {}
    handles = hooks(encoder, sums.add, proj)
    try:
        for t, task in enumerate(inputs.progress(inputs.tasks, desc=inputs.method, unit="task")):
            state = {k: v.to(inputs.device) for k, v in inputs.finetuned[t].items()}
            n = 0
            with torch.no_grad():
                for batch in inputs.sample(t, images, batch_size, seed + 1000 * t, split):
                    functional_call(encoder, state, (batch.to(inputs.device),))
                    n += len(batch)
            counts[task] = n
            sums.end_task({k: state[k] if transposed else state[k].T for k, transposed in layers.items()}, n)
    finally:
        for handle in handles:
            handle.remove()
    solutions, singular = sums.solve()
    merged = weight_averaging(inputs)  # every tensor RegMean does not solve for
    for key, solution in solutions.items():
        w = solution if layers[key] else solution.T
        merged[key] = w.to("cpu", inputs.pretrained[key].dtype).contiguous()
    return Merged(merged, {"images": counts, "alpha": alpha,
                           "layers": sorted(solutions), "singular": singular})
