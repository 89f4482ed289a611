"""t-SNE of merged vs. individual features (Fig. 1 and 4): both sets of one task are embedded
together, so their overlap in the plane shows the representation bias.

Embeddings are cached by the bytes of their points and the t-SNE settings: the panels that do
not depend on the surgery adapters (merged vs. individual) are computed once, however often
the adapters are retrained."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.errors import PipelineError


def sample_rows(n: int, samples: int, seed: int) -> np.ndarray:
    """A seeded random subset of at most `samples` rows (sorted): the same images for both encoders."""
    if samples <= 0:
        raise PipelineError(f"analyses.tsne.samples must be a positive integer, got {samples}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return np.sort(order[:min(samples, n)])


def embed(individual: np.ndarray, merged: np.ndarray, *, perplexity: float, seed: int,
          iterations: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """2-D t-SNE of the two feature sets stacked (PCA init, seeded): returns (individual_2d, merged_2d)."""
    from sklearn.manifold import TSNE

    points = np.concatenate([individual, merged]).astype(np.float32)
    if perplexity >= len(points):
        raise PipelineError(f"t-SNE perplexity {perplexity} must be below the number of points ({len(points)}): "
                            "lower analyses.tsne.perplexity or raise analyses.tsne.samples")
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
              max_iter=iterations).fit_transform(points)
    return xy[:len(individual)], xy[len(individual):]


def _key(individual: np.ndarray, merged: np.ndarray, perplexity: float, seed: int, iterations: int) -> str:
    digest = hashlib.sha256(f"{perplexity}|{seed}|{iterations}|{individual.shape}|{merged.shape}".encode())
    for points in (individual, merged):
        digest.update(np.ascontiguousarray(points, dtype=np.float32).tobytes())
    return digest.hexdigest()[:24]


def embed_cached(pairs: list[tuple[np.ndarray, np.ndarray]], *, perplexity: float, seed: int, iterations: int,
                 cache: Path,
                 progress: Callable = lambda it, **kw: it) -> list[tuple[np.ndarray, np.ndarray]]:
    """`embed` for every (individual, merged) pair, reusing embeddings cached in `cache` and
    dropping cached ones no longer asked for."""
    cache.mkdir(parents=True, exist_ok=True)
    keys = [_key(a, b, perplexity, seed, iterations) for a, b in pairs]
    todo = [i for i, k in enumerate(keys) if not (cache / f"{k}.npy").exists()]
    for i in progress(todo, desc=f"t-SNE ({len(pairs) - len(todo)} of {len(pairs)} panels cached)", unit="panel"):
        np.save(cache / f"{keys[i]}.npy", np.concatenate(embed(*pairs[i], perplexity=perplexity, seed=seed,
                                                                iterations=iterations)))
    for stale in set(cache.glob("*.npy")) - {cache / f"{k}.npy" for k in keys}:
        stale.unlink()
    out = []
    for (individual, _), key in zip(pairs, keys):
        xy = np.load(cache / f"{key}.npy")
        out.append((xy[:len(individual)], xy[len(individual):]))
    return out
