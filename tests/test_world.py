"""The miniature world's data: the real Hugging Face layout, deterministic, disjoint label spaces."""
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data import datasets as data
from pipeline.world import images
from pipeline.world.pretrain import Captions, build_tokenizer


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
