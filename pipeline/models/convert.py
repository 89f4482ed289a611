"""Any supported fine-tuned checkpoint -> the canonical form: an open_clip image-encoder
state dict (the names of `CLIP.visual.state_dict()`), or for a text encoder a BertModel's,
checked against the architecture.

Supported inputs:
- open_clip state dicts (`.safetensors`, `.pt`/`.bin`), whole-model (`visual.*`, possibly
  under `module.`/`model.`) or visual-only keys;
- Hugging Face transformers `CLIPVisionModel(WithProjection)` directories (config.json +
  model.safetensors or pytorch_model.bin); without `visual_projection`, the projection is
  taken from the base (pretrained) encoder, as fine-tuning kept it frozen;
- the Task Arithmetic release's pickled `ImageEncoder` objects, read by the restricted
  unpickler (no code from the file, no open_clip 2.0.2, no `src` package).
- BERT (text family): a BertModel state dict, or a BertFor* model's (`bert.*`, its task head
  dropped), as a file or a Hugging Face model folder.
Nothing is ever unpickled with code execution: `.pt` files go through `weights_only`
loading first and the restricted unpickler otherwise.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.models import safe_pickle
from pipeline.models.checkpoints import StateDict, check_compatible
from pipeline.errors import PipelineError

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HF_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_HF_RENAMES = {  # per-layer suffixes, HF -> open_clip
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_HF_TOP = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight", "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias",
}


def detect_format(src: Path) -> str:
    src = Path(src)
    if src.is_dir():
        if (src / "config.json").exists() and any((src / f).exists() for f in HF_WEIGHT_FILES):
            return "hf"
        raise PipelineError(f"{src} is a folder but not a Hugging Face model folder (config.json + "
                            f"{' or '.join(HF_WEIGHT_FILES)}): point at the checkpoint file or the model folder")
    if not src.exists():
        raise PipelineError(f"checkpoint {src} does not exist")
    return "safetensors" if src.suffix == ".safetensors" else "torch"


def read_tensors(src: Path) -> tuple[StateDict, str]:
    """All tensors in a checkpoint file or folder, with the format they were read as."""
    src = Path(src)
    kind = detect_format(src)
    if kind == "hf":
        weights = next(src / f for f in HF_WEIGHT_FILES if (src / f).exists())
        return read_tensors(weights)[0], "hf"
    if kind == "safetensors":
        try:
            return load_file(str(src)), kind
        except Exception as exc:
            raise PipelineError(f"checkpoint {src} cannot be read as safetensors ({exc})") from exc
    try:
        obj, kind = torch.load(src, map_location="cpu", weights_only=True), "torch"
    except pickle.UnpicklingError:  # a pickled object (e.g. Task Arithmetic's ImageEncoder)
        obj, kind = safe_pickle.load(src), "pickled-module"
    except Exception as exc:
        raise PipelineError(f"checkpoint {src} cannot be read by torch.load ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, torch.jit.ScriptModule):  # OpenAI's original JIT archives
        obj = obj.state_dict()
    tensors = safe_pickle.tensors_in(obj)
    if not tensors:
        raise PipelineError(f"checkpoint {src} holds no tensors that look like a model ({type(obj).__name__})")
    return tensors, kind


def _strip(state: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def open_clip_visual(state: StateDict) -> StateDict | None:
    """Visual keys of an open_clip (whole or visual-only) state dict, or None if it is not one."""
    for key in sorted((k for k in state if k.endswith("conv1.weight")), key=len):
        prefix = key[: -len("conv1.weight")]
        if prefix == "" or prefix.endswith("visual."):
            return _strip(state, prefix)
    return None


def hf_visual(state: StateDict, base_proj: torch.Tensor | None, where: str) -> StateDict | None:
    """Map a transformers CLIP vision tower onto open_clip's names (None if it is not one)."""
    anchor = next((k for k in state if k.endswith("embeddings.patch_embedding.weight")), None)
    if anchor is None:
        return None
    prefix = anchor[: -len("embeddings.patch_embedding.weight")]  # "", "vision_model." or deeper
    vision = _strip(state, prefix)
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in vision.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = tensor
        elif key.endswith("position_ids"):
            continue
        elif m := _HF_LAYER.fullmatch(key):
            layer, rest = int(m.group(1)), m.group(2)
            if p := re.fullmatch(r"self_attn\.(q|k|v)_proj\.(weight|bias)", rest):
                qkv.setdefault((layer, p.group(2)), {})[p.group(1)] = tensor
                continue
            module, _, leaf = rest.rpartition(".")
            if module not in _HF_RENAMES:
                raise PipelineError(f"{where}: unexpected tensor {prefix + key!r} in a CLIP vision model")
            out[f"transformer.resblocks.{layer}.{_HF_RENAMES[module]}.{leaf}"] = tensor
        else:
            raise PipelineError(f"{where}: unexpected tensor {prefix + key!r} in a CLIP vision model")
    for (layer, leaf), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise PipelineError(f"{where}: layer {layer} lacks some of q/k/v_proj.{leaf}")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    projection = next((v for k, v in state.items() if k.endswith("visual_projection.weight")), None)
    if projection is not None:
        out["proj"] = projection.T.contiguous()
    elif base_proj is not None:
        out["proj"] = base_proj.clone()
    else:
        raise PipelineError(f"{where} has no visual_projection and no base model was given to take it from")
    return out


def to_canonical(src: Path, reference: StateDict) -> tuple[StateDict, str]:
    """Convert `src` to open_clip visual names, dtypes and shapes of `reference`.

    `reference` is the pretrained image encoder's state dict: it fixes the architecture and
    lends its projection to Hugging Face vision towers saved without one.
    """
    tensors, kind = read_tensors(src)
    tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    if BERT_KEY in reference:
        return _text_encoder(tensors, reference, src), kind
    visual = open_clip_visual(tensors)
    if visual is None:
        visual = hf_visual(tensors, reference.get("proj"), str(src))
        kind = "hf" if visual is not None else kind
    if visual is None:
        sample = ", ".join(sorted(tensors)[:4])
        raise PipelineError(f"{src}: not an open_clip or Hugging Face CLIP image encoder (no conv1.weight or "
                            f"embeddings.patch_embedding.weight among its {len(tensors)} tensors, e.g. {sample})")
    check_compatible(visual, reference, where=str(src))
    return {k: visual[k].to(reference[k].dtype).contiguous() for k in reference}, kind


BERT_KEY = "embeddings.word_embeddings.weight"


def _text_encoder(tensors: StateDict, reference: StateDict, src: Path) -> StateDict:
    """A BERT encoder's tensors, under a BertModel's names (a BertFor* model's `bert.` prefix
    dropped, and its task head)."""
    prefix = next((p for p in ("", "bert.") if p + BERT_KEY in tensors), None)
    if prefix is None:
        sample = ", ".join(sorted(tensors)[:4])
        raise PipelineError(f"{src}: not a BERT encoder (no {BERT_KEY} or bert.{BERT_KEY} among its {len(tensors)} "
                            f"tensors, e.g. {sample})")
    encoder = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and k[len(prefix):] in reference}
    check_compatible(encoder, reference, where=str(src))
    return {k: encoder[k].to(reference[k].dtype).contiguous() for k in reference}
