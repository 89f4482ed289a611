"""Extraction's preprocessing in two halves: with PIL exactly open_clip's transform; with
torchvision's decoders within one or two levels of 255 of it, for photos and PNGs alike."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.benchmarks.photos import photo
from pipeline.data import datasets
from pipeline.data.importing import import_splits
from pipeline.data.preprocess import Preprocess
from pipeline.errors import PipelineError
from pipeline.models import clip

SPEC = {"preprocess": {"image_size": 64}}  # open_clip's defaults otherwise: bicubic, shortest side, centre crop
CPU = torch.device("cpu")
# torchvision's libjpeg-turbo and uint8 antialiased resize against PIL's: measured at most 2 levels of 255
# on generated photos (`repsurgery bench-decode`), and the mean far below one level
MAX_LEVELS, MEAN_LEVELS = 2, 0.02


def png(rng: np.random.Generator, mode: str) -> bytes:
    shape = (37, 29) if mode == "L" else (37, 29, 3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A task whose test split holds photo-sized JPEGs, RGB and grayscale PNGs (as MNIST's)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    folder = root / "jpeg" / "test" / "thing"
    folder.mkdir(parents=True)
    for i in range(6):
        (folder / f"{i}.jpg").write_bytes(photo(rng, (300 + 17 * i, 200 + 11 * i)))
    for i, mode in enumerate(["RGB", "L"]):
        (folder / f"p{i}.png").write_bytes(png(rng, mode))
    import_splits(root / "jpeg", ["test"], root / "data" / "task", "task", ["thing"], ["a {}."], origin="generated")
    return root / "data"


def batch(data, preprocess: Preprocess) -> torch.Tensor:
    dataset = datasets.ImageDataset(data, "task", "test", preprocess)
    return preprocess.finish(preprocess.collate([dataset[i] for i in range(len(dataset))]), CPU)


def test_pil_halves_give_open_clips_transform_bit_for_bit(data):
    whole = datasets.ImageDataset(data, "task", "test", clip.preprocess_for(SPEC))
    want = torch.stack([whole[i] for i in range(len(whole))])
    assert torch.equal(batch(data, Preprocess.of(SPEC, "pil")), want)


@pytest.mark.parametrize("decode", ["torchvision", "device"])
def test_torchvision_decoders_stay_within_two_levels_of_pil(data, decode):
    pil, other = Preprocess.of(SPEC, "pil"), Preprocess.of(SPEC, decode)
    want = pil.pixels(pil.collate([datasets.ImageDataset(data, "task", "test", pil)[i] for i in range(8)]), CPU)
    got = other.pixels(other.collate([datasets.ImageDataset(data, "task", "test", other)[i] for i in range(8)]), CPU)
    levels = (got.int() - want.int()).abs()
    assert got.dtype == torch.uint8 and got.shape == want.shape
    assert levels.max() <= MAX_LEVELS and levels.float().mean() <= MEAN_LEVELS
    # and after scaling and normalising, the same arithmetic as PIL's path
    std = torch.tensor(clip.OPENAI_STD).view(1, 3, 1, 1)
    assert ((batch(data, other) - batch(data, pil)).abs() * std * 255).max() <= MAX_LEVELS + 1e-3


def test_a_preprocessing_torchvision_cannot_run_is_refused_in_one_line():
    longest = {"preprocess": {"image_size": 64, "resize_mode": "longest"}}  # open_clip's PIL-only ResizeKeepRatio
    with pytest.raises(PipelineError, match="extract.decode: torchvision cannot run this model's preprocessing"):
        Preprocess.of(longest, "torchvision")
    Preprocess.of(longest, "pil")  # the reference's path takes it


@pytest.mark.parametrize("decode", ["pil", "torchvision"])
def test_a_broken_image_is_named_by_its_row_whichever_decodes(data, decode, tmp_path):
    dataset = datasets.ImageDataset(data, "task", "test", Preprocess.of(SPEC, decode))
    dataset.images[3] = dataset.images[3][:40]  # truncated
    with pytest.raises(PipelineError, match="cannot decode image .* at row 3 of"):
        dataset[3]


def test_large_splits_are_decoded_by_every_core_but_the_main_processs(monkeypatch):
    monkeypatch.setattr(datasets, "cores", lambda: 16)
    assert datasets.loader_workers(26_032) == 15
    assert datasets.loader_workers(1_000) == 0  # starting workers would cost more than they save
    monkeypatch.setattr(datasets, "cores", lambda: 1)
    assert datasets.loader_workers(26_032) == 0
