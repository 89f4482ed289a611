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
import pkgutil
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ConfigDict, create_model

from pipeline.errors import PipelineError

if TYPE_CHECKING:  # the registry itself needs no torch: presets read SCHEDULES without loading it
    from pipeline.merging.task_vectors import StateDict

ENTRY_POINT_GROUP = "repsurgery.merge_methods"
NEEDS = ("heads", "images", "device")
SCHEDULES = ("steps", "mask_steps")  # the params that set how long a learned method trains


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

    def run(self, inputs, params: BaseModel) -> Merged:
        result = self.function(inputs, **params.model_dump())
        return result if isinstance(result, Merged) else Merged(result)


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
        importlib.import_module(f"{methods.__name__}.{module.name}")
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            point.load()
        except Exception as exc:
            raise PipelineError(f"the merge-method plugin {point.name!r} ({point.value}, entry-point group "
                                f"{ENTRY_POINT_GROUP}) does not load: {exc}") from exc


def available() -> dict[str, MergeMethod]:
    _load()
    return dict(sorted(_METHODS.items()))


def get(name: str) -> MergeMethod:
    methods = available()
    if name not in methods:
        raise PipelineError(f"unknown merge method {name!r}: registered are {', '.join(methods)}")
    return methods[name]
