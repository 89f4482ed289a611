"""A new merge method is one module plus one params entry: it then gets extraction, surgery,
evaluation, the tables and the analyses. Third-party packages register methods through an
entry-point group, without forking."""
from __future__ import annotations

import json
import re
import shutil
import textwrap
from pathlib import Path

import yaml

from tests.conftest import BIN, ROOT, TINY, cli, copy_project, run

TRAINING_FREE = '''
"""Median merging: theta_0 + scaling * the element-wise median of the task vectors."""
from typing import Annotated

import torch
from pydantic import Field

from pipeline.merging.inputs import MergeInputs
from pipeline.merging.registry import merge_method
from pipeline.merging.task_vectors import StateDict, apply


@merge_method("median", label="Median")
def median(inputs: MergeInputs, *, scaling: Annotated[float, Field(gt=0)] = 1.0) -> StateDict:
    vectors = inputs.vectors
    return apply(inputs.pretrained, {k: torch.stack([v[k] for v in vectors]).median(0).values
                                     for k in vectors[0]}, scaling)
'''

DATA_USING = '''
"""Task Arithmetic with the scaling chosen by prediction entropy on unlabeled test images."""
from typing import Annotated

import torch
from pydantic import Field
from torch.func import functional_call

from pipeline.merging.inputs import MergeInputs
from pipeline.merging.methods.adamerging import entropy
from pipeline.merging.registry import Merged, merge_method
from pipeline.merging.task_vectors import apply, sum_vectors
from pipeline.models.heads import logits


@merge_method("entropy_scaled", label="Entropy-scaled TA", needs=("heads", "images", "device"))
def entropy_scaled(inputs: MergeInputs, *, low: float = 0.1, high: float = 0.5,
                   points: Annotated[int, Field(ge=2)] = 3, batch_size: Annotated[int, Field(gt=0)] = 8,
                   seed: int = 0) -> Merged:
    total = sum_vectors(inputs.vectors)
    batches = [next(inputs.stream(t, batch_size, seed)).to(inputs.device) for t in range(len(inputs.tasks))]
    encoder = inputs.encoder.to(inputs.device)
    scores = {}
    for scaling in torch.linspace(low, high, points).tolist():
        state = {k: v.to(inputs.device) for k, v in apply(inputs.pretrained, total, scaling).items()}
        with torch.no_grad():
            scores[round(scaling, 4)] = sum(entropy(logits(functional_call(encoder, state, (x,)), h)).item()
                                            for x, h in zip(batches, inputs.heads))
    best = min(scores, key=scores.get)
    return Merged(apply(inputs.pretrained, total, best), {"scaling": best, "entropy": scores})
'''


def own_code(project: Path) -> dict:
    """Give the project its own copy of the code (not links to this checkout) and run it from there."""
    for name in ("pipeline", "stages", "cache"):
        (project / name).unlink()
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    return {"PYTHONPATH": str(project)}


def stages_run(project: Path, extra_env: dict, *targets: str) -> list[str]:
    """`dvc repro [targets]`, and the stages it ran."""
    done = run([str(BIN / "dvc"), "repro", *targets], project, extra_env=extra_env)
    return re.findall(r"Running stage '([^']+)'", done.stdout)


def test_a_new_method_runs_only_its_own_branch_and_an_edit_reruns_only_the_entries_that_run_that_code(world, tmp_path):
    """One module plus one params entry give a method every result; adding it runs only its
    merge, its stores, its adapters, evaluate and the analyses that list it (the bias analysis
    lists every entry); editing a method's code re-runs only the entries whose code it is."""
    project = copy_project(world, tmp_path / "copy")
    extra_env = own_code(project)
    methods = project / "pipeline" / "merging" / "methods"
    (methods / "median.py").write_text(textwrap.dedent(TRAINING_FREE))
    (methods / "entropy_scaled.py").write_text(textwrap.dedent(DATA_USING))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["merge"]["median"] = {"scaling": 0.5}
    params["merge"]["entropy_scaled"] = {"points": 2}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    ran = stages_run(project, extra_env)
    assert sorted(ran) == sorted(["check", "merge@median", "merge@entropy_scaled", "extract", "surgery", "evaluate",
                                  "analyses"])
    listed_everywhere = [name for name, section in TINY["analyses"].items() if section.get("methods") == []]
    recomputed = json.loads((project / "results" / "analyses" / "bias" / "inputs.json").read_text())["methods"]
    assert "median" in recomputed and listed_everywhere == ["bias"]
    for name in ("rank", "loss", "tsne"):  # lists of their own: kept
        assert json.loads((project / "results" / "analyses" / name / "inputs.json").read_text())["methods"] == \
            TINY["analyses"][name]["methods"]
    metrics = json.loads((project / "results" / "metrics.json").read_text())
    for key in ("median", "entropy_scaled"):
        assert {"acc", "surgery_acc", "bias", "surgery_bias"} <= set(metrics[key])
        assert set(metrics[key]["surgery_acc"]) == {*TINY["tasks"], "avg"}
        rows = (project / "results" / "analyses" / "bias" / "table.csv").read_text()  # bias: every entry
        assert sum(line.startswith(f"{key},") for line in rows.splitlines()) == 2
    table = (project / "results" / "accuracy.md").read_text()
    assert "| Median + surgery |" in table and "| Entropy-scaled TA |" in table
    info = json.loads((project / "models" / "merged" / "entropy_scaled.json").read_text())
    assert info["scaling"] in (0.1, 0.5) and info["params"]["points"] == 2
    listed = cli(project, "list", "methods", check=True, extra_env=extra_env).stdout
    assert "median: Median" in listed and "entropy_scaled: Entropy-scaled TA [needs device, heads, images]" in listed

    # Editing one method re-runs its entries only (the merged weights are the same: nothing after them)
    with (methods / "median.py").open("a") as handle:
        handle.write("\n# an edit\n")
    assert stages_run(project, extra_env) == ["check", "merge@median"]
    # Editing code that other methods import re-runs each entry whose fingerprint holds it, and no other
    shared = "pipeline/merging/methods/ties_merging.py"
    fingerprints = {key: json.loads((project / "results" / "fingerprints" / f"{key}.json").read_text())
                    for key in params["merge"]}
    expected = {key for key, code in fingerprints.items() if shared in code["files"]}
    assert {"ties_merging", "tw_adamergingpp", "lw_adamergingpp"} <= expected < set(params["merge"])
    with (project / shared).open("a") as handle:
        handle.write("\n# an edit\n")
    ran = stages_run(project, extra_env)
    assert ran[0] == "check" and set(ran[1:]) == {f"merge@{key}" for key in expected}


def test_a_third_party_package_registers_a_method_through_the_entry_point_group(world, tmp_path):
    site = tmp_path / "site"
    (site / "mergeplugin").mkdir(parents=True)
    (site / "mergeplugin" / "__init__.py").write_text(textwrap.dedent('''
        from pipeline.merging.registry import merge_method
        from pipeline.merging.task_vectors import apply, sum_vectors


        @merge_method("plugin_sum", label="Plugin sum")
        def plugin_sum(inputs, *, scaling: float = 0.2):
            return apply(inputs.pretrained, sum_vectors(inputs.vectors), scaling)
    '''))
    dist = site / "mergeplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mergeplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[repsurgery.merge_methods]\nplugin_sum = mergeplugin\n")
    extra_env = {"PYTHONPATH": str(site)}
    assert "plugin_sum: Plugin sum" in cli(world, "list", "methods", check=True, extra_env=extra_env).stdout

    project = copy_project(world, tmp_path / "copy")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["merge"]["mine"] = {"method": "plugin_sum", "scaling": 0.1}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = cli(project, "merge", "mine", check=True, extra_env=extra_env)
    assert "mine (Plugin sum)" in done.stdout and (project / "models" / "merged" / "mine.safetensors").exists()
    # DVC sees the plugin's code through the entry's fingerprint: an edit re-runs its entry
    assert stages_run(project, extra_env, "merge@mine") == ["check", "merge@mine"]
    code = json.loads((project / "results" / "fingerprints" / "mine.json").read_text())
    assert str(site / "mergeplugin" / "__init__.py") in code["files"]
    with (site / "mergeplugin" / "__init__.py").open("a") as handle:
        handle.write("\n# an edit\n")
    assert "check" in run([str(BIN / "dvc"), "status"], project, extra_env=extra_env).stdout  # never "up to date"
    assert stages_run(project, extra_env, "merge@mine") == ["check", "merge@mine"]

    (dist / "entry_points.txt").write_text("[repsurgery.merge_methods]\nbroken = mergeplugin_missing\n")
    done = cli(project, "list", "methods", extra_env=extra_env)
    assert done.returncode == 1 and "plugin 'broken'" in done.stderr and "Traceback" not in done.stderr
