"""The paper's setting, offline: a generated stand-in for the real models and datasets in
every supported format goes through `dvc repro` with a `source` mapping, exactly as the
real ones would after `repsurgery fetch`."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import time

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from conftest import BIN, TINY, cli, env, make_project, run, with_merges
from pipeline.data.catalog import classnames_and_templates
from pipeline.data.importing import IMAGE_TYPE
from test_convert import task_arithmetic_pickle

# An open_clip model config (the format of open_clip's model_configs/*.json), BPE tokenizer.
CONFIG = {"embed_dim": 16, "quick_gelu": True,
          "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
          "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
N_TEST = 40


def png(rng: np.random.Generator, label: int) -> bytes:
    array = rng.integers(0, 60, (24, 24, 3), dtype=np.uint8)
    array[:, :, label % 3] += np.uint8(19 * label)  # class-dependent colour: some signal to find
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(path, rng, n_classes: int) -> None:
    labels = np.arange(N_TEST) % n_classes
    images = [{"bytes": png(rng, int(y)), "path": f"{i}.png"} for i, y in enumerate(labels)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": pa.array(images, type=IMAGE_TYPE), "label": pa.array(labels)}), path)


def write_image_folder(root, rng, classnames: list[str]) -> None:
    for i in range(N_TEST):
        label = i % len(classnames)
        folder = root / "test" / f"{label:02d}_{classnames[label].replace(' ', '_')}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(png(rng, label))


def finetuned_from(pretrained: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in pretrained.items()}


@pytest.fixture(scope="module")
def real_like(tmp_path_factory) -> dict:
    """Files as the user would have them: one task per dataset and checkpoint format."""
    root = tmp_path_factory.mktemp("source")
    rng = np.random.default_rng(0)
    (root / "config.json").write_text(json.dumps(CONFIG))
    torch.manual_seed(0)
    clip = open_clip.CLIP(**CONFIG)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(root / "clip.safetensors"))
    visual = clip.visual.state_dict()
    # mnist: HF parquet in a subfolder; finetuned as a visual-only open_clip safetensors
    write_parquet(root / "mnist" / "mnist" / "test-00000-of-00001.parquet", rng, 10)
    save_file(finetuned_from(visual, 1), str(root / "mnist.safetensors"))
    # svhn: HF parquet under data/; finetuned as a Task Arithmetic pickled ImageEncoder
    write_parquet(root / "svhn" / "data" / "test-00000-of-00001.parquet", rng, 10)
    task_arithmetic_pickle(root / "svhn_finetuned.pt", finetuned_from(visual, 2), root / "sentinel")
    # eurosat: one folder per class; finetuned as a whole-model open_clip .pt
    write_image_folder(root / "eurosat", rng, classnames_and_templates("eurosat")[0])
    whole = {f"visual.{k}": v for k, v in finetuned_from(visual, 3).items()}
    torch.save({"state_dict": whole}, root / "eurosat.pt")
    return {"root": root, "source": {
        "cache": str(root / "cache"),
        "pretrained": {"config": str(root / "config.json"), "weights": str(root / "clip.safetensors")},
        "finetuned": {"mnist": str(root / "mnist.safetensors"), "svhn": str(root / "svhn_finetuned.pt"),
                      "eurosat": str(root / "eurosat.pt")},
        "datasets": {"mnist": str(root / "mnist"), "svhn": str(root / "svhn"), "eurosat": str(root / "eurosat")},
    }}


@pytest.fixture(scope="module")
def project(real_like, tmp_path_factory):
    # Two merges are enough here (the methods have their own tests); no Traditional MTL checkpoint,
    # as that encoder is trained in the miniature world only.
    params = with_merges(TINY, ["weight_averaging", "lw_adamerging"])
    params["tasks"] = ["mnist", "svhn", "eurosat"]
    params["source"] = real_like["source"]
    params["extract"]["batch_size"] = 16
    params["router"] = {**params["router"], "split": "test", "images": 3}  # only test splits: fitted on 3 of each
    path = make_project(tmp_path_factory.mktemp("real") / "project", params)
    run([str(BIN / "dvc"), "repro", "-q"], path)
    return path


def test_repro_runs_the_whole_pipeline_on_a_real_source(project, real_like):
    metrics = json.loads((project / "results" / "metrics.json").read_text())
    assert set(metrics) >= {"pretrained", "individual", "weight_averaging", "lw_adamerging"}
    assert set(metrics["individual"]["acc"]) >= {"mnist", "svhn", "eurosat"}
    assert not (real_like["root"] / "sentinel").exists()  # the pickle's own code never ran
    # only test splits: the router is fitted on 3 images of each and scored on the others
    assert {"routed_acc", "routed_surgery_acc", "router_acc", "heldout_acc"} <= set(metrics["weight_averaging"])
    assert not list((project / "features").glob("merged/*/router-train.zarr"))


def test_doctor_checks_a_real_source_and_warns_of_splits_smaller_than_published(project):
    """The stand-in splits hold 40 images where the published ones hold thousands: worth a
    warning (a lost shard shows this way), not a stop (a subset may be on purpose)."""
    from pipeline.data.catalog import PAPER_TASKS

    done = cli(project, "doctor")
    assert done.returncode == 0, done.stderr
    assert "PROBLEM" not in done.stderr
    assert f"WARNING [data] mnist: {N_TEST} test images where the published split has " \
           f"{PAPER_TASKS['mnist'].test_images}" in done.stderr


def test_imported_splits_keep_their_labels_and_the_paper_class_names(project):
    from pipeline.data import datasets as data

    for task in ("mnist", "svhn", "eurosat"):
        info = data.task_info(project / "data", task)
        assert (info.classnames, info.templates) == classnames_and_templates(task)
        labels = data.labels(project / "data", task, "test")
        assert len(labels) == N_TEST and sorted(set(labels)) == list(range(10))
    # image folders: classes in sorted folder order, each image's origin recorded
    table = pq.read_table(next((project / "data" / "eurosat" / "data").glob("test-*.parquet")))
    paths = table["image"].combine_chunks().field("path").to_pylist()
    assert all(p.startswith(f"{y:02d}_") for p, y in zip(paths, table["label"].to_pylist()))


def test_finetuned_checkpoints_are_converted_exactly(project, real_like):
    from pipeline.models.checkpoints import load_state, read_metadata

    torch.manual_seed(0)
    visual = open_clip.CLIP(**CONFIG).visual.state_dict()
    for task, seed, fmt in (("mnist", 1, "safetensors"), ("svhn", 2, "pickled-module"), ("eurosat", 3, "torch")):
        path = project / "models" / "finetuned" / f"{task}.safetensors"
        state, expected = load_state(path), finetuned_from(visual, seed)
        assert all(torch.equal(state[k], expected[k]) for k in expected)
        assert read_metadata(path)["format"] == fmt


def test_heads_use_the_paper_templates_and_the_bpe_tokenizer(project):
    from safetensors.torch import load_file

    heads = load_file(str(project / "models" / "heads.safetensors"))
    assert heads["eurosat"].shape == (10, CONFIG["embed_dim"])


def test_convert_command_writes_a_fingerprinted_canonical_file(project, real_like):
    done = cli(project, "convert", str(real_like["root"] / "svhn_finetuned.pt"), "out.safetensors")
    assert done.returncode == 0, done.stderr
    from pipeline.models.checkpoints import fingerprint, load_state, read_metadata

    meta = read_metadata(project / "out.safetensors")
    assert meta["fingerprint"] == fingerprint(load_state(project / "out.safetensors"))
    assert meta["format"] == "pickled-module"


def test_missing_source_files_name_the_fix(project, tmp_path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["source"]["datasets"]["mnist"] = "hf://ylecun/mnist/mnist"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    done = cli(project, "prepare-data", "--params", str(tmp_path / "p.yaml"))
    assert done.returncode == 1
    assert "not in the cache" in done.stderr and "repsurgery fetch" in done.stderr


def test_a_dataset_whose_shard_holds_no_rows_is_refused_by_name_and_the_data_is_kept(project, tmp_path):
    empty = tmp_path / "empty" / "data" / "test-00000-of-00001.parquet"
    empty.parent.mkdir(parents=True)
    pq.write_table(pa.table({"image": pa.array([], type=IMAGE_TYPE), "label": pa.array([], type=pa.int64())}), empty)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["source"]["datasets"]["mnist"] = str(tmp_path / "empty")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    before = {p: p.read_bytes() for p in sorted((project / "data").rglob("*")) if p.is_file()}
    done = cli(project, "prepare-data", "--params", str(tmp_path / "p.yaml"))
    assert done.returncode == 1 and f"{empty} holds no rows" in done.stderr and "Traceback" not in done.stderr
    assert {p: p.read_bytes() for p in sorted((project / "data").rglob("*")) if p.is_file()} == before


def test_fetch_offline_fails_at_once_naming_everything_missing(tmp_path):
    done = run([str(BIN / "repsurgery"), "preset", "paper-vit-b-32"], tmp_path)
    assert "repsurgery fetch" in done.stdout
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["source"]["cache"] = str(tmp_path / "cache")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    offline = {**env(), "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on port 9
    started = time.monotonic()
    done = subprocess.run([str(BIN / "repsurgery"), "fetch"], cwd=tmp_path, env=offline, capture_output=True, text=True)
    assert done.returncode == 1
    assert time.monotonic() - started < 60
    downloads = 1 + len(params["tasks"]) * (1 + len(params["source"]["splits"]))  # pretrained, fine-tuned, splits
    assert "cannot be reached" in done.stderr and f"{downloads} of {downloads} downloads missing" in done.stderr
    assert "tanganke/clip-vit-base-patch32_stanford-cars" in done.stderr and "by hand" in done.stderr


def test_the_task_arithmetic_release_preset_reads_its_folder_layout_offline(project, real_like, tmp_path):
    """`repsurgery preset paper-ta-* --checkpoints DIR` points every task at DIR/<Dataset>/finetuned.pt
    (the release's layout, either pickle format) and records the family; the stages read those
    files through the restricted unpickler, without running their code."""
    from pipeline.data.catalog import PAPER_TASKS
    from pipeline.models.checkpoints import load_state, read_metadata
    from test_convert import task_arithmetic_pickle

    torch.manual_seed(0)
    visual = open_clip.CLIP(**CONFIG).visual.state_dict()
    release, sentinel = tmp_path / "ViT-B-32", tmp_path / "sentinel"
    tasks = {"mnist": (4, False), "svhn": (5, True)}  # seed, written by plain pickle.dump
    for task, (seed, plain) in tasks.items():
        (release / PAPER_TASKS[task].release_folder).mkdir(parents=True)
        task_arithmetic_pickle(release / PAPER_TASKS[task].release_folder / "finetuned.pt", finetuned_from(visual, seed),
                               sentinel, plain=plain)
    copy = project.parent / "ta-release"
    shutil.copytree(project, copy, symlinks=True)
    cli(copy, "preset", "paper-ta-vit-b-32", "--checkpoints", str(release), "--params", "ta.yaml", check=True)
    preset = yaml.safe_load((copy / "ta.yaml").read_text())
    assert preset["source"]["family"] == "task_arithmetic"
    assert preset["source"]["finetuned"]["cars"] == f"{release}/Cars/finetuned.pt"
    # the tiny stand-in for OpenAI CLIP and the test splits; the release's files as the preset names them
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["tasks"] = list(tasks)
    params["source"] = {**real_like["source"], "family": preset["source"]["family"],
                        "finetuned": {t: preset["source"]["finetuned"][t] for t in tasks}}
    (copy / "params.yaml").write_text(yaml.safe_dump(params))
    cli(copy, "check", check=True)
    cli(copy, "prepare-finetuned", check=True)
    for task, (seed, _) in tasks.items():
        path = copy / "models" / "finetuned" / f"{task}.safetensors"
        state, expected = load_state(path), finetuned_from(visual, seed)
        assert all(torch.equal(state[k], expected[k]) for k in expected)
        assert read_metadata(path)["format"] == "pickled-module"
    assert not sentinel.exists()
