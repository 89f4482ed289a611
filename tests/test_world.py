"""The miniature world: its data (the real Hugging Face layout, deterministic, disjoint label
spaces, a domain per task), its pretraining captions, and its shipped encoders (checked at
load, used only for the params that built them, rebuilt from scratch by one command)."""
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cache.files import sha256_file
from pipeline.data import datasets as data
from pipeline.world import images
from pipeline.world.pretrain import Captions, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_tasks_are_written_as_hugging_face_parquet_shards(tmp_path):
    images.write_task(tmp_path, "arrows", n_train=40, n_test=16, size=32, seed=0)
    table = pq.read_table(tmp_path / "arrows" / "data" / "test-00000-of-00001.parquet")
    assert table.column_names == ["image", "label"]
    first = table.column("image")[0].as_py()
    assert set(first) == {"bytes", "path"}
    assert Image.open(io.BytesIO(first["bytes"])).size == (32, 32)
    labels = table.column("label").to_numpy()
    assert np.bincount(labels).tolist() == [2] * 8  # balanced over the 8 directions
    meta = json.loads((tmp_path / "arrows" / "task.json").read_text())
    assert meta["classnames"] == images.classnames("arrows")
    assert data.task_info(tmp_path, "arrows").templates == images.templates("arrows")
    assert (data.labels(tmp_path, "arrows", "test") == labels).all()


def test_generation_is_deterministic_per_seed(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        images.write_task(tmp_path / name, "digits", n_train=8, n_test=8, seed=seed)
    read = lambda n: (tmp_path / n / "digits" / "data" / "test-00000-of-00001.parquet").read_bytes()  # noqa: E731
    assert read("a") == read("b") and read("a") != read("c")


def test_label_spaces_are_disjoint_across_tasks():
    names = [c for t in images.TASK_NAMES for c in images.classnames(t)]
    assert len(names) == len(set(names))
    assert all(len(images.aliases(t)[0]) == len(images.classnames(t)) for t in images.TASK_NAMES)


def test_unknown_task_names_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'mnist'.*digits"):
        images.write_task(tmp_path, "mnist", n_train=1, n_test=1)


def test_a_broken_image_is_named_by_shard_and_row(tmp_path):
    images.write_task(tmp_path, "colors", n_train=4, n_test=4)
    path = tmp_path / "colors" / "data" / "test-00000-of-00001.parquet"
    table = pq.read_table(path).to_pylist()
    table[2]["image"]["bytes"] = b"not a png"
    import pyarrow as pa
    pq.write_table(pa.Table.from_pylist(table), path)
    dataset = data.ImageDataset(tmp_path, "colors", "test")
    dataset[1]
    with pytest.raises(Exception, match=r"row 2 of .*test-00000-of-00001.parquet"):
        dataset[2]


def test_pretraining_captions_follow_the_shares():
    import torch
    caps = Captions("arrows", images.classnames("arrows"), images.templates("arrows"), *images.aliases("arrows"),
                    named=0.2, alias=0.5)
    g = torch.Generator().manual_seed(0)
    texts = [caps.sample(3, g) for _ in range(2000)]
    named = sum("right" in t and s for t, s in texts) / 2000
    alias = sum("east" in t for t, _ in texts) / 2000
    broad = sum(not s for _, s in texts) / 2000
    assert named == pytest.approx(0.2, abs=0.03) and alias == pytest.approx(0.5, abs=0.03)
    assert broad == pytest.approx(0.3, abs=0.03)
    tokenizer = build_tokenizer([caps], context_length=16)
    assert tokenizer(texts[0][0])[0, 0] == tokenizer.index["<sot>"]
    in_domain = [caps.sample(3, g, in_domain=True) for _ in range(2000)]
    assert not any("right" in t for t, _ in in_domain), "an image in the benchmark's look never gets the class name"


def test_every_class_name_is_read_in_pretraining():
    from pipeline import config

    params = config.load(ROOT / "params.yaml")
    for task in params.tasks:
        share = params.pretrain.named.get(task, params.pretrain.named["default"])
        assert share > 0, f"{task}: its zero-shot prompts would be built from words pretraining never read"


def test_each_task_has_its_own_domain_that_pretraining_mostly_does_not_show():
    rng = np.random.default_rng(0)
    for task in images.TASK_NAMES:
        web = np.stack([images.render(task, 0, rng) for _ in range(32)]).astype(float)
        domain = np.stack([images.render(task, 0, rng, look=images.LOOKS[task]) for _ in range(32)]).astype(float)
        # the two looks differ in their pixel statistics (mean colour or contrast), not only in noise
        gap = np.abs(web.mean((0, 1, 2)) - domain.mean((0, 1, 2))).max() + abs(web.std() - domain.std())
        assert gap > 10, task
    pictures, labels, looks = images.web_images("digits", 400, in_domain=0.1, seed=0)
    assert pictures.shape == (400, 32, 32, 3) and set(labels) == set(range(10))
    assert looks.mean() == pytest.approx(0.1, abs=0.04)


def _tiny_params():
    from pipeline import config
    from tests.conftest import TINY

    return config.validate({**TINY, "tasks": ["digits", "colors"]})


@pytest.fixture
def assets(tmp_path, monkeypatch):
    """The shipped-encoder folder moved to a scratch place, and a scratch workspace."""
    from pipeline.world import shipped

    root = tmp_path / "assets" / "world"
    monkeypatch.setitem(shipped.ROOTS, "image", root)
    monkeypatch.setitem(shipped.ROOTS, "text", root.with_name("text-world"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPSURGERY_QUIET", "1")
    return root


def test_build_world_ships_encoders_that_the_stages_then_use_as_built(assets, capsys):
    import torch

    from pipeline import workspace
    from pipeline.models.checkpoints import fingerprint, load_state
    from stages.build_world import build_world
    from stages.world import build_finetuned, build_pretrained

    params = _tiny_params()
    build_world(params, torch.device("cpu"))
    built = json.loads((assets / "manifest.json").read_text())
    assert set(built["parts"]) == {"pretrained", "finetuned", "mtl"}
    assert set(built["parts"]["finetuned"]["files"]) == {f"{t}.safetensors" for t in params.tasks}
    states = {t: fingerprint(load_state(workspace.finetuned_checkpoint(t))) for t in params.tasks}
    # from scratch again, through the same code: the same bytes (deterministic on one machine)
    build_world(params, torch.device("cpu"))
    assert json.loads((assets / "manifest.json").read_text())["parts"] == built["parts"]
    shutil.rmtree(workspace.MODELS)
    capsys.readouterr()
    build_pretrained(params, torch.device("cpu"))
    build_finetuned(params, torch.device("cpu"))
    assert "shipped world encoders" in capsys.readouterr().out
    assert {t: fingerprint(load_state(workspace.finetuned_checkpoint(t))) for t in params.tasks} == states


def test_shipped_encoders_serve_only_the_params_that_built_them(assets, capsys):
    import torch

    from pipeline import config
    from pipeline.world import shipped
    from stages.build_world import build_world

    params = _tiny_params()
    assert "none are shipped" in shipped.differences(params, "pretrained")
    build_world(params, torch.device("cpu"))
    other = config.validate({**params.model_dump(), "finetune": {**params.finetune.model_dump(), "steps": 7}})
    assert shipped.differences(other, "pretrained") == ""  # fine-tuning does not shape the pretrained CLIP
    assert shipped.differences(other, "finetuned") == "the shipped ones were built with other params `finetune`"
    capsys.readouterr()
    assert not shipped.install("finetuned", other)
    assert "finetuned: building from scratch" in capsys.readouterr().out


def test_a_damaged_shipped_encoder_is_refused_with_its_fix(assets):
    import torch

    from pipeline import workspace
    from pipeline.errors import PipelineError
    from pipeline.world import shipped
    from stages.build_world import build_world

    params = _tiny_params()
    build_world(params, torch.device("cpu"))
    shutil.rmtree(workspace.MODELS)
    damaged = assets / "finetuned" / "digits.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(PipelineError, match=r"digits.safetensors is missing or damaged.*git checkout.*build-world"):
        shipped.install("finetuned", params)
    assert not workspace.FINETUNED.exists(), "nothing half-copied"
    manifest = assets / "manifest.json"
    for broken in ("{ not json", json.dumps({"parts": {}})):
        manifest.write_text(broken)
        with pytest.raises(PipelineError, match=r"manifest.json (is not valid JSON|lacks).*git checkout.*build-world"):
            shipped.install("pretrained", params)
    assert not workspace.PRETRAINED.exists()


def test_the_default_params_and_the_text_world_use_the_shipped_encoders_and_they_are_intact():
    import yaml

    from pipeline import config
    from pipeline.world import shipped
    from stages.presets import preset_text

    assert (ROOT / "params.yaml").read_text() == preset_text("world")
    for preset in ("world", "text-world"):
        params = config.validate(yaml.safe_load(preset_text(preset)))
        built = shipped.manifest(shipped.root(params))
        assert built is not None, f"run `repsurgery build-world` on the {preset} preset and commit its assets"
        for part in shipped.PARTS:
            assert shipped.differences(params, part) == "", f"{preset} {part}: rebuild with `repsurgery build-world`"
            for name, sha in built["parts"][part]["files"].items():
                assert sha256_file(shipped.root(params) / part / name).hexdigest() == sha


def test_the_committed_default_results_meet_the_world_s_goals():
    """What the miniature world is for (README, "Results at a glance"), checked on the committed
    results of the default params: zero-shot at least 5 points above chance on every task, every
    merge at least zero-shot, surgery closing at least 40 % of each merge's gap to the
    individual encoders, and the bias lower with surgery for every entry. The Traditional MTL
    checkpoint is a jointly trained encoder, not a merge: only its bias is held to the goal."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    results = json.loads((ROOT / "results" / "metrics.json").read_text())
    zero_shot, individual = results["pretrained"]["acc"], results["individual"]["acc"]
    for task in params["tasks"]:
        assert zero_shot[task] >= 100 / len(images.classnames(task)) + 5, task
    for key, entry in params["merge"].items():
        figures = results[key]
        assert figures["surgery_bias"]["avg"] < figures["bias"]["avg"], key
        if entry.get("method") == "checkpoint":
            continue
        merged, surgery = figures["acc"]["avg"], figures["surgery_acc"]["avg"]
        assert merged >= zero_shot["avg"], key
        assert surgery - merged >= 0.4 * (individual["avg"] - merged), key
