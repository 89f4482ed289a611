"""BERT text encoders (Hugging Face transformers), the second encoder family behind the stages.

The paper's NLP experiment (Appendix B.2) merges BERT models fine-tuned for text
classification; what each task classifies is the sentence feature BERT's sequence classifiers
read: the pooled output, tanh(W h_[CLS] + b) (`BertModel.pooler_output`). `TextEncoder` is a
`BertModel` whose forward takes token ids and returns that feature, so its state dict has
exactly the Hub checkpoints' names (`embeddings.*`, `encoder.layer.N.*`, `pooler.dense.*`)
and the image stages' calls (`encoder(batch)`, `functional_call(encoder, params, (batch,))`)
run it unchanged.

A model folder holds `bert.json` (the BertConfig, the token length and the lower-casing),
`vocab.txt` (BERT's WordPiece vocabulary; the miniature world's is whole words) and
`bert.safetensors` (the encoder's weights). transformers is imported where a model or a
tokenizer is built: seconds that a stage only copying weights should not pay.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch

from cache.files import write_text
from pipeline.errors import PipelineError
from pipeline.models.checkpoints import StateDict, load_state

SPEC = "bert.json"
VOCAB = "vocab.txt"
WEIGHTS = "bert.safetensors"
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # BERT's, first in the vocabulary: [PAD] is id 0


def read_spec(model_dir: Path) -> dict:
    path = Path(model_dir) / SPEC
    if not path.exists():
        raise PipelineError(f"no BERT spec at {path}: run `repsurgery prepare-pretrained` first")
    return json.loads(path.read_text())


def write_spec(model_dir: Path, config: dict, max_length: int, lower: bool = True, **extra) -> dict:
    spec = {"config": config, "max_length": max_length, "lower": lower, **extra}
    write_text(Path(model_dir) / SPEC, json.dumps(spec, indent=1, sort_keys=True) + "\n")
    return spec


def transformers_module():
    """Hugging Face transformers, the text family's one extra dependency (`pip install -e '.[text]'`)."""
    try:
        import transformers
    except ImportError:
        raise PipelineError("the text encoders (params `modality: text`) need Hugging Face transformers, which is "
                            "not installed: run `make repro` (it installs it for these params) or "
                            "`pip install -e '.[text]'`") from None
    return transformers


def bert_config(spec: dict):
    config = {k: v for k, v in spec["config"].items() if k not in ("architectures", "transformers_version")}
    return transformers_module().BertConfig(**config)


@functools.cache
def _encoder_class():
    class TextEncoder(transformers_module().BertModel):
        """BERT whose forward maps token ids (padding: id 0) to the pooled [CLS] feature."""

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return super().forward(input_ids=input_ids, attention_mask=(input_ids != 0).long()).pooler_output

    return TextEncoder


def build_encoder(spec: dict, device: str = "cpu") -> torch.nn.Module:
    """A randomly initialised encoder of the spec's architecture (`device="meta"`: shapes only)."""
    with torch.device(device):
        return _encoder_class()(bert_config(spec), add_pooling_layer=True)


def encoder_state(model_dir: Path) -> StateDict:
    return load_state(Path(model_dir) / WEIGHTS, hint="Re-run `repsurgery prepare-pretrained`.")


def text_encoder(model_dir: Path, state: StateDict | None = None) -> torch.nn.Module:
    """The pretrained encoder, optionally with other (fine-tuned or merged) weights."""
    encoder = build_encoder(read_spec(model_dir))
    if state is None:
        state = load_state(Path(model_dir) / WEIGHTS, like=encoder.state_dict(),
                           hint="Re-run `repsurgery prepare-pretrained`.")
    encoder.load_state_dict(state)
    return encoder.eval()


def feature_dim(spec: dict) -> int:
    return int(spec["config"]["hidden_size"])


def tokenizer(model_dir: Path):
    """BERT's WordPiece tokenizer of the folder's vocabulary (lower-cased as the model was trained)."""
    BertTokenizerFast = transformers_module().BertTokenizerFast  # noqa: N806
    model_dir = Path(model_dir)
    if not (model_dir / VOCAB).exists():
        raise PipelineError(f"no {VOCAB} in {model_dir}: run `repsurgery prepare-pretrained` first")
    return BertTokenizerFast.from_pretrained(str(model_dir), do_lower_case=read_spec(model_dir).get("lower", True))


def tokenize(model_dir: Path, texts: list[str]) -> torch.Tensor:
    """(N, max_length) token ids: [CLS] text [SEP], truncated, padded with 0."""
    length = read_spec(model_dir)["max_length"]
    return tokenizer(model_dir)(list(texts), max_length=length, truncation=True, padding="max_length",
                                return_tensors="pt")["input_ids"]


def identity(model_dir: Path) -> dict:
    """What a feature store of token ids depends on besides the weights: the vocabulary and length."""
    spec = read_spec(model_dir)
    vocab = hashlib.sha256((Path(model_dir) / VOCAB).read_bytes()).hexdigest()[:16]
    return {"tokenizer": {"vocab": vocab, "max_length": spec["max_length"], "lower": spec.get("lower", True)}}


def write_vocab(model_dir: Path, words: list[str]) -> None:
    """A whole-word vocabulary (the miniature world's): BERT's special tokens, then the words."""
    write_text(Path(model_dir) / VOCAB, "\n".join([*SPECIAL, *(w for w in words if w not in SPECIAL)]) + "\n")


def hub_spec(folder: Path, max_length: int) -> dict:
    """The spec of a Hugging Face BERT folder (its config.json)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    if config.get("model_type") != "bert":
        raise PipelineError(f"{folder}/config.json is a {config.get('model_type')!r} model: the text family is BERT "
                            "(model_type bert)")
    if max_length > config.get("max_position_embeddings", max_length):
        raise PipelineError(f"params `model.max_length` = {max_length}: expected at most the "
                            f"{config['max_position_embeddings']} positions {folder}/config.json embeds")
    return {"config": config, "max_length": max_length, "lower": True}
