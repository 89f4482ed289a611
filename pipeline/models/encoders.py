"""The encoder families behind the same stages: open_clip CLIP image towers
(pipeline/models/clip.py) and Hugging Face BERT text encoders (pipeline/models/bert.py).

Which one a workspace holds is what its pretrained model's folder holds (`clip.json` or
`bert.json`), so extraction, merging and evaluation need no params to know it. Everything
downstream of an encoder sees a module mapping a batch (preprocessed images, or token ids)
to features, its state dict, and a dataset of such batches.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.models import bert
from pipeline.models.checkpoints import StateDict


def is_text(model_dir: Path) -> bool:
    return (Path(model_dir) / bert.SPEC).exists()


def encoder(model_dir: Path, state: StateDict | None = None) -> torch.nn.Module:
    """The pretrained encoder (optionally with other weights): a CLIP image tower or a BERT."""
    if is_text(model_dir):
        return bert.text_encoder(model_dir, state)
    from pipeline.models import clip

    return clip.image_encoder(model_dir, state)


def weights(model_dir: Path) -> StateDict:
    """The pretrained encoder's weights, read without building the model."""
    if is_text(model_dir):
        return bert.encoder_state(model_dir)
    from pipeline.models import clip

    return clip.image_state(model_dir)


def feature_dim(model_dir: Path) -> int:
    if is_text(model_dir):
        return bert.feature_dim(bert.read_spec(model_dir))
    from pipeline.models import clip

    return clip.build_clip(clip.read_spec(model_dir), device="meta").visual.output_dim


def dataset(root: Path, task: str, split: str, model_dir: Path, transform=None) -> torch.utils.data.Dataset:
    """A task's split as the encoder takes it: images through the CLIP's validation transform
    (or `transform`), or token ids from BERT's tokenizer."""
    from pipeline.data import datasets

    if is_text(model_dir):
        return datasets.TextDataset(root, task, split, lambda texts: bert.tokenize(model_dir, texts))
    from pipeline.models import clip

    return datasets.ImageDataset(root, task, split, transform or clip.preprocess_for(clip.read_spec(model_dir)))
