"""The paper's eight tasks: class names and prompt templates (package data), and where the
public copies of their test splits and fine-tuned ViT encoders live on the Hugging Face Hub."""
from __future__ import annotations

import functools
import json
from importlib import resources
from typing import NamedTuple

from pipeline.errors import PipelineError

class PaperTask(NamedTuple):
    dataset: str          # the test split's Hub repo[/subfolder]
    hub_task: str         # the task's name in tanganke/clip-vit-*_<task> model ids
    test_images: int
    release_folder: str   # its folder in the Task Arithmetic release (<folder>/finetuned.pt)


PAPER_TASKS = {
    "sun397": PaperTask("tanganke/sun397", "sun397", 19887, "SUN397"),
    "cars": PaperTask("tanganke/stanford_cars", "stanford-cars", 8041, "Cars"),
    "resisc45": PaperTask("tanganke/resisc45", "resisc45", 6300, "RESISC45"),
    "eurosat": PaperTask("tanganke/eurosat", "eurosat", 2700, "EuroSAT"),
    "svhn": PaperTask("ufldl-stanford/svhn/cropped_digits", "svhn", 26032, "SVHN"),
    "gtsrb": PaperTask("tanganke/gtsrb", "gtsrb", 12630, "GTSRB"),
    "mnist": PaperTask("ylecun/mnist/mnist", "mnist", 10000, "MNIST"),
    "dtd": PaperTask("tanganke/dtd", "dtd", 1880, "DTD"),
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
