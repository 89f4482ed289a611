"""Where real models and data come from: presets, the Hub fetch, imports, zero-shot heads."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from pipeline.data import datasets as data
from pipeline.data import hub
from pipeline.errors import PipelineError
from pipeline.models.heads import zeroshot_weights
from pipeline.data.importing import IMAGE_TYPE, import_splits
from stages.presets import paper_params, preset_text, sections, write_preset
from pipeline import config
from pipeline.data.sources import fetch_items

ROOT = Path(__file__).resolve().parents[1]


def test_the_world_preset_is_the_default_params_file():
    assert preset_text("world") == (ROOT / "params.yaml").read_text()


def test_the_world_full_preset_is_the_world_with_several_seeds_and_every_adapter_on_every_entry(tmp_path):
    from pipeline.config import load

    path = tmp_path / "params.yaml"
    path.write_text(preset_text("world-full"))
    full, world = load(path), load(ROOT / "params.yaml")
    assert len(full.surgery.seeds) > 1 and full.analyses.methods("adapters", full.methods) == full.methods
    assert full.model_dump(exclude={"surgery", "analyses"}) == world.model_dump(exclude={"surgery", "analyses"})
    assert full.surgery.model_dump(exclude={"seeds"}) == world.surgery.model_dump(exclude={"seeds"})


def test_a_preset_keeps_the_params_it_replaces(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("# my edits\n" + preset_text("world"))
    write_preset("paper-vit-b-32", path)
    assert path.read_text() == preset_text("paper-vit-b-32")
    assert (tmp_path / "params.yaml.bak").read_text() == "# my edits\n" + preset_text("world")
    write_preset("paper-vit-b-32", path)  # nothing to keep: the backup stays the user's file
    assert (tmp_path / "params.yaml.bak").read_text().startswith("# my edits")


def test_paper_presets_keep_the_comments_of_every_section_they_do_not_replace():
    world = sections(preset_text("world"))
    paper = preset_text("paper-vit-b-16")
    kept = [key for key in world if key and key not in ("tasks", "source", "merge")]
    assert kept and all(world[key] in paper for key in kept)
    assert list(sections(paper))[1:] == list(world)[1:]  # the same sections, in the same order
    assert paper.startswith("# The paper's setting (paper-vit-b-16)")


@pytest.mark.parametrize("name, arch", [("paper-vit-b-32", "ViT-B-32-quickgelu"),
                                        ("paper-vit-l-14", "ViT-L-14-quickgelu")])
def test_paper_presets_name_the_eight_tasks_on_the_hub(name, arch):
    params = yaml.safe_load(preset_text(name))
    assert params == paper_params(name)
    assert params["tasks"] == ["sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
    assert params["source"]["pretrained"] == {"arch": arch, "weights": "openai"}
    assert params["surgery"] == yaml.safe_load((ROOT / "params.yaml").read_text())["surgery"]
    typed = config.validate(params)
    adamerging = [typed.merge_entry(key).params for key, entry in params["merge"].items()
                  if entry.get("method") == "adamerging"]
    assert adamerging and all(p.steps == 500 for p in adamerging)  # the recipe's, the method's default
    items = {name: (ref, patterns) for name, ref, patterns in fetch_items(typed.source, typed.tasks)}
    # the train splits too: Fisher Merging and RegMean learn from them, as in their papers
    assert typed.merge_entry("fisher_merging").params.split == typed.merge_entry("regmean").params.split == "train"
    assert typed.source.splits == ["test", "train"]
    assert len(items) == 1 + 8 + 8 * 2  # pretrained + 8 fine-tuned + the test and train split of each task
    ref, patterns = items["svhn test split"]
    assert (ref.repo_id, ref.subfolder, ref.kind) == ("ufldl-stanford/svhn", "cropped_digits", "dataset")
    assert "cropped_digits/test-*.parquet" in patterns[0]
    assert "cropped_digits/train-*.parquet" in items["svhn train split"][1][0]
    assert items["pretrained " + arch][0].repo_id.startswith("timm/vit_")


@pytest.mark.parametrize("name, family", [("paper-vit-b-32", "fusionbench"), ("paper-ta-vit-l-14", "task_arithmetic")])
def test_each_paper_preset_names_its_checkpoint_family(name, family):
    """FusionBench's Hub fine-tunes, or the Task Arithmetic release in its own folder layout
    (fetch then brings only the pretrained weights and the test splits)."""
    typed = config.validate(paper_params(name))
    assert typed.source.family == family
    items = fetch_items(typed.source, typed.tasks)
    if family == "task_arithmetic":
        assert typed.source.finetuned["cars"] == "checkpoints/ViT-L-14/Cars/finetuned.pt"
        assert typed.source.finetuned["sun397"] == "checkpoints/ViT-L-14/SUN397/finetuned.pt"
        assert len(items) == 1 + 2 * len(typed.tasks)
    assert paper_params(name, checkpoints="/r")["source"]["finetuned"]["dtd"] == (
        "/r/DTD/finetuned.pt" if family == "task_arithmetic" else "hf://tanganke/clip-vit-base-patch32_dtd")


@pytest.mark.parametrize("name, fisher", [("paper-vit-b-32", {"estimator": "expected", "normalize": True}),
                                          ("paper-ta-vit-b-32", {"estimator": "sampled", "normalize": False})])
def test_each_family_s_preset_runs_fisher_merging_as_its_reference_does(name, fisher):
    """FusionBench's fine-tunes with FusionBench's estimator; the Task Arithmetic release with the
    Fisher Merging paper's definition (the registered default)."""
    fisher_params = config.validate(paper_params(name)).merge_entry("fisher_merging").params
    assert {k: getattr(fisher_params, k) for k in fisher} == fisher


def test_an_entry_learning_on_a_split_the_source_does_not_import_is_refused_before_anything_runs():
    params = paper_params("paper-vit-b-32")
    params["source"]["splits"] = ["test"]
    with pytest.raises(PipelineError, match=r"`merge.fisher_merging.split` = 'train'.*add train there and run "
                                            r"`repsurgery fetch`"):
        config.validate(params)
    params["merge"] = {k: {**v, "split": "test"} if "split" in v else v for k, v in params["merge"].items()}
    with pytest.raises(PipelineError, match=r"`router.split` = 'train'.*`router.split: test`"):  # nor the router
        config.validate(params)
    params["router"]["split"] = "test"
    assert config.validate(params).source.splits == ["test"]


def test_a_second_split_is_imported_beside_the_first_and_never_from_its_images(tmp_path):
    for split, n in (("test", 2), ("train", 3)):
        _shard(tmp_path / "src" / "data" / f"{split}-00000-of-00001.parquet", [_png()] * n, [0] * n)
    assert import_splits(tmp_path / "src", ["test", "train"], tmp_path / "data" / "t", "t", ["a", "b"], ["{c}"],
                         origin="here") == {"test": 2, "train": 3}
    assert [len(data.ImageDataset(tmp_path / "data", "t", split)) for split in ("test", "train")] == [2, 3]
    # image folders with one folder per class at the top: one split alone reads them; with two, which
    # split they hold is ambiguous, so each split needs its own folder
    folder = tmp_path / "folders"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        (folder / name / "x.png").write_bytes(_png())
    assert import_splits(folder, ["test"], tmp_path / "one", "t", ["a", "b"], ["{c}"], origin="here") == {"test": 2}
    with pytest.raises(PipelineError, match=r"no `test` folder .* put the test images in"):
        import_splits(folder, ["test", "train"], tmp_path / "two", "t", ["a", "b"], ["{c}"], origin="here")
    assert not (tmp_path / "two").exists() and not (tmp_path / "two.partial").exists()


def test_incomplete_sources_are_refused_naming_the_gap():
    params = paper_params("paper-vit-b-32")
    del params["source"]["finetuned"]["dtd"]
    with pytest.raises(PipelineError, match=r"source.finetuned.*missing: dtd"):
        config.validate(params)
    with pytest.raises(PipelineError, match="`source.model` is not a known key"):
        config.validate({**params, "source": {**params["source"], "model": "x"}})


def test_fetch_records_sizes_and_hashes_and_stops_at_the_first_connection_failure(tmp_path):
    calls = []

    def download(ref, patterns, cache):
        calls.append(ref.repo_id)
        if ref.repo_id == "a/ok":
            folder = ref.local_dir(cache)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "model.safetensors").write_bytes(b"abc")
            return [folder / "model.safetensors"]
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    items = [(n, hub.parse(f"hf://{n}", "model"), [["*"]]) for n in ("a/ok", "b/down", "c/never")]
    with pytest.raises(PipelineError) as error:
        hub.fetch(items, tmp_path, download=download)
    assert calls == ["a/ok", "b/down"]  # offline: no waiting on every remaining item
    assert "2 of 3 downloads missing" in str(error.value) and "c/never" in str(error.value)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["hf://a/ok"]["files"][0]["bytes"] == 3
    assert manifest["hf://a/ok"]["files"][0]["sha256"].startswith("ba7816bf")  # sha256("abc")


def test_bad_hub_references_are_refused():
    with pytest.raises(PipelineError, match="hf://owner/name"):
        hub.parse("hf://justone", "model")


def _shard(path: Path, images: list[bytes], labels: list[int]) -> None:
    rows = [{"bytes": b, "path": f"img{i}.png"} for i, b in enumerate(images)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": pa.array(rows, type=IMAGE_TYPE), "label": pa.array(labels)}), path)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_broken_image_is_named_by_file_shard_and_row(tmp_path):
    _shard(tmp_path / "src" / "data" / "test-00000-of-00001.parquet", [_png(), b"not an image"], [0, 1])
    import_splits(tmp_path / "src", ["test"], tmp_path / "data" / "t", "t", ["a", "b"], ["{c}"], origin="here")
    dataset = data.ImageDataset(tmp_path / "data", "t", "test")
    dataset[0]
    with pytest.raises(PipelineError, match=r"image \(img1.png\) at row 1 of .*test-00000-of-00001.parquet"):
        dataset[1]


def test_a_broken_image_in_a_loader_worker_reports_one_clear_line(tmp_path):
    from stages.cli import _original_message

    _shard(tmp_path / "src" / "data" / "test-00000-of-00001.parquet", [_png(), b"broken"], [0, 1])
    import_splits(tmp_path / "src", ["test"], tmp_path / "data" / "t", "t", ["a", "b"], ["{c}"], origin="here")
    dataset = data.ImageDataset(tmp_path / "data", "t", "test", transform=lambda im: torch.zeros(1))
    with pytest.raises(PipelineError) as error:
        list(data.loader(dataset, 1, workers=1))
    line = _original_message(error.value)
    assert "\n" not in line and line.startswith("cannot decode image (img1.png) at row 1 of ")


def test_labels_outside_the_class_names_are_refused(tmp_path):
    _shard(tmp_path / "src" / "test-00000-of-00001.parquet", [_png()], [5])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "task.json").write_text("{}")  # an earlier good import
    with pytest.raises(PipelineError, match=r"labels span 5..5, but the task has 2 class names"):
        import_splits(tmp_path / "src", ["test"], tmp_path / "out", "t", ["a", "b"], ["{c}"], origin="here")
    assert (tmp_path / "out" / "task.json").read_text() == "{}"  # kept, and no half-written import beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_image_folders_need_one_folder_per_class(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / "src" / "test" / name).mkdir(parents=True)
    with pytest.raises(PipelineError, match="3 class folders but the task has 2 class names"):
        import_splits(tmp_path / "src", ["test"], tmp_path / "out", "t", ["a", "b"], ["{c}"], origin="here")


def test_zero_shot_heads_are_normalised_template_means_times_the_logit_scale():
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=8, vision_cfg={"image_size": 16, "patch_size": 8, "width": 16, "layers": 1,
                                                    "head_width": 8},
                           text_cfg={"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 2,
                                     "layers": 1}).eval()
    tokenizer = open_clip.SimpleTokenizer(context_length=12)
    templates = ["a photo of a {c}.", "a {c} pattern."]
    head = zeroshot_weights(model, tokenizer, ["cat", "striped dog"], templates)
    scale = model.logit_scale.exp().item()
    assert scale == pytest.approx(1 / 0.07)
    torch.testing.assert_close(head.norm(dim=1), torch.full((2,), scale))
    with torch.no_grad():
        emb = F.normalize(model.encode_text(tokenizer(["a photo of a striped dog.", "a striped dog pattern."])), dim=-1)
    torch.testing.assert_close(head[1], F.normalize(emb.mean(0), dim=0) * scale)


def test_a_split_with_a_numbered_shard_missing_is_refused(tmp_path):
    """Hugging Face names shards `test-00001-of-00003`: a download cut short would otherwise
    import a smaller test set without a word."""
    for index in (0, 2):
        _shard(tmp_path / "src" / "data" / f"test-{index:05d}-of-00003.parquet", [_png()], [0])
    with pytest.raises(PipelineError, match=r"incomplete, test-00001-of-00003.parquet missing.*repsurgery fetch"):
        import_splits(tmp_path / "src", ["test"], tmp_path / "out", "t", ["a", "b"], ["{c}"], origin="here")
    assert not (tmp_path / "out").exists()
