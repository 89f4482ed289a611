"""`repsurgery build-world`: the miniature world's encoders from scratch, to ship with the code."""
from __future__ import annotations

import time

import torch

from pipeline.config import Params
from pipeline.errors import PipelineError
from pipeline.world import shipped
from stages.heads import build_heads
from stages.mtl import build_mtl
from stages.world import build_data, build_finetuned, build_pretrained


def build_world(params: Params, device: torch.device) -> None:
    """`repsurgery build-world`: the world's data and every encoder from scratch, through the
    stages' own code, then shipped with the code (pipeline/assets/world, or text-world) for `dvc repro` to use."""
    if not params.is_world:
        raise PipelineError("`repsurgery build-world` builds the miniature world's encoders, but params `source` is "
                            "not `world`")
    start = time.perf_counter()
    build_data(params)
    build_pretrained(params, device, from_scratch=True)
    build_finetuned(params, device, from_scratch=True)
    build_heads(params, device)
    build_mtl(params, device, from_scratch=True)
    seconds = round(time.perf_counter() - start)
    shipped.publish(params, {"command": "repsurgery build-world", "torch": torch.__version__, "device": str(device),
                             "threads": torch.get_num_threads(), "seconds": seconds})
    print(f"world built from scratch in {seconds} s and shipped -> {shipped.root(params)}/ (commit it with the code)")
