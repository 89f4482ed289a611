"""Reading tensors out of pickled PyTorch objects without running any of their code.

The Task Arithmetic release ships whole pickled `ImageEncoder` objects that only unpickle
with open_clip 2.0.2 and that repo's `src` package importable; a plain `torch.load` would
also run whatever the pickle names. Here every class or function a pickle refers to is
replaced by an inert placeholder that only records its arguments and state, except the
few torch functions that rebuild tensors. What comes out is a tree of placeholders whose
`_parameters`/`_buffers`/`_modules` are walked into an ordinary state dict.

Some files of that release are plain pickles (`pickle.dump` of the module, not `torch.save`),
whose storages pickle as `torch.storage._load_from_bytes(<a torch.save of the storage>)` and
whose bytes (protocol 2) as `_codecs.encode(str, "latin1")`: those two are replaced by
equivalents that read the bytes through this same restricted unpickler.
"""
from __future__ import annotations

import codecs
import collections
import io
import pickle
import types
from pathlib import Path

import torch

from pipeline.errors import PipelineError

# The only callables a pickle may actually invoke: tensor rebuilders and plain containers.
_TENSOR_REBUILDERS = {
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"), ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
}
_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}


class Placeholder:
    """Stands in for any pickled class: keeps constructor arguments and state, runs nothing."""

    _origin = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<placeholder {self._origin}>"


def _placeholder(module: str, name: str) -> type:
    return type(name, (Placeholder,), {"_origin": f"{module}.{name}", "__module__": "pipeline.safe_pickle"})


def _storage_from_bytes(data: bytes):
    """`torch.storage._load_from_bytes`, through the restricted unpickler."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False, pickle_module=restricted)


def _encode(text: str, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode`, the way protocol-2 pickles spell bytes; text codecs only."""
    if codecs.lookup(encoding).name not in ("latin-1", "iso8859-1", "utf-8", "ascii"):
        raise pickle.UnpicklingError(f"refusing codec {encoding!r} in a pickle")
    return codecs.encode(text, encoding)


_SAFE_EQUIVALENTS = {("torch.storage", "_load_from_bytes"): _storage_from_bytes, ("_codecs", "encode"): _encode}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        module = "builtins" if module == "__builtin__" else module  # protocol-2 pickles name Python 2's module
        if (module, name) in _SAFE_EQUIVALENTS:
            return _SAFE_EQUIVALENTS[(module, name)]
        if (module, name) in _TENSOR_REBUILDERS:
            return getattr(__import__(module, fromlist=[name]), name)
        if module == "torch" and name in _DTYPES:
            return getattr(torch, name)
        if module == "torch" and name == "Size":
            return torch.Size
        return _placeholder(module, name)


# torch.load accepts any module exposing `Unpickler` and `load`; its own wrapper subclasses ours.
restricted = types.SimpleNamespace(Unpickler=_RestrictedUnpickler, load=lambda f, **kw: _RestrictedUnpickler(f, **kw).load(),
                                   __name__="pipeline.safe_pickle.restricted")


def load(path: Path):
    """Unpickle a torch file (or a plain pickle of a module) with every non-tensor class
    replaced by a placeholder."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted)
        except RuntimeError as exc:
            if "magic number" not in str(exc):
                raise
        with open(path, "rb") as f:  # not torch.save's format: a plain pickle
            return _RestrictedUnpickler(f).load()
    except Exception as exc:
        raise PipelineError(f"cannot read {path} as a pickled PyTorch file ({type(exc).__name__}: {exc})") from exc


def module_state(root) -> dict[str, torch.Tensor]:
    """The state dict an nn.Module would give, read from a placeholder tree.

    A Module pickles its `__dict__`, which holds `_parameters`, `_buffers` (minus
    `_non_persistent_buffers_set`) and `_modules`; names join with dots as in state_dict().
    """
    out: dict[str, torch.Tensor] = {}

    def walk(node, prefix: str) -> None:
        state = node.state if isinstance(node, Placeholder) else None
        if not isinstance(state, dict):
            return
        skip = state.get("_non_persistent_buffers_set")
        skip = skip if isinstance(skip, (set, frozenset)) else set()
        for group in ("_parameters", "_buffers"):
            for name, tensor in (state.get(group) or {}).items():
                if isinstance(tensor, torch.Tensor) and name not in skip:
                    out[prefix + name] = tensor.detach()
        for name, child in (state.get("_modules") or {}).items():
            walk(child, f"{prefix}{name}.")

    walk(root, "")
    return out


def tensors_in(obj) -> dict[str, torch.Tensor]:
    """Tensors of a loaded object: a (nested) dict of tensors, or a pickled module tree."""
    if isinstance(obj, Placeholder):
        return module_state(obj)
    if isinstance(obj, (dict, collections.OrderedDict)):
        if "state_dict" in obj and isinstance(obj["state_dict"], dict):
            return tensors_in(obj["state_dict"])
        flat = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if flat:
            return flat
        for value in obj.values():  # e.g. {"model": <module>} or {"model": {...}}
            found = tensors_in(value)
            if found:
                return found
    return {}
