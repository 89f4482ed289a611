"""Task vectors and the steps merge methods build from: sums, Ties-Merging's trim, sign
election and disjoint merge over the flattened vectors.

All work on image-encoder state dicts; only floating-point tensors carry task vectors.
"""
from __future__ import annotations

import torch

StateDict = dict[str, torch.Tensor]


def task_vector(finetuned: StateDict, pretrained: StateDict) -> StateDict:
    return {k: finetuned[k] - v for k, v in pretrained.items() if v.is_floating_point()}


def apply(pretrained: StateDict, delta: StateDict, scale: float = 1.0) -> StateDict:
    return {k: (v + scale * delta[k]).to(v.dtype) if k in delta else v.clone() for k, v in pretrained.items()}


def sum_vectors(vectors: list[StateDict]) -> StateDict:
    return {k: torch.stack([tv[k] for tv in vectors]).sum(0) for k in vectors[0]}


def flatten(vectors: list[StateDict]) -> torch.Tensor:
    """(T, D): each task vector as one row, tensors in sorted-key order (as the reference)."""
    keys = sorted(vectors[0])
    return torch.stack([torch.cat([tv[key].reshape(-1).float() for key in keys]) for tv in vectors])


def unflatten(row: torch.Tensor, like: StateDict) -> StateDict:
    out, offset = {}, 0
    for key in sorted(like):
        n = like[key].numel()
        out[key] = row[offset: offset + n].reshape(like[key].shape)
        offset += n
    return out


def trim(flat: torch.Tensor, k: float, zeros: int = 0) -> torch.Tensor:
    """Keep the top-k% magnitudes of each row with ONE threshold per row (the reference's
    kthvalue(D - int(D * k%)) of the magnitudes); the rest become zero. `zeros`: entries the
    row also holds, all zero, without storing them (the text-side tensors the reference code
    flattens with the image encoder): they count in D, so a larger share of the rest is kept."""
    total = flat.shape[1] + zeros
    rank = total - int(total * k / 100) - zeros  # the zeros are the smallest magnitudes
    if rank < 1:
        return flat
    threshold = flat.abs().kthvalue(rank, dim=1, keepdim=True).values
    return torch.where(flat.abs() >= threshold, flat, torch.zeros_like(flat))


def elect_sign(trimmed: torch.Tensor) -> torch.Tensor:
    """Per entry, the sign of the summed trimmed vectors; exact zeros take the majority sign."""
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    return sign


def agreeing(trimmed: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Mask (T, D) of the non-zero trimmed entries whose sign is the elected one."""
    return (torch.sign(trimmed) == sign) & (trimmed != 0)


def disjoint_merge(trimmed: torch.Tensor, sign: torch.Tensor, mean: bool = False) -> torch.Tensor:
    """Sum (or mean) over tasks of the entries that agree with the elected sign."""
    agree = agreeing(trimmed, sign)
    merged = (trimmed * agree).sum(0)
    return merged / agree.sum(0).clamp(min=1) if mean else merged


def ties_vectors(vectors: list[StateDict], k: float, zeros: int = 0) -> list[StateDict]:
    """Ties-Merging's processed task vectors, one per task: trimmed to the top-k% (one global
    threshold per task; `zeros` as in `trim`), then only the entries that agree with the elected
    sign. Their sum is Ties-Merging's disjoint sum; AdaMerging++ weights them with learned
    coefficients."""
    trimmed = trim(flatten(vectors), k, zeros)
    kept = trimmed * agreeing(trimmed, elect_sign(trimmed))
    return [{key: t.to(vectors[0][key].dtype) for key, t in unflatten(row, vectors[0]).items()} for row in kept]
