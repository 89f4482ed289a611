"""Per-layer-matrix building blocks of the SVD merges (TSV-M, Iso-C, Iso-CTS) and WUDI: which
tensors count as layer matrices, the nearest orthogonal matrix, and a merge that treats
matrices one way and every other tensor another.

Layer matrices are the 2-D tensors of the encoder, as every reference decides it
(`len(shape) == 2`, CLIP's text-side `text_projection` aside, which an image encoder does not
hold): in a CLIP image tower the attention in/out projections, the MLP's c_fc / c_proj, the
output `proj` and also `positional_embedding` (2-D too); in a BERT also its embedding tables
and pooler. Everything else (the patch-embedding convolution, class embedding, biases,
LayerNorms) takes the mean of the task vectors, as the references do.

Block linears (WUDI's choice) are found by name and shape, for any family: the 2-D tensors
inside a numbered transformer block (`...resblocks.N.` in open_clip, `...layer.N.` in BERT),
which are exactly the blocks' linear weights (attention in/out or query/key/value/output, and
the MLP's two); embeddings, the pooler and the output projection are outside the blocks.
"""
from __future__ import annotations

import re
from typing import Callable, Literal

import torch

from pipeline.merging.task_vectors import StateDict


def is_layer_matrix(key: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and "text_projection" not in key


BLOCK = re.compile(r"\.\d+\.")  # a numbered block's part of a tensor name


def is_block_linear(key: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and BLOCK.search(key) is not None


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix nearest `matrix` in Frobenius norm (its polar factor U V^T)."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def stacked(vectors: list[StateDict], key: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """(T, ...) the tasks' vectors of one tensor, in at least float32 (as the references compute)."""
    stack = torch.stack([tv[key] for tv in vectors])
    return stack.to(device, torch.promote_types(stack.dtype, torch.float32))


def per_matrix(vectors: list[StateDict], merge: Callable[[torch.Tensor], torch.Tensor], *, device: torch.device,
               progress: Callable, desc: str, chosen: Callable[[str, torch.Tensor], bool] = is_layer_matrix,
               others: Literal["mean", "pretrained"] = "mean") -> StateDict:
    """The merged task vector: `merge(stack)` for each chosen tensor (by default the layer
    matrices; (T, m, n) on `device`, one in memory at a time); every other tensor takes the mean
    of the task vectors (`others: "mean"`) or is left out, so that it stays pretrained
    (`others: "pretrained"`)."""
    out = {}
    for key in progress(list(vectors[0]), desc=desc, unit="tensor"):
        if chosen(key, vectors[0][key]):
            out[key] = merge(stacked(vectors, key, device)).cpu()
        elif others == "mean":
            out[key] = stacked(vectors, key, device).mean(0).cpu()
    return out
