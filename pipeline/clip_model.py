"""Building open_clip CLIP models from a small JSON spec, and their image towers.

A spec is either {"model_cfg": <open_clip model config>, "tokenizer": ..., "preprocess": ...}
for a model defined here (the miniature world), or {"arch": "ViT-B-32-quickgelu",
"pretrained": "openai"} for an open_clip architecture.
"""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch

from pipeline.checkpoints import StateDict, load_state
from pipeline.errors import PipelineError
from pipeline.tokenizer import WordTokenizer

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def read_spec(model_dir: Path) -> dict:
    path = Path(model_dir) / "clip.json"
    if not path.exists():
        raise PipelineError(f"no model spec at {path}: run `repsurgery pretrain` (miniature world) first")
    return json.loads(path.read_text())


def build_clip(spec: dict) -> open_clip.CLIP:
    if "model_cfg" in spec:
        return open_clip.CLIP(**spec["model_cfg"])
    return open_clip.create_model(spec["arch"], pretrained=None)


def load_clip(model_dir: Path) -> tuple[open_clip.CLIP, dict]:
    spec = read_spec(model_dir)
    model = build_clip(spec)
    state = load_state(Path(model_dir) / "clip.safetensors", like=model.state_dict(),
                       hint="Re-run `repsurgery pretrain`.")
    model.load_state_dict(state)
    return model.eval(), spec


def tokenizer_for(spec: dict):
    tok = spec.get("tokenizer", {})
    if tok.get("kind") == "words":
        return WordTokenizer(tok["vocab"], tok["context_length"])
    return open_clip.get_tokenizer(spec["arch"])


def preprocess_for(spec: dict):
    """open_clip's validation transform: the only preprocessing merging and surgery use."""
    pre = spec.get("preprocess", {})
    return open_clip.image_transform(
        pre.get("image_size", 224), is_train=False,
        mean=tuple(pre.get("mean", OPENAI_MEAN)), std=tuple(pre.get("std", OPENAI_STD)),
    )


def image_encoder(model_dir: Path, state: StateDict | None = None) -> torch.nn.Module:
    """The pretrained image tower, optionally with other (fine-tuned or merged) weights."""
    model, _ = load_clip(model_dir)
    visual = model.visual
    if state is not None:
        visual.load_state_dict(state)
    return visual.eval()
