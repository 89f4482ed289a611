"""A word-level tokenizer for the miniature world, laid out like CLIP's BPE one.

open_clip's text tower pools at the argmax token id (CLIP's end-of-text token is the
largest id), so the end token here is the last id of the vocabulary.
"""
from __future__ import annotations

import re

import torch

PAD, SOT, UNK = "<pad>", "<sot>", "<unk>"
EOT = "<eot>"
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class WordTokenizer:
    def __init__(self, vocab: list[str], context_length: int):
        self.vocab = [PAD, SOT, UNK] + [w for w in vocab if w not in (PAD, SOT, UNK, EOT)] + [EOT]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = context_length

    @classmethod
    def from_texts(cls, texts, context_length: int) -> "WordTokenizer":
        return cls(sorted({w for t in texts for w in words(t)}), context_length)

    def to_config(self) -> dict:
        return {"kind": "words", "vocab": self.vocab[3:-1], "context_length": self.context_length}

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        unk, eot = self.index[UNK], self.index[EOT]
        for row, text in enumerate(texts):
            ids = [self.index[SOT]] + [self.index.get(w, unk) for w in words(text)]
            ids = ids[: self.context_length - 1] + [eot]
            out[row, : len(ids)] = torch.tensor(ids)
        return out
