"""AdaMerging: merging coefficients learned by entropy minimisation on unlabeled test images.

theta = theta_0 + sum_t lambda_t * tau_t, one lambda per task (task-wise) or per task and
parameter tensor (layer-wise), clamped to [0, 1] in the forward pass. The reference keeps
every task's graph alive until one backward; here tasks share a graph as far as memory allows
(`Grouping`: on a GPU, all of them where they fit, as the reference, else task by task, so
ViT-L/14 fits on one GPU), with the same gradient. `precision` (float32, the reference's; tf32;
bf16 autocast) is opt-in, its effect on the coefficients measured in docs/benchmark.md.

`split` (default test, as the paper: unlabeled test images, transductive) is the split the
coefficients are learned on; `coefficients: FILE` skips the learning and takes the coefficients
the authors published
(`pipeline/merging/coefficient_tables.py`): "paper coefficients + surgery" without relearning.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Callable, Iterator, Literal

import torch
from pydantic import Field
from torch.func import functional_call

from cache.files import sha256_file
from pipeline.merging import coefficient_tables
from pipeline.merging.inputs import MergeInputs, Split
from pipeline.merging.registry import Merged, merge_method
from pipeline.merging.task_vectors import StateDict
from pipeline.reporting.published import arch_key
from pipeline.models.heads import logits

Positive = Annotated[int, Field(gt=0)]


class MergeCoefficients(torch.nn.Module):
    """theta_0 + [mask *] sum_t lambda_t tau_t, lambda clamped to [0, 1] (AdaMerging's reference) or
    not (`clamp=False`: FusionBench's Concrete AdaMerging)."""

    def __init__(self, pretrained: StateDict, vectors: list[StateDict], *, layer_wise: bool, init: float = 0.3,
                 clamp: bool = True):
        super().__init__()
        self.keys = sorted(vectors[0])
        self.pretrained = pretrained
        self.clamp = clamp
        # stacked task vectors: one (T, *shape) tensor per parameter tensor
        self.vectors = {k: torch.stack([tv[k] for tv in vectors]) for k in self.keys}
        shape = (len(vectors), len(self.keys)) if layer_wise else (len(vectors), 1)
        self.lambdas = torch.nn.Parameter(torch.full(shape, float(init)))

    def merged(self, mask: StateDict | None = None) -> StateDict:
        """The merged weights; `mask` (one tensor per key, shared by the tasks) multiplies the sum."""
        lam = self.lambdas.clamp(0, 1) if self.clamp else self.lambdas
        params = dict(self.pretrained)
        for i, key in enumerate(self.keys):
            coeff = lam[:, min(i, lam.shape[1] - 1)].view(-1, *[1] * (self.vectors[key].dim() - 1))
            update = (coeff * self.vectors[key]).sum(0)
            params[key] = self.pretrained[key] + (update if mask is None else mask[key] * update)
        return params

    def to(self, *args, **kwargs):
        super().to(*args, **kwargs)
        self.pretrained = {k: v.to(*args, **kwargs) for k, v in self.pretrained.items()}
        self.vectors = {k: v.to(*args, **kwargs) for k, v in self.vectors.items()}
        return self

    def values(self) -> torch.Tensor:
        """The coefficients the merge uses (clamped where they are clamped)."""
        lam = self.lambdas.detach()
        return (lam.clamp(0, 1) if self.clamp else lam).cpu()


def entropy(logit: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(logits), mean over the batch (in float32 at least)."""
    logp = logit.to(torch.promote_types(logit.dtype, torch.float32)).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean()


GRAPH_INPUTS = 2 ** 20  # input values (images x channels x pixels) up to which tasks share a graph off CUDA
Precision = Literal["float32", "tf32", "bf16"]  # a learned merge's forward and backward (`precision`)


def task_groups(batches: list[torch.Tensor], graph_inputs: int = GRAPH_INPUTS) -> list[list[int]]:
    """Consecutive tasks whose batches together hold at most `graph_inputs` input values (a task
    alone may hold more): one forward and backward per group. 0: a group per task."""
    groups: list[list[int]] = []
    held = 0
    for task, batch in enumerate(batches):
        if groups and held + batch.numel() <= graph_inputs:
            groups[-1].append(task)
            held += batch.numel()
        else:
            groups.append([task])
            held = batch.numel()
    return groups


class CudaMemory:
    """What a CUDA device has free for graphs, and the peak of the work between `start` and `peak`."""

    def __init__(self, device: torch.device):
        self.device = device

    def free(self) -> int:
        """Free on the device, plus what torch's allocator holds cached but unused."""
        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)

    def start(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)
        self._base = torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) - self._base


class Grouping:
    """Which tasks share one graph in a learned merge's step: the same gradient either way, one
    forward and backward per group. On CUDA, as many tasks as the free memory holds: the first
    step goes task by task and measures a task's graph, later ones put all tasks in one graph
    (the reference's step, the fastest) where they fit and task by task where they do not. Off
    CUDA, memory is not measured: tasks share a graph while their batches hold at most
    `GRAPH_INPUTS` input values (the miniature world's 32 px images: all in one; real-size ones:
    task by task). `graph_inputs` fixes that bound on any device (0: task by task)."""

    HEADROOM = 0.8  # of the free memory; the measured graph also holds that step's merged weights

    def __init__(self, graph_inputs: int | None = None, memory: CudaMemory | None = None):
        self.graph_inputs, self.memory, self.bytes_per_input = graph_inputs, memory, None

    @classmethod
    def on(cls, device: torch.device) -> "Grouping":
        return cls(memory=CudaMemory(device) if device.type == "cuda" else None)

    def __call__(self, batches: list[torch.Tensor]) -> list[list[int]]:
        if self.graph_inputs is not None or self.memory is None:
            return task_groups(batches, GRAPH_INPUTS if self.graph_inputs is None else self.graph_inputs)
        if self.bytes_per_input is None:
            return [[t] for t in range(len(batches))]
        return task_groups(batches, int(self.HEADROOM * self.memory.free() / self.bytes_per_input))

    @contextmanager
    def measuring(self, group: list[int], batches: list[torch.Tensor]):
        """Around a group's forward and backward: the first one sets the bytes per input value."""
        if self.memory is None or self.graph_inputs is not None or self.bytes_per_input is not None:
            yield
            return
        self.memory.start()
        yield
        self.bytes_per_input = self.memory.peak() / sum(batches[t].numel() for t in group)


@contextmanager
def at_precision(name: Precision, device: torch.device):
    """A learned merge's arithmetic: float32 (the reference's), TF32 matmuls (CUDA's tensor cores;
    on a CPU float32) or bf16 autocast of the forward (entropies still in float32)."""
    if name == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def group_entropy(encoder: torch.nn.Module, params: StateDict, group: list[int], heads: list[torch.Tensor],
                  batches: list[torch.Tensor]) -> torch.Tensor:
    """The summed entropies of a group's tasks, from one forward of their batches (concatenated
    where the group holds more than one)."""
    images = batches[group[0]] if len(group) == 1 else torch.cat([batches[t] for t in group])
    parts = functional_call(encoder, params, (images,)).split([len(batches[t]) for t in group])
    return sum(entropy(logits(part, heads[t])) for part, t in zip(parts, group))


def entropy_backward(encoder: torch.nn.Module, params: Callable[[], StateDict], heads: list[torch.Tensor],
                     batches: list[torch.Tensor], grouping: Grouping | None = None) -> float:
    """Backward of the entropy summed over tasks, accumulated group by group (`Grouping`), the
    merged weights `params()` rebuilt for each group so that one group's graph is alive at a
    time; returns the summed loss."""
    grouping = grouping or Grouping.on(batches[0].device)
    total = 0.0
    for group in grouping(batches):
        with grouping.measuring(group, batches):
            loss = group_entropy(encoder, params(), group, heads, batches)
            loss.backward()
        total += loss.item()
    return total


def step(encoder: torch.nn.Module, coeffs: MergeCoefficients, heads: list[torch.Tensor],
         batches: list[torch.Tensor], grouping: Grouping | None = None) -> float:
    """One AdaMerging step's gradient; returns the summed loss."""
    return entropy_backward(encoder, coeffs.merged, heads, batches, grouping)


def step_all_graphs(encoder: torch.nn.Module, coeffs: MergeCoefficients, heads: list[torch.Tensor],
                    batches: list[torch.Tensor]) -> float:
    """The reference's step: the merged weights once, every task's graph alive until a single
    backward of the summed loss. Same gradient as `step`, about T times its activation memory;
    kept as the benchmark's baseline (`repsurgery bench`)."""
    params = coeffs.merged()
    loss = sum(entropy(logits(functional_call(encoder, params, (images,)), head))
               for head, images in zip(heads, batches))
    loss.backward()
    return loss.item()


def learn(encoder: torch.nn.Module, coeffs: MergeCoefficients, heads: list[torch.Tensor],
          streams: list[Iterator[torch.Tensor]], *, steps: int, lr: float,
          device: torch.device, progress: Callable = lambda it: it) -> list[float]:
    """Adam(lr, betas 0.9/0.999) on the coefficients; returns the loss curve."""
    encoder = encoder.to(device).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    coeffs = coeffs.to(device)
    heads = [h.to(device) for h in heads]
    optimiser = torch.optim.Adam([coeffs.lambdas], lr=lr, betas=(0.9, 0.999))
    grouping = Grouping.on(device)
    curve = []
    for _ in progress(range(steps)):
        optimiser.zero_grad(set_to_none=True)
        curve.append(step(encoder, coeffs, heads, [next(s).to(device, non_blocking=True) for s in streams], grouping))
        optimiser.step()
    return curve


def published_lambdas(inputs: MergeInputs, path: str, model: str, *, table: str, layer_wise: bool) -> torch.Tensor:
    """The coefficients of the authors' table `table` for `model` (auto: the pretrained
    architecture's name in their code, e.g. ViT-B-32), mapped onto this encoder's tensors."""
    if model == "auto":
        model = arch_key((inputs.spec or {}).get("arch"))
    return coefficient_tables.lambdas(Path(path).expanduser(), table=table, model=model, layout=inputs.reference_layout,
                                      keys=sorted(inputs.vectors[0]), tasks=len(inputs.tasks), layer_wise=layer_wise)


def adapt(inputs: MergeInputs, vectors: list[StateDict], *, layer_wise: bool, init: float, lr: float, steps: int,
          per_task: int, seed: int, split: Split, coefficients: str | None = None,
          coefficients_model: str = "auto", table: str = "", clamp: bool = True,
          precision: Precision = "float32") -> Merged:
    """Learn AdaMerging coefficients over `vectors` (the task vectors, or processed ones: AdaMerging++,
    Concrete AM) on `per_task` images of every task per step, from `split`; or take them from the
    published table `table` in the file `coefficients`."""
    coeffs = MergeCoefficients(inputs.pretrained, vectors, layer_wise=layer_wise, init=init, clamp=clamp)
    if coefficients:
        with torch.no_grad():
            coeffs.lambdas.copy_(published_lambdas(inputs, coefficients, coefficients_model, table=table,
                                                   layer_wise=layer_wise))
        info = {"coefficients": coefficients, "table": table, "sha256": sha256_file(Path(coefficients)).hexdigest()}
    else:
        streams = [inputs.stream(t, per_task, seed + 1000 * t, split) for t in range(len(inputs.tasks))]
        with at_precision(precision, inputs.device):
            curve = learn(inputs.encoder, coeffs, inputs.heads, streams, steps=steps, lr=lr, device=inputs.device,
                          progress=lambda it: inputs.progress(it, desc=inputs.method, unit="step"))
        info = {"loss_first": curve[0], "loss_last": curve[-1]}
    with torch.no_grad():
        merged = {k: v.cpu() for k, v in coeffs.merged().items()}
    return Merged(merged, {"keys": coeffs.keys if layer_wise else ["all"], "lambdas": coeffs.values().tolist(),
                           **info})


def table_name(layer_wise: bool, suffix: str = "") -> str:
    """The authors' name of a method's coefficient table (`lw_adamerging`, `tw_adamergingpp`, ...)."""
    return f"{'lw' if layer_wise else 'tw'}_adamerging{suffix}"


def label(name: str):
    return lambda p: (f"{'Layer' if p.layer_wise else 'Task'}-wise {name}"
                      + (" (published coefficients)" if p.coefficients else ""))


@merge_method("adamerging", needs=("heads", "images", "device"), label=label("AdaMerging"))
def adamerging(inputs: MergeInputs, *, layer_wise: bool = True, init: Annotated[float, Field(ge=0, le=1)] = 0.3,
               lr: Annotated[float, Field(gt=0)] = 1e-3, steps: Positive = 500, batch_size: Positive = 16,
               batches_per_task: Positive = 2, seed: int = 0, split: Split = "test", coefficients: str | None = None,
               coefficients_model: str = "auto", precision: Precision = "float32") -> Merged:
    """Task-wise (one coefficient per task) or layer-wise (one per task and parameter tensor)."""
    # the reference takes two batches per task and step
    return adapt(inputs, inputs.vectors, layer_wise=layer_wise, init=init, lr=lr, steps=steps,
                 per_task=batch_size * batches_per_task, seed=seed, split=split, coefficients=coefficients,
                 coefficients_model=coefficients_model, table=table_name(layer_wise), precision=precision)
