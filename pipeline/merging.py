"""Task vectors and the training-free merges: Weight Averaging, Task Arithmetic, Ties-Merging.

All work on image-encoder state dicts; only floating-point tensors carry task vectors.
"""
from __future__ import annotations

import torch

from pipeline.checkpoints import StateDict
from pipeline.errors import PipelineError

METHODS = ("weight_averaging", "task_arithmetic", "ties_merging")


def task_vector(finetuned: StateDict, pretrained: StateDict) -> StateDict:
    return {k: finetuned[k] - v for k, v in pretrained.items() if v.is_floating_point()}


def apply(pretrained: StateDict, delta: StateDict, scale: float = 1.0) -> StateDict:
    return {k: (v + scale * delta[k]).to(v.dtype) if k in delta else v.clone() for k, v in pretrained.items()}


def sum_vectors(vectors: list[StateDict]) -> StateDict:
    return {k: torch.stack([tv[k] for tv in vectors]).sum(0) for k in vectors[0]}


def weight_averaging(pretrained: StateDict, vectors: list[StateDict]) -> StateDict:
    """The correct mean over ALL tasks (the reference surgery code silently dropped the last)."""
    return apply(pretrained, sum_vectors(vectors), 1.0 / len(vectors))


def task_arithmetic(pretrained: StateDict, vectors: list[StateDict], scaling: float = 0.3) -> StateDict:
    return apply(pretrained, sum_vectors(vectors), scaling)


def ties_merging(pretrained: StateDict, vectors: list[StateDict], k: float = 20.0,
                 scaling: float = 0.3, merge: str = "sum") -> StateDict:
    """TIES as the reference runs it: one global top-k% threshold per task over the
    flattened task vector (keys sorted), sign election by the sum of trimmed vectors,
    then the disjoint sum (reference default) or disjoint mean (TIES paper)."""
    if merge not in ("sum", "mean"):
        raise PipelineError(f"ties_merging.merge must be 'sum' or 'mean', got {merge!r}")
    if not 0 < k <= 100:
        raise PipelineError(f"ties_merging.k is a percentage in (0, 100], got {k}")
    keys = sorted(vectors[0])
    flat = torch.stack([torch.cat([tv[key].reshape(-1).float() for key in keys]) for tv in vectors])
    # one threshold per task: the reference's kthvalue(d - int(d * k%)) of the magnitudes
    rank = flat.shape[1] - int(flat.shape[1] * k / 100)
    if rank >= 1:
        threshold = flat.abs().kthvalue(rank, dim=1, keepdim=True).values
        trimmed = torch.where(flat.abs() >= threshold, flat, torch.zeros_like(flat))
    else:
        trimmed = flat
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())  # exact zeros take the majority sign
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    merged = (trimmed * agree).sum(0)
    if merge == "mean":
        merged = merged / agree.sum(0).clamp(min=1)
    delta, offset = {}, 0
    for key in keys:
        n = vectors[0][key].numel()
        delta[key] = merged[offset: offset + n].reshape(vectors[0][key].shape)
        offset += n
    return apply(pretrained, delta, scaling)


def merge(method: str, pretrained: StateDict, finetuned: list[StateDict], **params) -> StateDict:
    vectors = [task_vector(ft, pretrained) for ft in finetuned]
    if method == "weight_averaging":
        return weight_averaging(pretrained, vectors)
    if method == "task_arithmetic":
        return task_arithmetic(pretrained, vectors, **params)
    if method == "ties_merging":
        return ties_merging(pretrained, vectors, **params)
    raise PipelineError(f"unknown merge method {method!r}: choose one of {', '.join(METHODS)}")
