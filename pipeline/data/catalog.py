"""The paper's eight image tasks: class names and prompt templates (package data), and where the
public copies of their test splits and fine-tuned ViT encoders live on the Hugging Face Hub; and
its five text tasks (Appendix B.2): their Hub copies, the columns that hold the text and label,
and their class names."""
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


class TextTask(NamedTuple):
    dataset: str                # Hub repo[/subfolder] holding `<split>-*.parquet`
    text: tuple[str, ...]       # the columns joined (with a space) into the text BERT reads
    label: str                  # the label column (0-based)
    classnames: tuple[str, ...]
    test_rows: int


# The datasets of the paper's NLP experiment, as the continual-learning benchmark it follows
# (Zhang et al., 2015; de Masson d'Autume et al., 2019) publishes them. Amazon Review Full has
# no parquet copy on the Hub under its name: Amazon Reviews Multi (English, 5 stars) stands in.
TEXT_TASKS = {
    "agnews": TextTask("fancyzhx/ag_news", ("text",), "label", ("world", "sports", "business", "science/tech"), 7600),
    "yelp": TextTask("Yelp/yelp_review_full/yelp_review_full", ("text",), "label",
                     ("1 star", "2 stars", "3 stars", "4 stars", "5 stars"), 50000),
    "amazon": TextTask("Samoed/AmazonReviewsClassification/en", ("text",), "label",
                       ("1 star", "2 stars", "3 stars", "4 stars", "5 stars"), 5000),
    "yahoo": TextTask("community-datasets/yahoo_answers_topics/yahoo_answers_topics",
                      ("question_title", "question_content", "best_answer"), "topic",
                      ("society & culture", "science & mathematics", "health", "education & reference",
                       "computers & internet", "sports", "business & finance", "entertainment & music",
                       "family & relationships", "politics & government"), 60000),
    "dbpedia": TextTask("fancyzhx/dbpedia_14/dbpedia_14", ("title", "content"), "label",
                        ("company", "educational institution", "artist", "athlete", "office holder",
                         "mean of transportation", "building", "natural place", "village", "animal", "plant",
                         "album", "film", "written work"), 70000),
}
