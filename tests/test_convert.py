"""`repsurgery convert`: every supported checkpoint format becomes the same canonical encoder."""
from __future__ import annotations

import pickle
import sys
import types

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from pipeline.models.checkpoints import read_metadata, save_state
from pipeline.models.convert import to_canonical
from pipeline.errors import PipelineError

# A small ViT whose open_clip and transformers forms must agree exactly.
WIDTH, LAYERS, HEADS, PATCH, SIZE, EMBED = 32, 2, 2, 8, 32, 16


def tiny_open_clip() -> open_clip.CLIP:
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=EMBED, quick_gelu=True,
        vision_cfg={"image_size": SIZE, "patch_size": PATCH, "width": WIDTH, "layers": LAYERS,
                    "head_width": WIDTH // HEADS, "mlp_ratio": 4.0},
        text_cfg={"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    ).eval()


@pytest.fixture(scope="module")
def reference() -> dict:
    return {k: v.clone() for k, v in tiny_open_clip().visual.state_dict().items()}


def perturbed(state: dict, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def encode(state: dict, images: torch.Tensor) -> torch.Tensor:
    visual = tiny_open_clip().visual
    visual.load_state_dict(state)
    with torch.no_grad():
        return visual(images)


def hf_vision_model(with_projection: bool):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(
        hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        image_size=SIZE, patch_size=PATCH, projection_dim=EMBED, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    torch.manual_seed(3)
    cls = transformers.CLIPVisionModelWithProjection if with_projection else transformers.CLIPVisionModel
    model = cls(config).eval()
    with torch.no_grad():  # random init leaves some tensors at 0/1: make every one matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("whole_model", [True, False])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_open_clip_state_dicts_convert_losslessly(tmp_path, reference, whole_model, suffix):
    state = perturbed(reference)
    keys = {f"visual.{k}" if whole_model else k: v for k, v in state.items()}
    if whole_model:
        keys["logit_scale"] = torch.tensor(4.6)
    src = tmp_path / f"ckpt{suffix}"
    save_file(keys, str(src)) if suffix == ".safetensors" else torch.save({"state_dict": keys}, src)
    converted, kind = to_canonical(src, reference)
    assert kind in ("safetensors", "torch")
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[k], state[k]) for k in state)


def test_hf_vision_model_with_projection_gives_the_same_embeddings(tmp_path, reference):
    model = hf_vision_model(with_projection=True)
    model.save_pretrained(tmp_path / "hf")
    converted, kind = to_canonical(tmp_path / "hf", reference)
    assert kind == "hf"
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model(pixel_values=images).image_embeds
    torch.testing.assert_close(encode(converted, images), expected, atol=1e-5, rtol=1e-4)


def test_hf_vision_model_without_projection_takes_the_base_projection(tmp_path, reference):
    model = hf_vision_model(with_projection=False)
    model.save_pretrained(tmp_path / "hf")
    converted, _ = to_canonical(tmp_path / "hf", reference)
    assert torch.equal(converted["proj"], reference["proj"])
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        pooled = model(pixel_values=images).pooler_output  # post_layernorm(CLS)
    torch.testing.assert_close(encode(converted, images), pooled @ reference["proj"], atol=1e-5, rtol=1e-4)


def task_arithmetic_pickle(path, visual_state: dict, sentinel, plain: bool = False) -> None:
    """A pickle shaped like the Task Arithmetic release: `src.modeling.ImageEncoder` holding an
    open_clip CLIP (text tower deleted) and torchvision transforms. Importing `src` would
    write `sentinel`, so the test can tell whether loading ran code from the package. `plain`:
    written by `pickle.dump` (protocol 2) instead of torch.save, as some of that release's files
    are: each storage then pickles as `torch.storage._load_from_bytes(<bytes>)`."""
    import torchvision.transforms as T

    src_pkg, modeling = types.ModuleType("src"), types.ModuleType("src.modeling")

    class ImageEncoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.cache_dir = model, "/nonexistent"
            self.val_preprocess = T.Compose([T.Resize(SIZE, interpolation=T.InterpolationMode.BICUBIC),
                                             T.CenterCrop(SIZE), T.ToTensor()])

        def __setstate__(self, state):  # would run on a normal unpickle
            sentinel.write_text("code ran")
            super().__setstate__(state)

    ImageEncoder.__module__, ImageEncoder.__qualname__ = "src.modeling", "ImageEncoder"
    modeling.ImageEncoder, src_pkg.modeling = ImageEncoder, modeling
    sys.modules.update({"src": src_pkg, "src.modeling": modeling})
    try:
        clip = tiny_open_clip()
        clip.visual.load_state_dict(visual_state)
        del clip.transformer
        if plain:
            with open(path, "wb") as f:
                pickle.dump(ImageEncoder(clip), f, protocol=2)
        else:
            torch.save(ImageEncoder(clip), path)
    finally:
        del sys.modules["src"], sys.modules["src.modeling"]


@pytest.mark.parametrize("plain", [False, True], ids=["torch.save", "plain pickle with _load_from_bytes"])
def test_task_arithmetic_pickles_are_read_without_running_their_code(tmp_path, reference, plain):
    state, sentinel = perturbed(reference, seed=5), tmp_path / "sentinel"
    task_arithmetic_pickle(tmp_path / "finetuned.pt", state, sentinel, plain=plain)
    if plain:
        assert b"_load_from_bytes" in (tmp_path / "finetuned.pt").read_bytes()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "finetuned.pt", weights_only=True)  # really needs more than weights_only
    converted, kind = to_canonical(tmp_path / "finetuned.pt", reference)
    assert kind == "pickled-module"
    assert all(torch.equal(converted[k], state[k]) for k in reference)
    assert not sentinel.exists()


def test_a_malicious_pickle_runs_nothing(tmp_path, reference):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    torch.save({"model": Evil(), "visual.conv1.weight": reference["conv1.weight"]}, tmp_path / "evil.pt")
    with pytest.raises(PipelineError):
        to_canonical(tmp_path / "evil.pt", reference)  # only one tensor: does not fit the architecture
    assert not marker.exists()


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path, reference):
    state = dict(reference)
    state["proj"] = torch.zeros(WIDTH, EMBED * 2)
    save_file(state, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(PipelineError, match=r"'proj'.*\(32, 32\).*\(32, 16\)"):
        to_canonical(tmp_path / "wrong.safetensors", reference)


def test_unrecognised_checkpoints_are_refused_clearly(tmp_path, reference):
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(PipelineError, match="not an open_clip or Hugging Face CLIP image encoder"):
        to_canonical(tmp_path / "other.safetensors", reference)
    (tmp_path / "folder").mkdir()
    with pytest.raises(PipelineError, match="not a Hugging Face model folder"):
        to_canonical(tmp_path / "folder", reference)


def test_canonical_files_carry_their_fingerprint(tmp_path, reference):
    fp = save_state(tmp_path / "c.safetensors", reference, source="x")
    assert read_metadata(tmp_path / "c.safetensors")["fingerprint"] == fp
