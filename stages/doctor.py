"""`repsurgery doctor`: every check of pipeline/doctor.py, one line per problem with its fix."""
from __future__ import annotations

import sys

import torch
import typer

from pipeline import doctor
from pipeline.data.checks import runtime_summary
from pipeline.config import Params
from pipeline.errors import PipelineError
from stages.common import progress


def run_doctor(params: Params, device: torch.device) -> None:
    print(runtime_summary(params, device))
    findings = doctor.examine(params, device, progress=progress)
    for finding in findings:
        typer.secho(finding.line(), fg=typer.colors.YELLOW if finding.warning else typer.colors.RED, err=True)
    problems = sum(not f.warning for f in findings)
    warnings = len(findings) - problems
    if problems:
        raise PipelineError(f"doctor: {problems} problem(s) and {warnings} warning(s) (above, each with its fix)")
    print(f"doctor: no problems ({warnings} warning(s){' above' if warnings else ''}): sources, data, heads, "
          "encoders, disk and dataloader workers checked", file=sys.stdout)
