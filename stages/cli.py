"""`repsurgery`: one command per pipeline stage (dvc.yaml calls exactly these)."""
from __future__ import annotations

import sys
from functools import wraps
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Representation Surgery for merged CLIP image encoders: run any pipeline stage.")

ParamsOpt = typer.Option(Path("params.yaml"), "--params", help="params file (paths are relative to the cwd)")
DeviceOpt = typer.Option(None, "--device", help="auto (default: CUDA if present), cpu, cuda, cuda:N; "
                                              "or set REPSURGERY_DEVICE")


def _stage(fn):
    """Turn known user errors into one clear line on stderr and exit code 1."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        from cache.store import StoreError
        from pipeline.errors import PipelineError
        from stages.common import set_threads

        set_threads()
        try:
            return fn(*args, **kwargs)
        except (PipelineError, StoreError) as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            sys.exit(1)

    return wrapper


def _ctx(params: Path, device: str | None = None):
    from pipeline.devices import pick_device
    from stages.common import load_params

    return load_params(params), pick_device(device)


@app.command("world-data")
@_stage
def world_data(params: Path = ParamsOpt):
    """Miniature world: generate the tasks' images as Hugging Face parquet shards under data/."""
    from stages.common import load_params
    from stages.world import build_data

    build_data(load_params(params))


@app.command()
@_stage
def pretrain(params: Path = ParamsOpt, device: str = DeviceOpt):
    """Miniature world: pretrain the small CLIP contrastively -> models/pretrained/."""
    from stages.world import build_pretrained

    build_pretrained(*_ctx(params, device))


@app.command()
@_stage
def heads(params: Path = ParamsOpt, device: str = DeviceOpt):
    """Zero-shot heads from the pretrained text tower -> models/heads.safetensors."""
    from stages.heads import build_heads

    build_heads(*_ctx(params, device))


@app.command()
@_stage
def finetune(params: Path = ParamsOpt, device: str = DeviceOpt):
    """Miniature world: fine-tune one image encoder per task, head frozen -> models/finetuned/."""
    from stages.world import build_finetuned

    build_finetuned(*_ctx(params, device))


@app.command()
@_stage
def merge(method: str = typer.Argument(..., help="weight_averaging | task_arithmetic | ties_merging"),
          params: Path = ParamsOpt):
    """Training-free merge of the fine-tuned encoders -> models/merged/METHOD.safetensors."""
    from stages.common import load_params
    from stages.merge import merge as run

    run(method, load_params(params))


@app.command()
@_stage
def adamerge(method: str = typer.Argument(..., help="tw_adamerging | lw_adamerging"),
             params: Path = ParamsOpt, device: str = DeviceOpt):
    """Learn AdaMerging coefficients (entropy on unlabeled test images) -> models/merged/METHOD.*"""
    from stages.merge import adamerge as run

    run(method, *_ctx(params, device))


@app.command("extract-reference")
@_stage
def extract_reference(params: Path = ParamsOpt, device: str = DeviceOpt):
    """Features of the pretrained (all tasks) and individual (own task) encoders -> features/."""
    from stages.extract import extract_reference as run

    run(*_ctx(params, device))


@app.command()
@_stage
def extract(method: str = typer.Argument(..., help="a merge method"), params: Path = ParamsOpt,
            device: str = DeviceOpt):
    """Features of a merged encoder on every task -> features/METHOD/."""
    from stages.extract import extract_merged

    extract_merged(method, *_ctx(params, device))


@app.command()
@_stage
def surgery(method: str = typer.Argument(..., help="a merge method"), params: Path = ParamsOpt,
            device: str = DeviceOpt):
    """Train the per-task surgery adapters on cached features -> models/surgery/METHOD.*"""
    from stages.surgery import run_surgery

    run_surgery(method, *_ctx(params, device))


@app.command()
@_stage
def evaluate(params: Path = ParamsOpt):
    """Accuracy with/without surgery and bias (Eq. 1) from cached features -> results/metrics.json."""
    from stages.common import load_params
    from stages.evaluate import evaluate as run

    run(load_params(params))


@app.command()
@_stage
def mtl(params: Path = ParamsOpt, device: str = DeviceOpt):
    """Miniature world: Traditional MTL, one encoder trained on all tasks -> models/mtl/, features/mtl/."""
    from stages.mtl import build_mtl

    build_mtl(*_ctx(params, device))


@app.command()
@_stage
def analyze(name: str = typer.Argument(..., help="baselines | rank | loss | data-ratio | online | curve | bias | "
                                                 "tsne | all"),
            params: Path = ParamsOpt, device: str = DeviceOpt):
    """One of the paper's analyses on cached features -> results/analyses/NAME/ (table.csv, table.md,
    plot.csv, figure.png/.svg)."""
    from stages.analyses import analyze as run

    run(name, *_ctx(params, device))


if __name__ == "__main__":
    app()
