"""Device choice: CUDA when present, CPU otherwise, always overridable."""
from __future__ import annotations

import os

import torch

from pipeline.errors import PipelineError


def pick_device(override: str | None = None) -> torch.device:
    """Honour --device / REPSURGERY_DEVICE, else the first CUDA GPU, else the CPU."""
    choice = override or os.environ.get("REPSURGERY_DEVICE") or "auto"
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except RuntimeError as exc:
        raise PipelineError(f"unknown device {choice!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"device {choice!r} asked for, but torch sees no CUDA GPU: use --device cpu")
    return device
