"""Building open_clip CLIP models from a small JSON spec, and their image towers.

A spec is either {"model_cfg": <open_clip model config>, "tokenizer": ..., "preprocess": ...}
for a model defined here (the miniature world), or {"arch": "ViT-B-32-quickgelu",
"pretrained": "openai"} for an open_clip architecture.

open_clip is imported where a model is built, not with this module: importing it takes
seconds, which every stage that only reads weights (a copy, a training-free merge) would pay.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.models.checkpoints import StateDict, load_state
from pipeline.errors import PipelineError
from pipeline.models.tokenizer import WordTokenizer

if TYPE_CHECKING:
    import open_clip

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def open_clip_module():
    """open_clip, imported without its optional Hugging Face towers. With transformers installed
    (the text family's BERT needs it), open_clip imports it at once for towers this project never
    builds (HF text towers, CoCa's generation): 2.5 s in every process that builds a CLIP.
    transformers stays importable afterwards; an open_clip model with a Hugging Face text tower
    then needs open_clip imported first elsewhere."""
    import sys

    if "open_clip" in sys.modules or "transformers" in sys.modules:
        import open_clip

        return open_clip
    sys.modules["transformers"] = None  # `import transformers` raises ImportError, which open_clip expects
    try:
        import open_clip
    finally:
        del sys.modules["transformers"]
    return open_clip


def read_spec(model_dir: Path) -> dict:
    path = Path(model_dir) / "clip.json"
    if not path.exists():
        raise PipelineError(f"no model spec at {path}: run `repsurgery prepare-pretrained` first")
    return json.loads(path.read_text())


def build_clip(spec: dict, device: str = "cpu") -> open_clip.CLIP:
    """A randomly initialised CLIP of the spec's architecture (`device="meta"`: shapes only, at once)."""
    open_clip = open_clip_module()

    with torch.device(device):
        if "model_cfg" in spec:
            return open_clip.CLIP(**spec["model_cfg"])
        with _quiet_about_random_weights():  # the caller loads its weights next
            return open_clip.create_model(spec["arch"], pretrained=None,
                                          force_quick_gelu=spec.get("quick_gelu", False), device=device)


@contextmanager
def _quiet_about_random_weights():
    """Without open_clip's "No pretrained weights loaded" warning, printed for every encoder built."""
    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not record.getMessage().startswith("No pretrained weights loaded")

    drop, root = Drop(), logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def spec_from_open_clip(arch: str | None = None, config: dict | None = None, tag: str | None = None) -> dict:
    """The spec of an open_clip architecture (by name, or an inline model config), with the
    preprocessing its pretrained weights expect and QuickGELU where they were trained with it."""
    open_clip = open_clip_module()

    if (arch is None) == (config is None):
        raise PipelineError("give exactly one of an open_clip architecture name or a model config")
    if arch is not None and arch not in open_clip.list_models():
        raise PipelineError(f"unknown open_clip architecture {arch!r}; e.g. ViT-B-32-quickgelu, ViT-B-16-quickgelu, "
                            "ViT-L-14-quickgelu (see open_clip.list_models())")
    pretrained_cfg = open_clip.get_pretrained_cfg(arch, tag) if arch and tag else {}
    spec = {"arch": arch} if arch else {"model_cfg": config}
    if pretrained_cfg.get("quick_gelu") and arch and not arch.endswith("quickgelu"):
        spec["quick_gelu"] = True
    image_size = build_clip(spec, device="meta").visual.image_size
    spec["preprocess"] = {
        "image_size": image_size[0] if isinstance(image_size, (tuple, list)) else image_size,
        "mean": list(pretrained_cfg.get("mean", OPENAI_MEAN)), "std": list(pretrained_cfg.get("std", OPENAI_STD)),
        "interpolation": pretrained_cfg.get("interpolation", "bicubic"),
        "resize_mode": pretrained_cfg.get("resize_mode", "shortest"),
    }
    return spec


def reference_layout(spec: dict) -> dict[str, int]:
    """The reference code's flattened ImageEncoder state dict (open_clip's CLIP with only its text
    transformer deleted), in its order: tensor name -> entries (no weights built). Besides the
    `visual.*` tower it keeps six text-side tensors whose task vectors are zero; its Ties-Merging
    trim counts them and the AdaMerging authors' coefficient tables have a row for each."""
    state = build_clip(spec, device="meta").state_dict()
    return {key: value.numel() for key, value in state.items() if not key.startswith("transformer.")}


def load_clip(model_dir: Path) -> tuple[open_clip.CLIP, dict]:
    spec = read_spec(model_dir)
    model = build_clip(spec)
    state = load_state(Path(model_dir) / "clip.safetensors", like=model.state_dict(),
                       hint="Re-run `repsurgery prepare-pretrained`.")
    model.load_state_dict(state)
    return model.eval(), spec


def tokenizer_for(spec: dict):
    tok = spec.get("tokenizer", {})
    if tok.get("kind") == "words":
        return WordTokenizer(tok["vocab"], tok["context_length"])
    open_clip = open_clip_module()

    if "arch" in spec:
        return open_clip.get_tokenizer(spec["arch"])
    return open_clip.SimpleTokenizer(context_length=spec["model_cfg"]["text_cfg"].get("context_length", 77))


def preprocess_for(spec: dict):
    """open_clip's validation transform: the only preprocessing merging and surgery use."""
    open_clip = open_clip_module()

    pre = spec.get("preprocess", {})
    return open_clip.image_transform(
        pre.get("image_size", 224), is_train=False,
        mean=tuple(pre.get("mean", OPENAI_MEAN)), std=tuple(pre.get("std", OPENAI_STD)),
        interpolation=pre.get("interpolation"), resize_mode=pre.get("resize_mode"),
    )


def image_state(model_dir: Path) -> StateDict:
    """The pretrained image tower's weights (the `visual.` tensors, prefix dropped), read
    without building the model."""
    from pipeline.models.convert import open_clip_visual

    visual = open_clip_visual(load_state(Path(model_dir) / "clip.safetensors",
                                         hint="Re-run `repsurgery prepare-pretrained`."))
    if not visual:
        raise PipelineError(f"{Path(model_dir) / 'clip.safetensors'} holds no image tower (`visual.*` tensors): "
                            "re-run `repsurgery prepare-pretrained`")
    return visual


def image_encoder(model_dir: Path, state: StateDict | None = None) -> torch.nn.Module:
    """The pretrained image tower, optionally with other (fine-tuned or merged) weights."""
    model, _ = load_clip(model_dir)
    visual = model.visual
    if state is not None:
        visual.load_state_dict(state)
    return visual.eval()
