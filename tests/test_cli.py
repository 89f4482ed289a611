"""The daily commands a user types besides the stages: the version and what there is to choose from."""
from __future__ import annotations

from importlib.metadata import version

import yaml

from pipeline.config import LOSSES, Surgery, validate
from pipeline.data.catalog import PAPER_TASKS
from pipeline.merging import registry
from pipeline.world.images import TASK_NAMES
from tests.conftest import TINY, cli


def test_version_is_the_installed_one(tmp_path):
    done = cli(tmp_path, "--version", check=True)
    assert done.stdout.strip() == f"repsurgery {version('repsurgery')}"


def test_list_shows_every_registered_choice_and_the_effective_params(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    text = cli(tmp_path, "list", check=True).stdout
    sections = dict(part.split("\n", 1) for part in ("\n" + text).split("\n# ")[1:])
    assert list(sections) == ["methods", "adapters", "tasks", "params"]
    methods = [line.split(":")[0] for line in sections["methods"].splitlines() if not line.startswith(" ")]
    assert methods == list(registry.available())
    assert max(map(len, text.splitlines())) <= 120  # a terminal's width
    assert all(loss in sections["adapters"] for loss in LOSSES)
    assert all(task in sections["tasks"] for task in (*TASK_NAMES, *PAPER_TASKS))
    shown = yaml.safe_load(sections["params"])
    assert shown == validate(TINY).model_dump(mode="json")  # every default filled in


def test_list_of_an_unknown_topic_names_the_choices(tmp_path):
    done = cli(tmp_path, "list", "adapter")
    assert done.returncode == 1 and done.stderr.strip() == (
        "error: nothing to list as 'adapter': choose one of methods, adapters, tasks, params, all")


def test_surgery_help_lists_its_settings_and_losses(tmp_path):
    text = " ".join(cli(tmp_path, "surgery", "--help", check=True).stdout.split())
    assert all(name in text for name in (*Surgery.model_fields, *LOSSES)), text


def test_preset_list_tasks_and_help_start_without_torch(tmp_path):
    """They run before any work: a torch that cannot even be imported does not stop them
    (`list adapters` and `list methods` read the registries, whose entries are torch code)."""
    broken = tmp_path / "broken"
    (broken / "torch").mkdir(parents=True)
    (broken / "torch" / "__init__.py").write_text("raise ImportError('torch was imported')")
    for args in (["--version"], ["preset", "paper-vit-b-32"], ["list", "tasks"], ["surgery", "--help"]):
        cli(tmp_path, *args, check=True, extra_env={"PYTHONPATH": str(broken)})
    assert (tmp_path / "params.yaml").read_text().startswith("# The paper's setting")
