"""The paper's eight tasks: class names and prompt templates (package data), and where the
public copies of their test splits and fine-tuned ViT encoders live on the Hugging Face Hub."""
from __future__ import annotations

import functools
import json
from importlib import resources

from pipeline.errors import PipelineError

# task -> (dataset repo[/subfolder], task name in tanganke/clip-vit-*_<name>, test images)
PAPER_TASKS = {
    "sun397": ("tanganke/sun397", "sun397", 19887),
    "cars": ("tanganke/stanford_cars", "stanford-cars", 8041),
    "resisc45": ("tanganke/resisc45", "resisc45", 6300),
    "eurosat": ("tanganke/eurosat", "eurosat", 2700),
    "svhn": ("ufldl-stanford/svhn/cropped_digits", "svhn", 26032),
    "gtsrb": ("tanganke/gtsrb", "gtsrb", 12630),
    "mnist": ("ylecun/mnist/mnist", "mnist", 10000),
    "dtd": ("tanganke/dtd", "dtd", 1880),
}


@functools.cache
def _texts() -> dict:
    return json.loads(resources.files("pipeline").joinpath("assets/clip_tasks.json").read_text())


def classnames_and_templates(task: str) -> tuple[list[str], list[str]]:
    texts = _texts()
    if task not in texts:
        raise PipelineError(f"no class names/templates for task {task!r}: known are {', '.join(texts)}. "
                            "For another dataset, give `classnames` and `templates` in its params source entry.")
    return list(texts[task]["classnames"]), list(texts[task]["templates"])
