"""A tiny miniature world, built once per test session by the real `dvc repro`."""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "tasks": ["digits", "colors", "positions"],
    "source": "world",
    "world": {"seed": 0, "image_size": 32, "n_train": 384, "n_test": 80, "noise": 8.0, "clutter": 3},
    "model": {"embed_dim": 32, "vision": {"width": 32, "layers": 1, "heads": 2, "patch_size": 8},
              "text": {"width": 32, "layers": 1, "heads": 2, "context_length": 16}},
    "pretrain": {"steps": 40, "batch_size": 64, "lr": 0.002, "weight_decay": 0.1, "named": {"default": 0.5}, "alias": {"default": 0.3},
                 "in_domain": {"default": 0.1}},
    "finetune": {"steps": 20, "batch_size": 32, "lr": 0.001, "weight_decay": 0.1, "warmup": 2},
    "merge": {  # every built-in method, the paper's Table 1 order then the newer merges, at tiny schedules
        "weight_averaging": {},
        "fisher_merging": {"images": 24, "batch_size": 8, "seed": 0, "split": "train"},
        "regmean": {"images": 24, "batch_size": 8, "alpha": 0.95, "seed": 0, "split": "train"},
        "task_arithmetic": {"scaling": 0.3},
        "ties_merging": {"k": 20, "scaling": 0.3, "merge": "sum"},
        "concrete_task_arithmetic": {"steps": 3, "batch_size": 8, "split": "test"},
        "concrete_adamerging": {"mask_steps": 2, "steps": 2, "batch_size": 8},
        **{name: {"method": "adamerging", "layer_wise": name == "lw_adamerging", "init": 0.3, "lr": 0.001,
                  "steps": 3, "batch_size": 8, "batches_per_task": 2, "seed": 0}
           for name in ("tw_adamerging", "lw_adamerging")},
        **{name: {"method": "adamerging_pp", "layer_wise": name == "lw_adamergingpp", "steps": 3, "batch_size": 8,
                  "batches_per_task": 1} for name in ("tw_adamergingpp", "lw_adamergingpp")},
        "tsv_merging": {}, "iso_c": {}, "iso_cts": {}, "wudi_merging": {"iterations": 50},
        "consensus_task_arithmetic": {},
        "mtl_checkpoint": {"method": "checkpoint", "label": "Traditional MTL (checkpoint)",
                           "path": "models/mtl/encoder.safetensors"}},
    "extract": {"batch_size": 32, "dtype": "float32", "autocast": "none"},
    "surgery": {"adapter": "surgery", "rank": 4, "lr": 0.001, "steps": 60, "batch_size": 16, "loss": "l1",
                "seeds": [0]},
    "adapters": {"prob_surgery": {"kl_weight": 1e-4}},
    "router": {"method": "nearest_centroid", "split": "train", "images": 24, "seed": 0},
    "mtl": {"steps": 20, "batch_size": 32, "lr": 0.001, "weight_decay": 0.1, "warmup": 2},
    "analyses": {"surgery": {"rank": 4, "lr": 0.001, "steps": 60, "batch_size": 16, "loss": "l1", "seed": 0},
                 "rank": {"ranks": [2, 4], "methods": ["task_arithmetic", "lw_adamerging"]},
                 "loss": {"losses": ["l1", "cosine"], "methods": ["task_arithmetic"]},
                 "data_ratio": {"ratios": [0.1, 1.0], "seed": 0, "methods": ["lw_adamerging"]},
                 "online": {"checkpoints": [0.1, 0.5, 1.0], "seed": 0, "methods": ["lw_adamerging"]},
                 "curve": {"eval_every": 20, "methods": ["weight_averaging", "ties_merging"]},
                 "adapters": {"adapters": [], "methods": ["task_arithmetic"]},
                 "bias": {"methods": []},
                 "tsne": {"methods": ["task_arithmetic"], "samples": 30, "perplexity": 10, "iterations": 250,
                          "seed": 0}},
}


def with_merges(params: dict, keys: list[str]) -> dict:
    """`params` with only the merge entries `keys`, each analysis on those of them it ran on (or
    on all of them): for tests about something other than the methods, as every merge stage
    costs a process start."""
    params = copy.deepcopy(params)
    params["merge"] = {key: params["merge"][key] for key in keys}
    for section in params["analyses"].values():
        if section.get("methods"):
            section["methods"] = [key for key in section["methods"] if key in keys] or list(keys)
    return params


def analysed(name: str) -> list[str]:
    """The merge entries analysis `name` runs on in the tiny world (params order; [] = all)."""
    chosen = TINY["analyses"][name.replace("-", "_")].get("methods") or list(TINY["merge"])
    return [m for m in TINY["merge"] if m in chosen]


def env(**extra: str) -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "REPSURGERY_QUIET": "1",
            "DVC_NO_ANALYTICS": "1", "REPSURGERY_DEVICE": "cpu", **extra}


def run(args: list[str], cwd: Path, check: bool = True, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env(**(extra_env or {})), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def make_project(path: Path, params: dict) -> Path:
    """A git + DVC repo with this project's dvc.yaml and the given params."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("pipeline", "stages", "cache"):
        (path / name).symlink_to(ROOT / name)
    shutil.copy(ROOT / "dvc.yaml", path / "dvc.yaml")
    shutil.copy(ROOT / ".dvcignore", path / ".dvcignore")
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # results/dvc.yaml (the generated plots) stays visible: DVC skips git-ignored dvc.yaml files
    (path / ".gitignore").write_text("/data\n/models\n/features\n/results/metrics.json\n/results/accuracy.md\n"
                                     "/results/analyses\n")
    run([str(BIN / "repsurgery"), "plots"], path)  # dvc.yaml's plots for these params' merge entries
    run(["git", "init", "-q"], path)
    run(["git", "config", "user.email", "t@t"], path)
    run(["git", "config", "user.name", "t"], path)
    run([str(BIN / "dvc"), "init", "-q"], path)
    run([str(BIN / "dvc"), "config", "core.analytics", "false"], path)
    run(["git", "add", "-A"], path)
    run(["git", "commit", "-qm", "init"], path)
    return path


@pytest.fixture(scope="session")
def world(tmp_path_factory, worker_id) -> Path:
    """The tiny world after a full `dvc repro` (every stage, real code path), built once per
    test session: with pytest-xdist, by the first worker that needs it, in the folder the
    session's workers share (the others wait for it). Tests only read it (`copy_project`)."""
    shared = tmp_path_factory.mktemp("tiny") if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    project = shared / "project"
    with FileLock(str(shared / "tiny-world.lock")):
        if not (shared / "tiny-world.built").exists():
            make_project(project, TINY)
            run([str(BIN / "dvc"), "repro", "-q"], project)
            run(["git", "add", "-A"], project)
            run(["git", "commit", "-qm", "repro"], project)
            (shared / "tiny-world.built").touch()
    return project


def copy_project(world: Path, path: Path) -> Path:
    """A private copy of a built project, for tests that change files or run experiments."""
    shutil.copytree(world, path, symlinks=True)
    return path


def cli(project: Path, *args: str, check: bool = False, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return run([str(BIN / "repsurgery"), *args], project, check=check, extra_env=extra_env)


def params_with(project: Path, out: Path, **changes) -> Path:
    """A copy of the project's params with dotted keys changed (`surgery__rank=0`)."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = params
        for key in parents:
            node = node[key]
        node[leaf] = value
    out.write_text(yaml.safe_dump(params, sort_keys=False))
    return out
