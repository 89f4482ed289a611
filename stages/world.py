"""Stages that build the miniature offline world: data, a pretrained CLIP, fine-tuned encoders."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from pipeline import clip_model, data
from pipeline.checkpoints import save_state
from pipeline.errors import PipelineError
from pipeline.world import images as world_images
from pipeline.world.finetune import finetune
from pipeline.world.pretrain import Captions, build_tokenizer, model_config, pretrain
from stages.common import DATA, HEADS, PRETRAINED, finetuned_path, progress, tasks, write_json


def build_data(params: dict) -> None:
    world = params["world"]
    unknown = [t for t in params["tasks"] if t not in world_images.TASK_NAMES]
    if unknown:
        raise PipelineError(f"unknown task(s) {unknown} in params `tasks`: the miniature world has "
                            f"{', '.join(world_images.TASK_NAMES)}")
    for task in progress(params["tasks"], desc="world data", unit="task"):
        world_images.write_task(DATA, task, n_train=world["n_train"], n_test=world["n_test"],
                                size=world["image_size"], seed=world["seed"],
                                noise=world["noise"], clutter=world["clutter"])
    print(f"wrote {len(params['tasks'])} tasks under {DATA}/")


def train_images(task: str, spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = data.ImageDataset(DATA, task, "train", clip_model.preprocess_for(spec))
    return torch.cat(list(data.loader(dataset, 1024))), torch.as_tensor(dataset.labels)


def build_pretrained(params: dict, device: torch.device) -> None:
    world, cfg = params["world"], params["pretrain"]
    names = tasks(params)
    share = lambda key, task: cfg[key].get(task, cfg[key]["default"])  # noqa: E731
    captions = [Captions(t, world_images.classnames(t), world_images.templates(t), *world_images.aliases(t),
                         named=share("named", t), alias=share("alias", t)) for t in names]
    tokenizer = build_tokenizer(captions, params["model"]["text"]["context_length"])
    spec = {
        "model_cfg": model_config(params["model"], world["image_size"], len(tokenizer.vocab)),
        "tokenizer": tokenizer.to_config(),
        "preprocess": {"image_size": world["image_size"], "mean": list(clip_model.OPENAI_MEAN),
                       "std": list(clip_model.OPENAI_STD)},
    }
    torch.manual_seed(world["seed"])
    model = clip_model.build_clip(spec)
    loaded = [train_images(t, spec) for t in progress(names, desc="decode train images", unit="task")]
    curve = pretrain(
        model, tokenizer, [x for x, _ in loaded], [y for _, y in loaded], captions, steps=cfg["steps"],
        batch_size=cfg["batch_size"], lr=cfg["lr"], weight_decay=cfg["weight_decay"], seed=world["seed"],
        device=device, progress=lambda it: progress(it, desc="pretrain CLIP", unit="step"),
    )
    PRETRAINED.mkdir(parents=True, exist_ok=True)
    save_state(PRETRAINED / "clip.safetensors", model.state_dict())
    (PRETRAINED / "clip.json").write_text(json.dumps(spec, indent=1) + "\n")
    write_json(PRETRAINED / "pretrain_loss.json", {"first": curve[0], "last": sum(curve[-20:]) / len(curve[-20:])})
    print(f"pretrained CLIP written to {PRETRAINED}/ (loss {curve[0]:.3f} -> {curve[-1]:.3f})")


def build_finetuned(params: dict, device: torch.device) -> None:
    cfg = params["finetune"]
    model, spec = clip_model.load_clip(PRETRAINED)
    heads = load_file(str(HEADS))
    for i, task in enumerate(tasks(params)):
        x, y = train_images(task, spec)
        state = finetune(model.visual, heads[task], x, y, steps=cfg["steps"], batch_size=cfg["batch_size"],
                         lr=cfg["lr"], weight_decay=cfg["weight_decay"], warmup=cfg["warmup"],
                         seed=params["world"]["seed"] + i, device=device,
                         progress=lambda it: progress(it, desc=f"fine-tune {task}", unit="step"))
        fp = save_state(finetuned_path(task), state, task=task)
        print(f"fine-tuned {task}: {finetuned_path(task)} (fingerprint {fp})")
