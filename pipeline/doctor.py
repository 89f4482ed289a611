"""`repsurgery doctor`: everything a long GPU run needs, checked in a minute, one line per
problem with its fix: the sources, every test split (complete, readable, labels within the class
count, the published size, every image decodable), the heads, every encoder on a sample of each
task it will see (each fine-tuned one scored on its own task: a wrong label order shows there),
room for the feature stores, the device and the dataloader workers."""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

from pipeline import workspace
from pipeline.config import Params
from pipeline.data.checks import REIMPORT, Finding, check_data, check_heads, check_runtime
from pipeline.errors import PipelineError
from pipeline.features.jobs import check_disk
from pipeline.features.stores import leftover_report

SAMPLE = 64          # images per task the encoders run on


def check_encoders(params: Params, device: torch.device, sample: int = SAMPLE,
                   progress: Callable = lambda it, **kw: it) -> Iterator[Finding]:
    """The pretrained encoder and every checkpoint present (fine-tuned, merged) load and run on
    a few images of each task they will see; each fine-tuned encoder is scored on its own task."""
    from pipeline.models import encoders
    from pipeline.models.checkpoints import load_heads, load_state
    from pipeline.reporting.metrics import accuracy, near_chance

    try:
        encoder = encoders.encoder(workspace.PRETRAINED).to(device)
        heads = load_heads(workspace.HEADS, params.tasks)
    except PipelineError as exc:
        yield Finding("encoders", str(exc), "")
        return
    pretrained = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    images, labels = {}, {}
    for task in params.tasks:
        try:
            data = encoders.dataset(workspace.DATA, task, workspace.SPLIT, workspace.PRETRAINED)
            pick = np.random.default_rng(0).permutation(len(data))[:sample]
            images[task] = torch.stack([data[int(i)] for i in pick]).to(device)
            labels[task] = data.labels[pick]
        except PipelineError as exc:
            yield Finding("encoders", f"{task}: {str(exc).rstrip('.')}", REIMPORT)
    # (name, checkpoint, the tasks it sees, scored: a fine-tuned encoder on its own task)
    checkpoints = [(f"fine-tuned {t}", workspace.finetuned_checkpoint(t), [t], True) for t in params.tasks]
    checkpoints += [(f"merged {k}", workspace.merged_checkpoint(k), params.tasks, False) for k in params.methods
                    if workspace.merged_checkpoint(k).exists()]
    with torch.no_grad():
        for name, path, tasks, scored in progress([("pretrained", None, params.tasks, False), *checkpoints],
                                                  desc="encoders", unit="encoder", leave=False):
            try:
                encoder.load_state_dict(pretrained if path is None else load_state(path, like=pretrained,
                                                                                   hint=workspace.rebuild_hint(path)))
            except PipelineError as exc:
                yield Finding("encoders", f"{name}: {exc}", "")
                continue
            for task in (t for t in tasks if t in images):
                z = encoder(images[task])
                if not torch.isfinite(z).all():
                    yield Finding("encoders", f"{name} gives non-finite features on {task}",
                                  f"check {path or workspace.PRETRAINED} (a damaged or wrongly converted checkpoint)")
                elif scored:
                    score = accuracy(z.float().cpu(), heads[task], labels[task])
                    if near_chance({task: score}, {task: len(heads[task])}):
                        yield Finding("encoders", f"{name} gets {score:.0f} % of {len(labels[task])} images of its "
                                                  "own task, near chance", "check the split's label order and class "
                                                  "names, and that this checkpoint was fine-tuned on this task",
                                      warning=True)


def examine(params: Params, device: torch.device, *, progress: Callable = lambda it, **kw: it) -> list[Finding]:
    """Every check, in the order a run needs them."""
    findings = []
    if not params.is_world:
        from pipeline.data import sources

        try:
            sources.check(params.source, params.tasks)
        except PipelineError as exc:
            findings += [Finding("sources", line.strip(), "") for line in str(exc).splitlines()[1:]]
    unbuilt = [str(p) for p in (workspace.DATA, workspace.PRETRAINED, workspace.HEADS, workspace.FINETUNED)
               if not p.exists()]
    if unbuilt:  # the rest checks what the cheap stages make: say so once, not once per file
        return findings + [Finding("workspace", f"{', '.join(unbuilt)} not built yet",
                                   "run `dvc repro heads` (the quick stages: import the test splits, convert "
                                   "the checkpoints, build the heads), then `repsurgery doctor` again before the "
                                   "long ones")]
    findings += check_data(params, decode=True, progress=progress)
    findings += check_heads(params)
    findings += check_encoders(params, device, progress=progress)
    findings += check_disk(params)
    findings += [Finding("leftovers", path, what, warning=True) for path, what in leftover_report()]
    findings += check_runtime(params, device)
    return findings


