"""t-SNE of merged vs. individual features (Fig. 1 and 4): both sets of one task are embedded
together, so their overlap in the plane shows the representation bias."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import PipelineError


def sample_rows(n: int, samples: int, seed: int) -> np.ndarray:
    """A seeded random subset of at most `samples` rows (sorted): the same images for both encoders."""
    if samples <= 0:
        raise PipelineError(f"analyses.tsne.samples must be a positive integer, got {samples}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return np.sort(order[:min(samples, n)])


def embed(individual: np.ndarray, merged: np.ndarray, *, perplexity: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """2-D t-SNE of the two feature sets stacked (PCA init, seeded): returns (individual_2d, merged_2d)."""
    from sklearn.manifold import TSNE

    points = np.concatenate([individual, merged]).astype(np.float32)
    if perplexity >= len(points):
        raise PipelineError(f"t-SNE perplexity {perplexity} must be below the number of points ({len(points)}): "
                            "lower analyses.tsne.perplexity or raise analyses.tsne.samples")
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
    return xy[:len(individual)], xy[len(individual):]
