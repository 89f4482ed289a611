"""`repsurgery doctor` and the GPU stages' preflight on broken copies of the tiny world: each
fault is one line naming where it is and the fix, and nothing runs on a broken input."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conftest import TINY, cli, copy_project


def shard_of(project, task):
    (shard,) = sorted((project / "data" / task / "data").glob("test-*.parquet"))
    return shard


def rewrite(shard, table, name=None):
    """Replace a (hard-linked) shard by a new file."""
    shard.unlink()
    pq.write_table(table, shard.with_name(name or shard.name))


def test_a_healthy_world_has_no_problems(world):
    done = cli(world, "doctor")
    assert done.returncode == 0, done.stderr
    assert "doctor: no problems" in done.stdout and "PROBLEM" not in done.stderr
    assert "dataloader workers" in done.stdout  # device, threads and workers are said


def test_a_missing_shard_and_a_corrupt_image_are_named_and_extraction_refuses_to_start(world, tmp_path):
    project = copy_project(world, tmp_path / "broken")
    first, second = TINY["tasks"][:2]
    # first task: its split in two numbered shards, the second of them lost
    shard = shard_of(project, first)
    table = pq.read_table(shard)
    rewrite(shard, table.slice(0, 40), "test-00000-of-00002.parquet")
    # second task: one image's bytes cut short
    shard = shard_of(project, second)
    table = pq.read_table(shard)
    images = table.column("image").combine_chunks()
    data, paths = images.field("bytes").to_pylist(), images.field("path").to_pylist()
    data[7] = data[7][:20]
    column = pa.StructArray.from_arrays([pa.array(data, pa.binary()), pa.array(paths)], fields=list(images.type))
    rewrite(shard, table.set_column(table.schema.get_field_index("image"), "image", column))

    done = cli(project, "doctor")
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.startswith("PROBLEM")]
    assert any(f"{first}: shard(s) test-00001-of-00002.parquet missing" in line and "repsurgery fetch" in line
               for line in lines), done.stderr
    assert any(f"{second}: 1 image(s) do not decode, the first at row 7 of" in line for line in lines), done.stderr
    assert "Traceback" not in done.stderr

    stores = {p: p.stat().st_mtime_ns for p in (project / "features").rglob("*.zarr")}
    done = cli(project, "extract")
    assert done.returncode == 1 and "problem(s) found before starting" in done.stderr
    assert f"{first}: shard(s) test-00001-of-00002.parquet missing" in done.stderr
    assert {p: p.stat().st_mtime_ns for p in (project / "features").rglob("*.zarr")} == stores


def test_a_wrong_label_order_shows_as_a_fine_tuned_encoder_near_chance_on_its_own_task(world, tmp_path):
    """A split whose labels are shifted (the same images, another class order) leaves every file
    valid; doctor scores each fine-tuned encoder on a sample of its task and warns. The tiny
    world's encoders are near chance anyway, so the task gets a head that reads its fine-tuned
    features well (their class means): the shift must then show."""
    import torch
    from safetensors.torch import load_file, save_file

    from pipeline.data.datasets import ImageDataset
    from pipeline.models import clip
    from pipeline.models.checkpoints import load_state
    from pipeline.reporting.metrics import accuracy, near_chance

    project = copy_project(world, tmp_path / "shifted")
    task = "colors"
    model = project / "models" / "pretrained"
    encoder = clip.image_encoder(model, load_state(project / "models" / "finetuned" / f"{task}.safetensors"))
    data = ImageDataset(project / "data", task, "test", clip.preprocess_for(clip.read_spec(model)))
    with torch.no_grad():
        z = torch.nn.functional.normalize(encoder(torch.stack([data[i] for i in range(len(data))])), dim=-1)
    labels = torch.as_tensor(data.labels)
    classes = int(labels.max()) + 1
    head = torch.nn.functional.normalize(torch.stack([z[labels == c].mean(0) for c in range(classes)]), dim=-1) * 100
    assert not near_chance({task: accuracy(z, head, data.labels)}, {task: classes})  # it can tell
    heads = load_file(str(project / "models" / "heads.safetensors"))
    heads[task] = head.contiguous()
    (project / "models" / "heads.safetensors").unlink()
    save_file(heads, str(project / "models" / "heads.safetensors"))
    shard = shard_of(project, task)
    table = pq.read_table(shard)
    shifted = (table.column("label").to_numpy() + 1) % classes
    assert near_chance({task: accuracy(z, head, shifted)}, {task: classes})  # what the shift does to it
    rewrite(shard, table.set_column(table.schema.get_field_index("label"), "label", pa.array(shifted)))
    (line,) = [line for line in cli(project, "doctor").stderr.splitlines()
               if line.startswith("WARNING") and f"fine-tuned {task} gets" in line]
    assert "near chance" in line and "label order" in line


def test_labels_beyond_the_class_count_and_heads_of_the_wrong_size_are_problems(world, tmp_path):
    from safetensors.torch import load_file, save_file

    project = copy_project(world, tmp_path / "labels")
    task = TINY["tasks"][-1]
    shard = shard_of(project, task)
    table = pq.read_table(shard)
    labels = table.column("label").to_numpy().copy()
    labels[0] = 99
    rewrite(shard, table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels)))
    heads = load_file(str(project / "models" / "heads.safetensors"))
    heads[TINY["tasks"][0]] = heads[TINY["tasks"][0]][:-1].contiguous()
    (project / "models" / "heads.safetensors").unlink()
    save_file(heads, str(project / "models" / "heads.safetensors"))

    done = cli(project, "doctor")
    assert done.returncode == 1
    assert f"{task}: labels in {shard.name} span {np.min(labels)}..99" in done.stderr
    assert f"{TINY['tasks'][0]}: head of shape" in done.stderr and "repsurgery heads" in done.stderr


def test_before_the_quick_stages_doctor_says_what_to_run_first(tmp_path):
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    done = cli(tmp_path, "doctor")
    assert done.returncode == 1
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("PROBLEM")]
    assert "not built yet" in line and "`dvc repro heads`" in line
