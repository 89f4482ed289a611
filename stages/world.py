"""Stages that build the miniature offline worlds (image and text): data, a pretrained CLIP or
BERT, fine-tuned encoders (a text task's with its head)."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch
from PIL import Image

from cache.files import write_text
from pipeline import workspace
from pipeline.config import Params
from pipeline.data import datasets
from pipeline.models import bert, clip, encoders
from pipeline.models.checkpoints import save_state
from pipeline.world import images as world_images, shipped, texts as world_texts
from stages.common import progress
from stages.heads import zero_shot_heads


def build_data(params: Params) -> None:
    """Each task drawn in its own process (each has its own seeded generator: the same bytes)."""
    world = params.world
    if params.is_text:  # a quarter of a second per task: no processes needed
        for task in progress(params.tasks, desc="text world data", unit="task"):
            world_texts.write_task(workspace.DATA, task, n_train=world.n_train, n_test=world.n_test, seed=world.seed,
                                   length=world.length, noise=world.noise)
        print(f"wrote {len(params.tasks)} text tasks under {workspace.DATA}/")
        return
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
    if params.is_text:
        return pretrain_bert(params, device)
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
    shutil.rmtree(workspace.PRETRAINED, ignore_errors=True)  # a BERT's spec left there would say "text"
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


def pretrain_bert(params: Params, device: torch.device) -> None:
    """The text world's tiny BERT: a whole-word vocabulary of the world, masked language
    modelling on its unlabeled corpus (pipeline/world/mlm.py)."""
    from pipeline.world import mlm

    world, cfg, size = params.world, params.pretrain, params.model
    folder = workspace.PRETRAINED
    shutil.rmtree(folder, ignore_errors=True)  # a CLIP's spec left there would say the workspace is an image one
    words = world_texts.vocabulary(params.tasks)
    bert.write_vocab(folder, words)
    config = {"vocab_size": len(bert.SPECIAL) + len(words), "hidden_size": size.hidden,
              "num_hidden_layers": size.layers, "num_attention_heads": size.heads,
              "intermediate_size": size.intermediate, "max_position_embeddings": size.max_length}
    spec = bert.write_spec(folder, config, size.max_length)
    torch.manual_seed(world.seed)
    encoder = bert.build_encoder(spec)
    texts = world_texts.corpus(params.tasks, cfg.corpus, seed=world.seed, length=world.length, noise=world.noise)
    curve = mlm.pretrain(encoder, bert.tokenize(folder, texts), steps=cfg.steps, batch_size=cfg.batch_size,
                         lr=cfg.lr, weight_decay=cfg.weight_decay, mask=cfg.mask, seed=world.seed, device=device,
                         progress=lambda it: progress(it, desc="pretrain BERT (masked LM)", unit="step"))
    save_state(folder / bert.WEIGHTS, encoder.state_dict())
    workspace.write_json(folder / "pretrain_loss.json", {"first": curve[0], "last": sum(curve[-20:]) / len(curve[-20:])})
    print(f"pretrained BERT written to {folder}/ (masked-LM loss {curve[0]:.3f} -> {curve[-1]:.3f})")


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
    from pipeline.world.finetune import finetune, initial_head, train_inputs

    cfg = params.finetune
    encoder = encoders.encoder(workspace.PRETRAINED)
    heads = {} if params.is_text else zero_shot_heads(params, device)  # a text task's head is fine-tuned
    for i, task in enumerate(params.tasks):
        x, y = train_inputs(workspace.DATA, task, workspace.PRETRAINED)
        if params.is_text:
            classes = len(datasets.task_info(workspace.DATA, task).classnames)
            heads[task] = initial_head(encoder, x, y, classes, device)
        state, heads[task] = finetune(encoder, heads[task], x, y, steps=cfg.steps, batch_size=cfg.batch_size,
                                      lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup,
                                      seed=params.world.seed + i, device=device, train_head=params.is_text,
                                      progress=lambda it: progress(it, desc=f"fine-tune {task}", unit="step"))
        fp = save_state(workspace.finetuned_checkpoint(task), state, task=task)
        print(f"fine-tuned {task}: {workspace.finetuned_checkpoint(task)} (fingerprint {fp})")
    if params.is_text:
        save_state(workspace.FINETUNED_HEADS, {t: heads[t] for t in params.tasks})
        print(f"their heads (fine-tuned with them) -> {workspace.FINETUNED_HEADS}")
