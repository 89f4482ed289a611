"""Stages that build the miniature offline world: data, a pretrained CLIP, fine-tuned encoders."""
from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch
from PIL import Image

from cache.files import write_text
from pipeline import workspace
from pipeline.config import Params
from pipeline.models import clip
from pipeline.models.checkpoints import load_heads, save_state
from pipeline.world import images as world_images, shipped
from stages.common import progress


def build_data(params: Params) -> None:
    """Each task drawn in its own process (each has its own seeded generator: the same bytes)."""
    world = params.world
    settings = dict(n_train=world.n_train, n_test=world.n_test, size=world.image_size, seed=world.seed,
                    noise=world.noise, clutter=world.clutter)
    workers = max(1, min(len(params.tasks), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(world_images.write_task, workspace.DATA, task, **settings) for task in params.tasks]
        for job in progress(as_completed(jobs), total=len(jobs), desc="world data", unit="task"):
            job.result()
    print(f"wrote {len(params.tasks)} tasks under {workspace.DATA}/")


def build_pretrained(params: Params, device: torch.device, from_scratch: bool = False) -> None:
    if not from_scratch and shipped.install("pretrained", params):
        return
    from pipeline.world.pretrain import Captions, build_tokenizer, model_config, pretrain  # imports open_clip

    world, cfg = params.world, params.pretrain
    share = lambda shares, task: shares.get(task, shares["default"])  # noqa: E731
    captions = [Captions(t, world_images.classnames(t), world_images.templates(t), *world_images.aliases(t),
                         named=share(cfg.named, t), alias=share(cfg.alias, t)) for t in params.tasks]
    tokenizer = build_tokenizer(captions, params.model.text.context_length)
    spec = {
        "model_cfg": model_config(params.model.model_dump(), world.image_size, len(tokenizer.vocab)),
        "tokenizer": tokenizer.to_config(),
        "preprocess": {"image_size": world.image_size, "mean": list(clip.OPENAI_MEAN), "std": list(clip.OPENAI_STD)},
    }
    torch.manual_seed(world.seed)
    model = clip.build_clip(spec)
    loaded = [pretraining_images(t, spec, world, share(cfg.in_domain, t))
              for t in progress(params.tasks, desc="draw pretraining images", unit="task")]
    pictures, labels, in_domain = map(list, zip(*loaded))
    curve = pretrain(
        model, tokenizer, pictures, labels, in_domain, captions, steps=cfg.steps,
        batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=world.seed,
        device=device, progress=lambda it: progress(it, desc="pretrain CLIP", unit="step"),
    )
    save_state(workspace.pretrained_clip(), model.state_dict())
    write_text(workspace.PRETRAINED / "clip.json", json.dumps(spec, indent=1) + "\n")
    workspace.write_json(workspace.PRETRAINED / "pretrain_loss.json",
                         {"first": curve[0], "last": sum(curve[-20:]) / len(curve[-20:])})
    print(f"pretrained CLIP written to {workspace.PRETRAINED}/ (loss {curve[0]:.3f} -> {curve[-1]:.3f})")


def pretraining_images(task: str, spec: dict, world, in_domain: float) -> tuple[torch.Tensor, ...]:
    """The pretraining images of a task (as the web shows them), preprocessed as the benchmark's
    are, their labels and which are in the benchmark's domain."""
    pictures, labels, looks = world_images.web_images(task, world.n_train, in_domain=in_domain,
                                                      size=world.image_size, seed=world.seed, noise=world.noise,
                                                      clutter=world.clutter)
    preprocess = clip.preprocess_for(spec)
    return (torch.stack([preprocess(Image.fromarray(p)) for p in pictures]), torch.as_tensor(labels),
            torch.as_tensor(looks))


def build_finetuned(params: Params, device: torch.device, from_scratch: bool = False) -> None:
    if not from_scratch and shipped.install("finetuned", params):
        return
    from pipeline.world.finetune import finetune, train_images  # imports open_clip

    cfg = params.finetune
    model, spec = clip.load_clip(workspace.PRETRAINED)
    heads = load_heads(workspace.HEADS, params.tasks)
    for i, task in enumerate(params.tasks):
        x, y = train_images(workspace.DATA, task, spec)
        state = finetune(model.visual, heads[task], x, y, steps=cfg.steps, batch_size=cfg.batch_size,
                         lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup,
                         seed=params.world.seed + i, device=device,
                         progress=lambda it: progress(it, desc=f"fine-tune {task}", unit="step"))
        fp = save_state(workspace.finetuned_checkpoint(task), state, task=task)
        print(f"fine-tuned {task}: {workspace.finetuned_checkpoint(task)} (fingerprint {fp})")

