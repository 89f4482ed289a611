"""The merge-method registry: a merge method is one function in one module.

    @merge_method("task_arithmetic", label="Task Arithmetic")
    def task_arithmetic(inputs: MergeInputs, *, scaling: Annotated[float, Field(gt=0)] = 0.3) -> StateDict:
        ...

Its params are its keyword-only arguments: their annotations and defaults become a pydantic
model, so params.yaml is checked against the signature before any work starts. `needs` says
what the method uses beyond the pretrained and fine-tuned weights: the zero-shot `heads`,
unlabeled `images`, a `device` to run an encoder on. Built-in methods live in
`pipeline/merging/methods/` (every module there is imported); other packages add theirs
through the `repsurgery.merge_methods` entry-point group, without forking.
"""
from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import sys
import traceback
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ConfigDict, create_model

from pipeline.errors import DEBUG_ENV, PipelineError, debugging

if TYPE_CHECKING:  # the registry itself needs no torch: presets read SCHEDULES without loading it
    from pipeline.merging.task_vectors import StateDict

ENTRY_POINT_GROUP = "repsurgery.merge_methods"
NEEDS = ("heads", "images", "device")
SCHEDULES = ("steps", "mask_steps")  # the params that set how long a learned method trains
# Step sizes: the miniature world may size one to its own task vectors (WUDI's absolute Adam step);
# like the schedules, the paper presets leave them to the registered (reference) values.
STEP_SIZES = ("lr",)


@dataclass
class Merged:
    """A method's result: the merged image-encoder weights and what it computed or learned
    (written as JSON beside the checkpoint)."""
    state: StateDict
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeMethod:
    name: str
    label: str | Callable[[BaseModel], str]
    function: Callable[..., StateDict | Merged]
    needs: frozenset[str]
    params: type[BaseModel]
    module: str

    def display(self, params: BaseModel) -> str:
        return self.label(params) if callable(self.label) else self.label

    @property
    def source(self) -> str:
        """The file that defines the method."""
        return getattr(sys.modules.get(self.module), "__file__", None) or self.module

    def run(self, inputs, params: BaseModel) -> Merged:
        """The method's result, checked: the pretrained encoder's keys, shapes and dtypes, and an
        `info` that JSON can hold. An exception inside the method is one line naming where it
        was raised (the full traceback with REPSURGERY_DEBUG=1 or `repsurgery --debug`)."""
        try:
            result = self.function(inputs, **params.model_dump())
        except PipelineError:
            raise
        except Exception as exc:
            if debugging():
                raise
            raise PipelineError(f"merge method {self.name!r} ({self.source}) failed: {where(exc, self.source)} "
                                f"(set {DEBUG_ENV}=1 for the full traceback)") from exc
        result = result if isinstance(result, Merged) else Merged(result)
        self._check(result, inputs.pretrained)
        return result

    def _check(self, result: Merged, pretrained: StateDict) -> None:
        import torch

        state = result.state
        if not isinstance(state, dict):
            raise PipelineError(f"merge method {self.name!r} ({self.source}) returned {type(state).__name__}: "
                                "expected a state dict (name -> tensor) or Merged(state, info)")
        missing, extra = sorted(set(pretrained) - set(state)), sorted(set(state) - set(pretrained))
        if missing or extra:
            raise PipelineError(f"merge method {self.name!r} ({self.source}) returned a state dict whose keys are "
                                "not the pretrained encoder's: " + "; ".join(
                                    part for part in (f"missing {_few(missing)}" if missing else "",
                                                      f"unknown {_few(extra)}" if extra else "") if part))
        for key, value in state.items():
            reference = pretrained[key]
            if not isinstance(value, torch.Tensor) or value.shape != reference.shape or value.dtype != reference.dtype:
                got = (f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor)
                       else type(value).__name__)
                raise PipelineError(f"merge method {self.name!r} ({self.source}) returned {key!r} as {got}; the "
                                    f"pretrained encoder's is {tuple(reference.shape)} {reference.dtype}")
        try:
            json.dumps(result.info, allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise PipelineError(f"merge method {self.name!r} ({self.source}) returned an `info` JSON cannot hold "
                                f"({_unserialisable(result.info) or exc}): give plain numbers, strings, lists "
                                "and dicts (e.g. tensor.tolist())") from None


_METHODS: dict[str, MergeMethod] = {}
_loaded = False


def params_model(name: str, function: Callable) -> type[BaseModel]:
    """A strict pydantic model of the function's keyword-only arguments (unknown keys refused)."""
    fields = {}
    for p in list(inspect.signature(function, eval_str=True).parameters.values())[1:]:
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            raise TypeError(f"merge method {name!r}: parameter {p.name!r} must be keyword-only "
                            f"(write `def method(inputs, *, {p.name}=...)`)")
        if p.annotation is inspect.Parameter.empty:
            raise TypeError(f"merge method {name!r}: parameter {p.name!r} needs a type annotation")
        fields[p.name] = (p.annotation, ... if p.default is inspect.Parameter.empty else p.default)
    config = ConfigDict(extra="forbid", strict=True, arbitrary_types_allowed=False)
    return create_model(f"{name}_params", __config__=config, **fields)


def merge_method(name: str, *, label: str | Callable[[Any], str], needs: tuple[str, ...] = ()):
    """Register the decorated function as merge method `name`."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise TypeError(f"merge method {name!r}: unknown needs {sorted(unknown)}; choose from {NEEDS}")

    def register(function: Callable) -> Callable:
        if name in _METHODS and _METHODS[name].module != function.__module__:
            raise PipelineError(f"merge method {name!r} is registered twice: by {_METHODS[name].module} and by "
                                f"{function.__module__}; rename one of them")
        _METHODS[name] = MergeMethod(name, label, function, frozenset(needs), params_model(name, function),
                                     function.__module__)
        return function

    return register


def _load() -> None:
    """Import the built-in methods and every installed plugin, once per process."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from pipeline.merging import methods

    for module in pkgutil.iter_modules(methods.__path__):
        name = f"{methods.__name__}.{module.name}"
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise PipelineError(f"the merge-method module {name} does not load: {where(exc)}") from exc
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            point.load()
        except Exception as exc:
            raise PipelineError(f"the merge-method plugin {point.name!r} ({point.value}, entry-point group "
                                f"{ENTRY_POINT_GROUP}) does not load: {where(exc)}") from exc


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _unserialisable(value: Any, path: str = "info") -> str | None:
    """Where in `value` JSON fails first, e.g. `info['lambdas'] is a Tensor`."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str | int | float | bool) and key is not None:
                return f"{path} has a {type(key).__name__} key"
            found = _unserialisable(item, f"{path}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(value, list | tuple):
        return next((f for i, item in enumerate(value) if (f := _unserialisable(item, f"{path}[{i}]"))), None)
    if value is None or isinstance(value, str | int | float | bool):
        return None
    return f"{path} is a {type(value).__name__}"


def where(exc: BaseException, within: str | None = None) -> str:
    """`file:line: Type: message` of an exception: where a syntax error is, else the innermost
    frame (in file `within` where given and present) of its traceback."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}: {type(exc).__name__}: {exc.msg}"
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [f for f in frames if within and f.filename == within] or frames
    place = f"{inside[-1].filename}:{inside[-1].lineno}: " if inside else ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{place}{type(exc).__name__}" + (f": {message}" if message else "")


def available() -> dict[str, MergeMethod]:
    _load()
    return dict(sorted(_METHODS.items()))


def get(name: str) -> MergeMethod:
    methods = available()
    if name not in methods:
        raise PipelineError(f"unknown merge method {name!r}: registered are {', '.join(methods)}")
    return methods[name]
