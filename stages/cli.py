"""`repsurgery`: one command per pipeline stage (dvc.yaml calls exactly these)."""
from __future__ import annotations

import os
import sys
from functools import wraps
from pathlib import Path

import typer

from pipeline.config import LOSSES, Surgery
from stages.listing import LISTINGS

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown")  # a docstring's paragraphs reflowed whole, never cut

ParamsOpt = typer.Option(Path("params.yaml"), "--params", help="params file (paths are relative to the cwd)")
DeviceOpt = typer.Option(None, "--device", help="auto (default: CUDA if present), cpu, cuda, cuda:N; "
                                              "or set REPSURGERY_DEVICE")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"repsurgery {version('repsurgery')}")
        except PackageNotFoundError:  # a source checkout run without installing: pyproject.toml says
            import tomllib

            project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
            typer.echo(f"repsurgery {project['version']} (source checkout, not installed)")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit."),
         debug: bool = typer.Option(False, "--debug", help="Full tracebacks instead of one line per error "
                                    "(also: REPSURGERY_DEBUG=1).")):
    """Representation Surgery for merged CLIP image encoders: run any pipeline stage."""
    if debug:
        from pipeline.errors import DEBUG_ENV

        os.environ[DEBUG_ENV] = "1"


def _stage(fn):
    """Turn known user errors into one clear line on stderr and exit code 1."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        # torch's thread count (one per core), read when torch loads: commands that need no torch
        # (list, preset, plots) do not pay for importing it.
        os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            from pipeline.errors import debugging

            if not isinstance(exc, _user_errors()) or debugging():
                raise
            typer.secho(f"error: {_original_message(exc)}", fg=typer.colors.RED, err=True)
            sys.exit(1)

    return wrapper


def _user_errors() -> tuple[type[Exception], ...]:
    """PipelineError, WriteError, and StoreError once the store module is loaded (only then can
    one be raised)."""
    from cache.files import WriteError
    from pipeline.errors import PipelineError

    store = sys.modules.get("cache.store")
    return (PipelineError, WriteError, store.StoreError) if store else (PipelineError, WriteError)


def _original_message(exc: Exception) -> str:
    """An error raised in a DataLoader worker arrives wrapped in that worker's traceback: keep its own line."""
    text = str(exc)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


def _params(path: Path):
    """The typed params, validated once: any mistake is one line naming the key and the file."""
    from pipeline import config

    return config.load(path)


def _ctx(params: Path, device: str | None = None):
    from pipeline.devices import pick_device

    return _params(params), pick_device(device)


@app.command("check")
@_stage
def check(params: Path = ParamsOpt):
    """The first stage: validate every section of params, check that every model and dataset params
    `source` names is available locally (before `dvc repro` replaces anything) -> results/sources.json,
    and fingerprint each merge entry's code -> results/fingerprints/."""
    from stages.check import check as run

    run(_params(params))


@app.command("prepare-data")
@_stage
def prepare_data(params: Path = ParamsOpt):
    """Test splits under data/: generate the miniature world, or import the real datasets."""
    from stages.prepare import prepare_data as run

    run(_params(params))


@app.command("prepare-pretrained")
@_stage
def prepare_pretrained(params: Path = ParamsOpt, device: str = DeviceOpt):
    """The pretrained CLIP -> models/pretrained/: pretrain the miniature one, or import open_clip weights."""
    from stages.prepare import prepare_pretrained as run

    run(*_ctx(params, device))


@app.command()
@_stage
def heads(params: Path = ParamsOpt, device: str = DeviceOpt):
    """Zero-shot heads from the pretrained text tower -> models/heads.safetensors."""
    from stages.heads import build_heads

    build_heads(*_ctx(params, device))


@app.command("prepare-finetuned")
@_stage
def prepare_finetuned(params: Path = ParamsOpt, device: str = DeviceOpt):
    """One encoder per task -> models/finetuned/: fine-tune (miniature world) or convert the real ones."""
    from stages.prepare import prepare_finetuned as run

    run(*_ctx(params, device))


@app.command()
@_stage
def fetch(params: Path = ParamsOpt):
    """Download what params `source` names on the Hugging Face Hub into its cache (resumable)."""
    from stages.prepare import fetch as run

    run(_params(params))


@app.command()
@_stage
def convert(src: Path = typer.Argument(..., help="checkpoint file or Hugging Face model folder"),
            dst: Path = typer.Argument(..., help="output .safetensors"),
            like: Path = typer.Option(Path("models/pretrained"), help="pretrained model folder that fixes the "
                                      "architecture and lends its projection to vision towers without one")):
    """Convert a fine-tuned checkpoint (open_clip, transformers, Task Arithmetic pickle) to the canonical form."""
    from stages.prepare import convert as run

    run(src, dst, like)


@app.command()
@_stage
def preset(name: str = typer.Argument(..., help="world | world-full | paper-vit-b-32 | paper-vit-b-16 | paper-vit-l-14 "
                                                 "(FusionBench's Hub fine-tunes) | paper-ta-vit-b-32 | paper-ta-vit-b-16 | "
                                                 "paper-ta-vit-l-14 (the Task Arithmetic release, local) | text-world | "
                                                 "paper-bert (the NLP experiment, BERT: docs/text.md)"),
           checkpoints: str = typer.Option(None, "--checkpoints", help="paper-ta-*: the release's folder for this "
                                           "architecture, holding <Dataset>/finetuned.pt (default checkpoints/ViT-B-32 "
                                           "etc., from the project root)"),
           params: Path = ParamsOpt):
    """Write a params preset to params.yaml (the miniature world, or the paper's setting)."""
    from stages.presets import write_preset

    write_preset(name, params, checkpoints)


@app.command()
@_stage
def merge(key: str = typer.Argument(..., help="an entry of params `merge` (see `repsurgery list methods`)"),
          params: Path = ParamsOpt, device: str = DeviceOpt):
    """Run one merge entry (training-free, or learned like AdaMerging) -> models/merged/KEY.safetensors + .json"""
    from stages.merge import merge as run

    run(key, *_ctx(params, device))


@app.command("list")
@_stage
def list_(what: str = typer.Argument("all", help=f"{' | '.join(LISTINGS)} | all"), params: Path = ParamsOpt):
    """What there is to choose from: registered merge methods, the surgery adapter and its losses,
    the tasks, and the effective params (every default filled in, as the stages read them)."""
    if what != "all" and what not in LISTINGS:
        from pipeline.errors import PipelineError

        raise PipelineError(f"nothing to list as {what!r}: choose one of {', '.join(LISTINGS)}, all")
    for name in LISTINGS if what == "all" else [what]:
        if what == "all":
            typer.secho(f"# {name}", bold=True)
        typer.echo(LISTINGS[name](params))


@app.command()
@_stage
def extract(encoders: list[str] = typer.Argument(None, help="pretrained, individual and/or merge entries "
                                                             "(default: all of them)"),
            params: Path = ParamsOpt, device: str = DeviceOpt,
            scheduler: str = typer.Option(None, "--scheduler", help="address of a running Dask scheduler "
                                          "(tcp://host:8786): its workers extract, this process finalises"),
            workers: int = typer.Option(None, "--workers", min=1, help="start a local Dask cluster of N worker "
                                        "processes (one per GPU)")):
    """Features of every encoder on every task, each image decoded once -> features/ENCODER/."""
    from stages.extract import extract_features

    extract_features(*_ctx(params, device), encoders or None, scheduler=scheduler, workers=workers)


@app.command(help="Train the per-task surgery adapters on cached features -> models/surgery/KEY.* (up-to-date "
                  f"ones kept).\n\nSettings: params `surgery`: {', '.join(Surgery.model_fields)}; `loss` is one of "
                  f"{', '.join(LOSSES)}. The adapter: `repsurgery list adapters`.")
@_stage
def surgery(keys: list[str] = typer.Argument(None, help="entries of params `merge` (default: all of them; "
                                              "`repsurgery list params` shows them)"),
            params: Path = ParamsOpt, device: str = DeviceOpt):
    from stages.surgery import run_surgery

    run_surgery(*_ctx(params, device), keys or None)


@app.command()
@_stage
def doctor(params: Path = ParamsOpt, device: str = DeviceOpt):
    """Check everything a long run needs (files, splits, labels, heads, encoders, disk, workers): one line per
    problem, with its fix."""
    from stages.doctor import run_doctor as run

    run(*_ctx(params, device))


@app.command()
@_stage
def verify(encoders: list[str] = typer.Argument(None, help="pretrained, individual and/or merge entries "
                                                            "(default: every store, Traditional MTL's included)"),
           params: Path = ParamsOpt):
    """Reread every feature store against the checksum taken when it was written (the deep check)."""
    from stages.verify import verify as run

    run(_params(params), encoders or None)


@app.command()
@_stage
def evaluate(params: Path = ParamsOpt):
    """Accuracy with/without surgery and bias (Eq. 1) from cached features -> results/metrics.json."""
    from stages.evaluate import evaluate as run

    run(_params(params))


@app.command()
@_stage
def bench(params: Path = ParamsOpt, device: str = DeviceOpt,
          method: str = typer.Option("ties_merging", help="the merged encoder surgery is timed on"),
          steps: int = typer.Option(100, min=1, help="surgery steps of the live run, the cached run and each rank "
                                    "of the sweep (the same on both sides)"),
          stage_steps: int = typer.Option(None, min=1, help="steps of the batched vs sequential surgery "
                                          "comparison (default: params surgery.steps)"),
          rows: int = typer.Option(256, min=1, help="images per task for the extraction figures"),
          adamerging_steps: int = typer.Option(2, min=1, help="timed AdaMerging steps per variant"),
          quick: bool = typer.Option(False, "--quick", help="a few steps of everything (a smoke test)"),
          out: Path = typer.Option(Path("results/bench.json"), "--out", help="where the figures go")):
    """Time surgery, rank sweeps, extraction and AdaMerging against their alternatives -> results/bench.json."""
    from stages.bench import run_bench

    run_bench(*_ctx(params, device), method=method, steps=steps, stage_steps=stage_steps, rows=rows,
              adamerging_steps=adamerging_steps, quick=quick, out=out)


@app.command("bench-merges")
@_stage
def bench_merges(keys: list[str] = typer.Argument(None, help="merge entries (default: every entry)"),
                 params: Path = ParamsOpt, device: str = DeviceOpt,
                 tasks: list[int] = typer.Option([2, 4, 8], "--tasks", help="numbers of tasks merged (the first n "
                                                 "of params `tasks`)"),
                 steps: int = typer.Option(10, min=1, help="learned schedules cut to this many steps"),
                 out: Path = typer.Option(Path("results/bench-merges.json"), "--out", help="where the figures go")):
    """Wall time and peak memory of merge entries against the number of tasks -> results/bench-merges.json."""
    from stages.bench import bench_merges as run

    run(*_ctx(params, device), params, keys or [], tasks, steps, out)


@app.command("bench-real-size")
@_stage
def bench_real_size(device: str = DeviceOpt,
                    archs: list[str] = typer.Option(None, "--archs", help="open_clip architectures, randomly "
                                                    "initialised, nothing downloaded (default: ViT-B-32-quickgelu "
                                                    "and ViT-L-14-quickgelu)"),
                    images: int = typer.Option(64, min=1, help="generated 500x375 JPEGs, decoded and encoded"),
                    workers: int = typer.Option(None, min=0, help="decode workers (default: those the extract "
                                                "stage gives a split of real size)"),
                    batch_size: int = typer.Option(32, min=1, help="extraction batch size"),
                    repeats: int = typer.Option(2, min=1, help="runs of decode, forward and extraction, in turn; "
                                                "the fastest of each counts"),
                    tasks: int = typer.Option(3, min=1, help="AdaMerging tasks (random task vectors)"),
                    images_per_task: int = typer.Option(2, min=1, help="AdaMerging images per task and step"),
                    adamerging_steps: int = typer.Option(1, min=1, help="timed AdaMerging steps per variant"),
                    autocast: str = typer.Option("none", help="none | bf16 | fp16 (GPU extraction)"),
                    decode: str = typer.Option("pil", help="pil | torchvision | device (params extract.decode)"),
                    quick: bool = typer.Option(False, "--quick", help="a few images, two tasks of one image "
                                               "(a smoke test)"),
                    out: Path = typer.Option(None, "--out", help="where the figures go (default: "
                                             "results/bench-realsize.json)")):
    """Extraction against decode alone and the bare forward, and AdaMerging's step time and memory, at
    ViT-B/32 and ViT-L/14 sizes -> results/bench-realsize.json."""
    from pipeline.devices import pick_device
    from stages.bench import bench_real_size as run

    run(pick_device(device), archs or None, images=images, workers=workers, batch_size=batch_size,
        repeats=repeats, tasks=tasks, images_per_task=images_per_task, steps=adamerging_steps, autocast=autocast,
        decode=decode, quick=quick, out=out)


@app.command("bench-table1")
@_stage
def bench_table1(device: str = DeviceOpt,
                 arch: str = typer.Option("ViT-B-32-quickgelu", help="open_clip architecture, randomly initialised, "
                                          "nothing downloaded"),
                 scale: float = typer.Option(0.01, help="share of the real test-split sizes generated (e.g. 0.01 on "
                                             "a CPU, 0.1 on a GPU); projections are to 1"),
                 autocast: str = typer.Option("none", help="none | bf16 | fp16 (GPU extraction)"),
                 quick: bool = typer.Option(False, "--quick", help="2 images per task and split, 1 measured step "
                                            "per learned merge (a smoke test)"),
                 out: Path = typer.Option(None, "--out", help="where the figures go (default: "
                                          "results/bench-table1.json)")):
    """A dry run of the paper preset's Table 1 with surgery (every merge entry, extract, surgery, evaluate) on a
    random tower at real size and generated JPEGs: measured, and projected to the real split sizes."""
    from pipeline.devices import pick_device
    from stages.bench import bench_table1 as run

    run(pick_device(device), arch, scale=scale, autocast=autocast, quick=quick, out=out)


@app.command("bench-decode")
@_stage
def bench_decode(device: str = DeviceOpt,
                 arch: str = typer.Option("ViT-B-32-quickgelu", help="open_clip architecture whose preprocessing runs"),
                 images: int = typer.Option(None, min=1, help="generated 500x375 JPEGs (default: 4 batches per "
                                            "worker of the largest count)"),
                 batch_size: int = typer.Option(256, min=1, help="loader batch size (the extract stage's default)"),
                 workers: list[int] = typer.Option(None, "--workers", min=0, help="worker counts to time, repeatable "
                                                   "(default: 1, 2, 4, ... up to the cores, and cores - 1)"),
                 decode: list[str] = typer.Option(None, "--decode", help="decoders to time, repeatable: pil, "
                                                  "torchvision, device (default: pil, torchvision, and device on a GPU)"),
                 repeats: int = typer.Option(2, min=1, help="runs per setting; the fastest counts"),
                 quick: bool = typer.Option(False, "--quick", help="64 images, 0 and 1 workers (a smoke test)"),
                 accuracy: bool = typer.Option(False, "--accuracy", help="also each decoder's accuracy on the "
                                               "workspace's test images as JPEGs at twice their size"),
                 params: Path = ParamsOpt,
                 out: Path = typer.Option(None, "--out", help="where the figures go (default: results/bench-decode.json)")):
    """Decoding's images/s against loader workers, per decoder, and each decoder's pixels against PIL's
    -> results/bench-decode.json."""
    from pipeline.devices import pick_device
    from stages.bench import bench_decode as run

    tasks = _params(params).tasks if accuracy else None
    run(pick_device(device), arch, images=images, batch_size=batch_size, workers=workers or None,
        decode=decode or None, repeats=repeats, quick=quick, accuracy=tasks, out=out)


@app.command("build-world")
@_stage
def build_world(params: Path = ParamsOpt, device: str = DeviceOpt):
    """Miniature world: data and every encoder from scratch (pretrained, fine-tuned, MTL), shipped
    -> pipeline/assets/world/, which `dvc repro` then uses instead of training them again."""
    from stages.build_world import build_world as run

    run(*_ctx(params, device))


@app.command()
@_stage
def mtl(params: Path = ParamsOpt, device: str = DeviceOpt):
    """Miniature world: Traditional MTL, one encoder trained on all tasks -> models/mtl/, features/mtl/."""
    from stages.mtl import build_mtl

    build_mtl(*_ctx(params, device))


@app.command()
@_stage
def plots(params: Path = ParamsOpt):
    """Regenerate the `plots:` section of dvc.yaml for the merge entries in params (`dvc plots show`)."""
    from stages.plots import write_plots

    write_plots(_params(params))


@app.command()
@_stage
def analyze(name: str = typer.Argument(..., help="baselines | rank | loss | data-ratio | online | curve | bias | "
                                                 "tsne | all"),
            params: Path = ParamsOpt, device: str = DeviceOpt,
            force: bool = typer.Option(False, "--force", help="with `all`: recompute analyses whose inputs are "
                                       "unchanged too (a single NAME is always recomputed)")):
    """The paper's analyses on cached features -> results/analyses/NAME/ (table.csv, table.md,
    plot.csv, figure.png/.svg). `all` (the DVC stage) keeps the analyses whose inputs are unchanged."""
    from stages.analyses import analyze as run

    run(name, *_ctx(params, device), force=force)


if __name__ == "__main__":
    app()
