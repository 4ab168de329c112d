"""`daamkit classify ...`: frozen-encoder feature extraction, DAT decoders, Importance Factor, reports."""

import json
from pathlib import Path
from typing import List, Optional

import typer

from daamkit.cli.app import new_app

app = new_app("Frozen-encoder DAT classifiers: extract, train, evaluate, importance, report.")


# --- train / evaluate / importance / report (library imports are lazy so `--help` stays fast) ---

_DECODER_HELP = "mha | mha-bn | gqa | daam-v1 | daam-v2 | gqdaam | mixture"
_MP_HELP = "auto (bf16/fp16 on GPU, none on CPU) | no | fp16 | bf16"


def _echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2))


@app.command()
def train(
    ctx: typer.Context,
    features: Optional[Path] = typer.Option(None, "--features", help="Feature cache folder (classify extract --out)."),
    decoder: Optional[str] = typer.Option(None, "--decoder", help=_DECODER_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder to write (metrics, checkpoints, logs)."),
    epochs: int = typer.Option(35, "--epochs", help="Epochs per fold/run."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate [default: 1e-4, 5e-5 for Llama]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="[default: 8 for speech, 32 otherwise]"),
    seed: int = typer.Option(0, "--seed", help="Seed of the first run; run r uses seed + r."),
    runs: int = typer.Option(1, "--runs", help="Repeated runs with different seeds (train/test tasks)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Encoder layers to train on, e.g. 9 or 19-21."),
    heads: Optional[int] = typer.Option(None, "--heads", help="Attention/DAAM heads [default: the paper's]."),
    gaussians: Optional[int] = typer.Option(None, "--gaussians", help="Gaussians per head (mixture) [default: 4]."),
    dev_fraction: float = typer.Option(0.1, "--dev-fraction", help="Share of the training pool held out as dev."),
    loss: str = typer.Option("auto", "--loss", help="auto (focal for speech, else ce) | focal | ce"),
    weight_decay: float = typer.Option(0.1, "--weight-decay", help="AdamW weight decay."),
    mixed_precision: str = typer.Option("auto", "--mixed-precision", help=_MP_HELP),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decoder."),  # noqa: A002
    cpu: bool = typer.Option(False, "--cpu", help="Train on the CPU even when a GPU is present."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished run in --out."),
    method: Optional[str] = typer.Option(None, "--method", help="Row name in reports [default: decoder name]."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file of these options; flags win."),
    as_json: bool = typer.Option(False, "--json", help="Print metrics.json to stdout."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train a DAT decoder on cached features: folds (IEMOCAP) or seeded runs, dev-split model selection."""
    from daamkit.classify.training import train_decoder
    from daamkit.common.config_file import explicit_options, merge_config
    from daamkit.common.errors import DaamkitError
    from daamkit.common.progress import set_quiet

    values = merge_config(
        {k: v for k, v in ctx.params.items() if k not in ("config", "as_json", "quiet")},
        explicit_options(ctx),
        config,
    )
    for name in ("features", "decoder", "out"):
        if values[name] is None:
            raise DaamkitError(f"--{name} is required (on the command line or in --config)")
    set_quiet(quiet)
    metrics = train_decoder(values.pop("features"), values.pop("decoder"), values.pop("out"), **values)
    if as_json:
        _echo_json(metrics)
    else:
        acc = metrics["accuracy"]
        typer.echo(f"{metrics['method']}: accuracy {100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} %")


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="Run folder written by classify train."),
    features: Optional[Path] = typer.Option(None, "--features", help="Feature cache [default: the run's]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="[default: the run's]"),
    mixed_precision: str = typer.Option("auto", "--mixed-precision", help=_MP_HELP),
    cpu: bool = typer.Option(False, "--cpu", help="Score on the CPU even when a GPU is present."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
) -> None:
    """Re-score a saved run: every fold/run's best checkpoint on its test items."""
    from daamkit.classify.evaluation import evaluate_run
    from daamkit.common.progress import set_quiet

    set_quiet(True)
    result = evaluate_run(run_dir, features, batch_size=batch_size, mixed_precision=mixed_precision, cpu=cpu)
    if as_json:
        _echo_json(result)
        return
    for metric, block in result.items():
        splits = "  ".join(f"{e['name']}={100 * e['accuracy']:.2f}" for e in block["per_split"])
        typer.echo(f"{metric}: {100 * block['mean']:.2f} ± {100 * block['std']:.2f} %  ({splits})")


@app.command()
def importance(
    run_dir: Path = typer.Argument(..., help="Run folder of a DAAM decoder (daam-v1/v2, gqdaam, mixture)."),
    features: Optional[Path] = typer.Option(None, "--features", help="Feature cache [default: the run's]."),
    mixed_precision: str = typer.Option("auto", "--mixed-precision", help=_MP_HELP),
    cpu: bool = typer.Option(False, "--cpu", help="Run on the CPU even when a GPU is present."),
    as_json: bool = typer.Option(False, "--json", help="Print the ranking as JSON."),
) -> None:
    """Importance Factor from the dev-split gates: IF matrix, heatmap, per-layer shares, ranked layers."""
    from daamkit.classify.importance import importance_run
    from daamkit.common.progress import set_quiet

    set_quiet(True)
    result = importance_run(run_dir, features, mixed_precision=mixed_precision, cpu=cpu)
    if as_json:
        _echo_json(result)
        return
    typer.echo("layers by importance: " + ", ".join(map(str, result["ranked_layers"])))
    for key, path in result["figures"].items():
        typer.echo(f"{key}: {path}")


@app.command()
def report(
    run_dirs: List[Path] = typer.Argument(..., help="Run folders (classify train / lora)."),
    fmt: str = typer.Option("markdown", "--format", help="markdown | json"),
) -> None:
    """Paper-style tables: per-fold/run accuracy with mean ± std, and the learned Gaussian parameters."""
    from daamkit.classify.report import render_report

    typer.echo(render_report(run_dirs, fmt))
