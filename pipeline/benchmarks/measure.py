"""Measuring time and autograd memory fairly on CPU and CUDA (for `repsurgery bench`)."""
from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """(fn(), wall seconds), GPU work included."""
    sync(device)
    clock = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - clock


def rss_bytes() -> int:
    """The process's peak resident set so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


@contextmanager
def footprint(device: torch.device):
    """Wall time (`wall_s`) and peak memory (`peak_mib`) of the enclosed work, in the dict it
    yields: on CUDA the growth of torch.cuda.max_memory_allocated over what was allocated
    before; on CPU the growth of the process's peak resident set (what was loaded before, the
    inputs, is the baseline; work that peaks below an earlier peak counts as 0)."""
    out: dict[str, float] = {}
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    before, clock = rss_bytes(), time.perf_counter()
    yield out
    sync(device)
    out["wall_s"] = round(time.perf_counter() - clock, 3)
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else rss_bytes() - before
    out["peak_mib"] = round(peak / 2**20, 1)


class SavedTensorMeter:
    """Peak bytes of the tensors autograd keeps for backward (the activations of a graph).

    Counts each storage once however many graph nodes save it, frees it from the count when
    the graph lets it go (after backward), and ignores storages that exist regardless of the
    graph (parameters, task vectors, input batches: pass them as `persistent`). This is the
    memory that differs between keeping one task's graph alive and keeping all of them, and
    it is what torch.cuda.max_memory_allocated sees grow on a GPU, measured without one.
    """

    def __init__(self, persistent: Iterable[torch.Tensor] = ()):
        self.ignore = {t.untyped_storage().data_ptr() for t in persistent}
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, references]
        self.current = self.peak = 0

    def _pack(self, tensor: torch.Tensor):
        key = tensor.untyped_storage().data_ptr()
        if key in self.ignore or key == 0:
            return tensor
        entry = self.live.setdefault(key, [tensor.untyped_storage().nbytes(), 0])
        if entry[1] == 0:
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        return _Held(tensor, key, self)

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    @contextmanager
    def __call__(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
            yield self


class _Held:
    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: torch.Tensor, key: int, meter: SavedTensorMeter):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self):
        self.meter._release(self.key)


def _unpack(packed):
    return packed.tensor if isinstance(packed, _Held) else packed


def peak_memory(fn: Callable[[], object], device: torch.device,
                persistent: Iterable[torch.Tensor] = ()) -> tuple[int, str]:
    """Peak memory one call of `fn` adds, and how it was measured.

    CUDA: torch.cuda.max_memory_allocated above what was allocated before the call (every
    allocation: activations, gradients, temporaries). CPU: the autograd graph's saved
    tensors (SavedTensorMeter), the part of the footprint the graphs' lifetime decides.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base, "torch.cuda.max_memory_allocated"
    meter = SavedTensorMeter(persistent)
    with meter():
        fn()
    return meter.peak, "autograd saved tensors (saved_tensors_hooks), persistent tensors excluded"
