"""Typed params, validated once when a command starts.

`load(path)` reads params.yaml (or a preset) and returns a `Params` object; any mistake (an
unknown or missing key, a wrong type, a value out of range, an unknown task, merge method or
loss) is one `PipelineError` line naming the key, the value, what is allowed and the file.
Each `merge:` entry is checked against its registered method's signature.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from pipeline.errors import PipelineError
from pipeline.reporting.published import OWN, families

LOSSES = ("l1", "mse", "smooth_l1", "cosine")  # surgery losses (pipeline.surgery.training.loss_fn)

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]
Share = Annotated[float, Field(ge=0, le=1)]
KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class World(Section):
    seed: int
    image_size: PositiveInt
    n_train: PositiveInt
    n_test: PositiveInt
    noise: Annotated[float, Field(ge=0)]
    clutter: Annotated[int, Field(ge=0)]


class TextWorld(Section):
    """The miniature text world (pipeline/world/texts.py): generated texts of `length` words, a
    share `noise` of them random words of the whole vocabulary."""
    seed: int
    n_train: PositiveInt
    n_test: PositiveInt
    length: PositiveInt
    noise: Share


class Tower(Section):
    width: PositiveInt
    layers: PositiveInt
    heads: PositiveInt


class VisionTower(Tower):
    patch_size: PositiveInt


class TextTower(Tower):
    context_length: PositiveInt


class Model(Section):
    embed_dim: PositiveInt
    vision: VisionTower
    text: TextTower


class TextModel(Section):
    """The miniature world's BERT (transformers' BertConfig sizes), and the token length of its inputs."""
    hidden: PositiveInt
    layers: PositiveInt
    heads: PositiveInt
    intermediate: PositiveInt
    max_length: Annotated[int, Field(ge=3)]  # [CLS] ... [SEP]

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden % self.heads:
            raise ValueError(f"`hidden` ({self.hidden}) must be a multiple of `heads` ({self.heads})")
        return self


class Training(Section):
    steps: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    weight_decay: Annotated[float, Field(ge=0)]


class Pretrain(Training):
    named: dict[str, Share]
    alias: dict[str, Share]
    in_domain: dict[str, Share]

    @field_validator("named", "alias", "in_domain")
    @classmethod
    def _has_default(cls, value: dict) -> dict:
        if "default" not in value:
            raise ValueError("needs a `default` share (and optionally one per task)")
        return value


class Finetune(Training):
    warmup: Annotated[int, Field(ge=0)]


class MaskedLM(Training):
    """BERT's pretraining objective on the text world's unlabeled corpus: `mask` of the tokens
    hidden (BERT's 80/10/10 split of [MASK], random and kept tokens)."""
    corpus: PositiveInt  # sentences
    mask: Fraction


Decoder = Literal["pil", "torchvision", "device"]  # who decodes and resizes: pipeline/data/preprocess.py


class Extract(Section):
    batch_size: PositiveInt
    dtype: Literal["float32", "float16"]
    autocast: Literal["none", "bf16", "fp16"]
    decode: Decoder = "pil"


class SurgerySettings(Section):
    adapter: str = "surgery"  # a registered adapter (pipeline/surgery/adapters/), its params in `adapters`
    rank: PositiveInt
    lr: PositiveFloat
    steps: PositiveInt
    batch_size: PositiveInt
    loss: Literal[LOSSES]
    optimiser: Literal["per_task", "shared"] = "per_task"  # shared: as the authors' code ran (training.py)


class Surgery(SurgerySettings):
    """The pipeline's surgery (metrics.json): trained once per seed, reported as mean and std."""
    seeds: Annotated[list[int], Field(min_length=1)]

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("each seed once")
        return value


class AnalysisSurgery(SurgerySettings):
    """The one reference setting the analyses study."""
    seed: int


class Router(Section):
    """Picks each test image's task (its adapter and head) from the merged features, fitted on
    `images` seeded images of each task (task membership known, class labels never read): of
    its train split, or of its test split and then scored on the rest only."""
    method: Literal["nearest_centroid", "knn", "linear"]
    split: Literal["train", "test"]
    images: PositiveInt
    seed: int
    k: PositiveInt = 10          # knn: neighbours that vote
    steps: PositiveInt = 200     # linear: full-batch Adam steps of the probe
    lr: PositiveFloat = 0.01     # linear


class PerMethod(Section):
    """An analysis run on some merge entries: `methods` lists their keys (the paper's choice
    by default), [] = every entry; rows always follow the params' order."""
    methods: list[str] = []


class RankSweep(PerMethod):
    ranks: Annotated[list[PositiveInt], Field(min_length=1)]


class LossSweep(PerMethod):
    losses: Annotated[list[Literal[LOSSES]], Field(min_length=1)]


class DataRatio(PerMethod):
    ratios: Annotated[list[Fraction], Field(min_length=1)]
    seed: int


class Online(PerMethod):
    checkpoints: Annotated[list[Fraction], Field(min_length=1)]
    seed: int


class Curve(PerMethod):
    eval_every: PositiveInt


class AdapterSweep(PerMethod):
    adapters: list[str] = []  # registered adapters compared, [] = every one


class Tsne(PerMethod):
    samples: PositiveInt
    perplexity: PositiveFloat
    iterations: Annotated[int, Field(ge=250)]  # scikit-learn's floor: its early exaggeration phase
    seed: int


class Analyses(Section):
    surgery: AnalysisSurgery  # the reference setting the analyses study (the paper's: the recipe's values)
    rank: RankSweep
    loss: LossSweep
    data_ratio: DataRatio
    online: Online
    curve: Curve
    bias: PerMethod
    tsne: Tsne
    adapters: AdapterSweep

    def methods(self, name: str, entries: list[str]) -> list[str]:
        """The merge entries analysis `name` runs on, in params order (none for the baselines)."""
        section = getattr(self, name.replace("-", "_"), None)
        if not isinstance(section, PerMethod):
            return []
        return [key for key in entries if key in (section.methods or entries)]


class PretrainedSource(Section):
    arch: str | None = None
    config: str | None = None
    weights: str

    @model_validator(mode="after")
    def _one_architecture(self):
        if (self.arch is None) == (self.config is None):
            raise ValueError("give exactly one of `arch` (an open_clip name) or `config` (a model config JSON file)")
        return self


class Source(Section):
    family: Literal[tuple(families())] = OWN  # whose published figures the run is compared with
    cache: str = "~/.cache/repsurgery"
    # the dataset splits fetched and imported: test (evaluation, transductive merges), and train
    # where a merge entry learns from training images (`split: train`: Fisher Merging, RegMean)
    splits: Annotated[list[Literal["test", "train"]], Field(min_length=1)] = ["test"]
    pretrained: PretrainedSource
    finetuned: dict[str, str] = {}  # text encoders: none (stage finetuned trains them)
    datasets: dict[str, str]
    classnames: dict[str, list[str]] = {}
    templates: dict[str, list[str]] = {}


class MergeEntry(BaseModel):
    """One `merge:` entry: a registered method (default: the entry's key) and its params."""
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    key: str
    method: str
    label: str
    params: BaseModel


MODALITIES = ("image", "text")


class Params(Section):
    modality: Literal["image"] = "image"  # image: CLIP image encoders; text: BERT text encoders (TextParams)
    tasks: Annotated[list[str], Field(min_length=1)]
    source: Literal["world"] | dict[str, Any]  # a mapping becomes a `Source` in `validate`
    world: World
    model: Model
    pretrain: Pretrain
    finetune: Finetune
    merge: dict[str, dict[str, Any]]
    extract: Extract
    surgery: Surgery
    adapters: dict[str, dict[str, Any] | None] = {}
    router: Router
    mtl: Finetune
    analyses: Analyses
    _entries: dict[str, MergeEntry] = PrivateAttr(default_factory=dict)
    _adapters: dict[str, BaseModel] = PrivateAttr(default_factory=dict)
    _source: str = PrivateAttr(default="params")  # the file the params were read from

    @property
    def is_world(self) -> bool:
        return self.source == "world"

    @property
    def is_text(self) -> bool:
        return self.modality == "text"

    @property
    def methods(self) -> list[str]:
        """The merge entries that run, in params order: the keys of metrics.json."""
        return list(self.merge)

    def merge_entry(self, key: str) -> MergeEntry:
        if key not in self.merge:
            raise PipelineError(f"no merge entry {key!r} in params `merge`: the entries are {', '.join(self.merge)}")
        return self._entries[key]

    def check_rows(self, rows: dict[str, int], key: str, size: int) -> None:
        """A batch size (params `key`) that samples a task's test rows must not exceed them:
        checked once the data exists, with the same one-line message as `load`'s."""
        fewest = min(rows, key=rows.get)
        if size > rows[fewest]:
            raise PipelineError(f"{self._source}: params `{key}` = {size}: expected at most the smallest task's "
                                f"{rows[fewest]} test rows ({fewest})")

    def labels(self) -> dict[str, str]:
        """Readable names of the merge entries, for tables and figures."""
        return {key: entry.label for key, entry in self._entries.items()}

    def adapter_params(self, name: str) -> dict[str, Any]:
        """A registered adapter's params: its `adapters` entry over its defaults."""
        return self._adapters[name].model_dump()

    def training(self, cfg: SurgerySettings) -> dict[str, Any]:
        """What the trainer takes from a surgery section: its settings (not its seeds) and its
        adapter's params."""
        return {**cfg.model_dump(exclude={"seed", "seeds"}), "adapter_params": self.adapter_params(cfg.adapter)}

    def adapter_names(self) -> list[str]:
        """The adapters the `adapters` analysis compares: those it lists, or every registered one
        (params `adapters` order first)."""
        return list(self.analyses.adapters.adapters or self._adapters)


class TextParams(Params):
    """`modality: text`: the paper's NLP experiment (Appendix B.2), BERT encoders on text tasks;
    its world, model and pretraining sections are the text world's."""
    modality: Literal["text"]
    world: TextWorld
    model: TextModel
    pretrain: MaskedLM

    def labels(self) -> dict[str, str]:
        """A text encoder has no zero-shot head: the pretrained row reads its features through the
        fine-tuned heads."""
        return {"pretrained": "Pretrained (fine-tuned heads)", **super().labels()}


def merge_entries(section: dict[str, dict]) -> dict[str, MergeEntry]:
    """Validate every `merge:` entry against its method's signature; readable, unique labels."""
    from pipeline.merging import registry

    entries = {}
    for key, values in section.items():
        values = dict(values or {})
        if not KEY.match(key):
            raise _error(f"merge.{key}", key, "a name of letters, digits and underscores (it names files and "
                         "DVC stages)")
        name = values.pop("method", key)
        label = values.pop("label", None)
        if name not in registry.available():
            raise _error(f"merge.{key}.method", name, f"a registered merge method: {', '.join(registry.available())}"
                         " (or set `method:` to one of them)")
        method = registry.get(name)
        try:
            params = method.params.model_validate(values)
        except ValidationError as exc:
            raise _from_validation(exc, prefix=f"merge.{key}.") from None
        entries[key] = MergeEntry(key=key, method=name, label=label or method.display(params), params=params)
    seen: dict[str, int] = {}
    for entry in entries.values():
        seen[entry.label] = seen.get(entry.label, 0) + 1
    return {k: e.model_copy(update={"label": f"{e.label} ({k})"}) if seen[e.label] > 1 else e
            for k, e in entries.items()}


def adapter_params(params: Params) -> dict[str, BaseModel]:
    """Every registered adapter's params (`adapters` entries checked against their `Params`);
    the adapters `surgery`, `analyses.surgery` and `analyses.adapters` name must be registered."""
    from pipeline.surgery import adapters

    known = adapters.available()
    named = {"adapters": list(params.adapters), "surgery.adapter": [params.surgery.adapter],
             "analyses.surgery.adapter": [params.analyses.surgery.adapter],
             "analyses.adapters.adapters": params.analyses.adapters.adapters}
    for key, names in named.items():
        for name in names:
            if name not in known:
                raise _error(key, name, f"a registered adapter: {', '.join(known)} (`repsurgery list adapters`)")
    out = {}
    for name in [*params.adapters, *(n for n in known if n not in params.adapters)]:  # params order first
        cls = known[name]
        try:
            out[name] = cls.Params.model_validate(params.adapters.get(name) or {})
        except ValidationError as exc:
            raise _from_validation(exc, prefix=f"adapters.{name}.") from None
    return out


def _error(key: str, value: Any, allowed: str) -> PipelineError:
    return PipelineError(f"params `{key}` = {value!r}: expected {allowed}")


def _from_validation(exc: ValidationError, prefix: str = "") -> PipelineError:
    first = exc.errors()[0]
    key = prefix + ".".join(str(part) for part in first["loc"])
    if first["type"] == "missing":
        return PipelineError(f"params `{key}` is missing")
    if first["type"] == "extra_forbidden":
        return PipelineError(f"params `{key}` is not a known key (remove it, or check its spelling)")
    value = first.get("input")
    return PipelineError(f"params `{key}` = {value!r}: {first['msg'][0].lower()}{first['msg'][1:]}")


def validate(raw: Any) -> Params:
    if not isinstance(raw, dict):
        raise PipelineError("params must be a mapping of sections (tasks, source, merge, surgery, ...)")
    modality = raw.get("modality", "image")
    if modality not in MODALITIES:
        raise _error("modality", modality, f"one of {', '.join(MODALITIES)} (image: CLIP image encoders, text: BERT)")
    try:
        params = (TextParams if modality == "text" else Params).model_validate(raw)
    except ValidationError as exc:
        raise _from_validation(exc) from None
    if not params.is_world:
        try:
            source = Source.model_validate(params.source)
        except ValidationError as exc:
            raise _from_validation(exc, prefix="source.") from None
        params = params.model_copy(update={"source": source})
    duplicated = sorted({t for t in params.tasks if params.tasks.count(t) > 1})
    if duplicated:
        raise _error("tasks", params.tasks, f"each task once ({', '.join(duplicated)} listed twice)")
    _check_tasks(params)
    if not params.merge:
        raise _error("merge", {}, "at least one merge entry")
    params._entries = merge_entries(params.merge)
    params._adapters = adapter_params(params)
    _check_splits(params)
    for name, section in params.analyses:
        for method in getattr(section, "methods", []):
            if method not in params.merge:
                raise _error(f"analyses.{name}.methods", method, f"entries of `merge`: {', '.join(params.merge)} "
                             "([] for every entry)")
    return params


def _check_splits(params: Params) -> None:
    """A real source imports only the splits it lists: an entry that learns on another one is a
    mistake to name now, not after the downloads (the world has both splits)."""
    if params.is_world:
        return
    if "test" not in params.source.splits:
        raise _error("source.splits", params.source.splits, "a list that holds test (every task is evaluated on it)")
    for key, entry in params._entries.items():
        split = getattr(entry.params, "split", None)
        if split is not None and split not in params.source.splits:
            raise _error(f"merge.{key}.split", split, f"a split that params `source.splits` lists "
                         f"({', '.join(params.source.splits)}): add {split} there and run `repsurgery fetch`, "
                         "or choose another split")
    if params.router.split not in params.source.splits:
        raise _error("router.split", params.router.split, f"a split that params `source.splits` lists "
                     f"({', '.join(params.source.splits)}): add it there and run `repsurgery fetch`, or fit the "
                     "router on some of each test split (`router.split: test`)")


def _check_tasks(params: Params) -> None:
    if params.is_world:
        if params.is_text:
            from pipeline.world.texts import TASK_NAMES
        else:
            from pipeline.world.images import TASK_NAMES

        unknown = [t for t in params.tasks if t not in TASK_NAMES]
        if unknown:
            raise _error("tasks", unknown, f"tasks of the miniature {params.modality} world: {', '.join(TASK_NAMES)}")
        return
    for key in ("datasets",) if params.is_text else ("datasets", "finetuned"):
        lacking = [t for t in params.tasks if t not in getattr(params.source, key)]
        if lacking:
            raise _error(f"source.{key}", sorted(getattr(params.source, key)), f"an entry for every task "
                         f"(missing: {', '.join(lacking)})")
    if params.is_text:  # no published text fine-tunes: stage finetuned trains each encoder with its head
        if params.source.finetuned:
            raise _error("source.finetuned", params.source.finetuned, "{} for text encoders: stage finetuned "
                         "fine-tunes each task's encoder with its head (params `finetune`), as no BERT fine-tunes "
                         "with heads of this form are published (docs/text.md)")
        if "train" not in params.source.splits:
            raise _error("source.splits", params.source.splits, "a list that holds train: the text encoders are "
                         "fine-tuned here, on their train splits")


def read_yaml(path: Path) -> Any:
    """A params file read as DVC reads it (ruamel.yaml, YAML 1.2: `5e-1` is a number, `on` a
    string), so that repsurgery and `dvc exp run -S` never see two different values."""
    from ruamel.yaml import YAML, YAMLError

    try:
        return YAML(typ="safe").load(path.read_text())
    except YAMLError as exc:
        raise PipelineError(f"{path} is not valid YAML: {' '.join(str(exc).split())[:300]}") from None


def load(path: Path | str = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"no params file at {path.resolve()}: run from the project root or pass --params")
    raw = read_yaml(path)
    try:
        params = validate(raw)
    except PipelineError as exc:
        raise PipelineError(f"{path}: {exc}") from None
    params._source = str(path)
    return params

