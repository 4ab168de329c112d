"""`daamkit classify ...`: frozen-encoder feature extraction, DAT decoders, Importance Factor, reports."""

import json
import typing
from pathlib import Path
from typing import List, Optional

import typer

from daamkit.classify.run_config import DecoderRunConfig, LoRARunConfig
from daamkit.cli.app import new_app, options_with_config

app = new_app("Frozen-encoder DAT classifiers: extract, train, evaluate, importance, report.")


# --- extract ---


def _resolve_options(ctx: typer.Context, config: Optional[Path], quiet: bool, required: tuple[str, ...],
                     file_types: Optional[dict] = None) -> dict:
    """This command's options merged with `--config` (flags win), required ones checked, progress set quiet.

    `file_types`: option types a config file may use instead of the option's own (see options_with_config).
    """
    from daamkit.infra.errors import DaamkitError
    from daamkit.infra.progress import set_quiet

    values, _ = options_with_config(ctx, config, exclude={"config", "as_json", "quiet"}, file_types=file_types)
    for name in required:
        if values[name] is None:
            raise DaamkitError(f"--{name} is required (on the command line or in --config)")
    set_quiet(quiet)
    return values


_TASK_HELP = "iemocap | agnews | cifar100 | text-csv | image-folder | audio-folder"


@app.command()
def extract(
    ctx: typer.Context,
    task: Optional[str] = typer.Option(None, "--task", help=_TASK_HELP),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset folder in the task's original layout."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="HF model folder or name in the local HF cache."),
    out: Optional[Path] = typer.Option(None, "--out", help="Feature cache folder to fill (resumed / reused)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Items per encoder forward pass."),
    dtype: str = typer.Option("float32", "--dtype", help="Encoder weights/compute: float32 | bfloat16 | float16."),
    device: str = typer.Option("auto", "--device", help="auto (cuda, mps, cpu) | cpu | cuda | cuda:1 ..."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="e.g. auto: spread a big model over GPUs."),
    include_embeddings: bool = typer.Option(False, "--include-embeddings", help="Also keep hidden_states[0]."),
    max_items: Optional[int] = typer.Option(None, "--max-items", help="Evenly spaced subset per split (smoke runs)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's custom code."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file of these options; flags win."),
    as_json: bool = typer.Option(False, "--json", help="Print the extraction summary as JSON."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Encode a dataset with a frozen encoder into a memory-mapped (N, layers, d) float16 feature cache."""
    from daamkit.classify.extract import extract_features

    values = _resolve_options(ctx, config, quiet, ("task", "data", "encoder", "out"))
    summary = extract_features(
        values.pop("task"), values.pop("data"), values.pop("encoder"), values.pop("out"), **values
    )
    if as_json:
        _echo_json(summary)
        return
    for name, split in summary["splits"].items():
        state = "reused" if split["reused"] else f"computed {split['computed']} in {split['seconds']:.1f} s"
        typer.echo(f"{name}: {split['num_items']} items x {len(summary['layers'])} layers x "
                   f"{summary['hidden_size']} ({state})")
    typer.echo(f"features in {summary['out']}")


# --- train / evaluate / importance / report (library imports are lazy so `--help` stays fast) ---

_DECODER_HELP = "linear | mha | mha-bn | gqa | daam-v1 | daam-v2 | gqdaam | mixture | conv-head (no attention)"
_MP_HELP = "auto (bf16/fp16 on GPU, none on CPU) | no | fp16 | bf16"
# Options `classify train` and `classify lora` share, resolved the same way against the data.
_LR_HELP = ("Learning rate or auto (3e-4, 1e-3 or 3e-3, chosen on the first split's dev items) [default: auto on "
            "your own data; the paper's 1e-4 (5e-5 for Llama) on iemocap/agnews/cifar100].")
_RUNS_HELP = ("Repeated runs with different seeds (train/test tasks) [default: 3 on your own data under 5,000 "
              "training items, else 1].")
_SELECTION_HELP = ("Checkpoint kept per fold/run: best-epoch (highest dev accuracy) | last-epoch [default: "
                   "last-epoch on your own data; best-epoch, the paper's, on iemocap/agnews/cifar100].")


def _echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2))


_R = DecoderRunConfig.default


@app.command()
def train(
    ctx: typer.Context,
    features: Optional[Path] = typer.Option(None, "--features", help="Feature cache folder (classify extract --out)."),
    decoder: Optional[str] = typer.Option(None, "--decoder", help=_DECODER_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder to write (metrics, checkpoints, logs)."),
    epochs: Optional[int] = typer.Option(
        _R("epochs"), "--epochs", help="Epochs per fold/run [default: 35, more on small data: at least 500 steps]."),
    lr: Optional[str] = typer.Option(_R("lr"), "--lr", help=_LR_HELP),
    batch_size: Optional[int] = typer.Option(_R("batch_size"), "--batch-size", help="[default: 8 for speech, 32 otherwise]"),
    seed: int = typer.Option(_R("seed"), "--seed", help="Seed of the first run; run r uses seed + r."),
    runs: Optional[int] = typer.Option(_R("runs"), "--runs", help=_RUNS_HELP),
    layers: Optional[str] = typer.Option(
        _R("layers"), "--layers", help="Encoder layers to train on, e.g. 9 or 19-21 [default: all; linear: the last]."),
    heads: Optional[int] = typer.Option(
        _R("heads"), "--heads", help="Attention/DAAM heads [default: the paper's; DAAM: fewer, so each head spans 2+ layers]."),
    gaussians: Optional[int] = typer.Option(_R("gaussians"), "--gaussians", help="Gaussians per head (mixture) [default: 4]."),
    dropout: Optional[float] = typer.Option(
        _R("dropout"), "--dropout", help="Dropout on the classifier's inputs [default: 0.8 for DAT decoders on "
        "your own data; 0 for linear and, as in the paper, on iemocap/agnews/cifar100]."),
    head: Optional[str] = typer.Option(
        _R("head"), "--head", help="DAT decoder head: conv (the paper's: 2 conv layers, Linear) | linear (Linear "
        "on all layers) | mix (learned weighted sum of the layers, Linear) [default: mix on your own data; conv on "
        "iemocap/agnews/cifar100]."),
    residual: Optional[bool] = typer.Option(
        _R("residual"), "--residual/--no-residual", help="Add the input to the attention output of mha, mha-bn, gqa, "
        "gqdaam, daam-v1 and daam-v2 (DAAM: x + x * gate) [default: on for them on your own data; off, as in the "
        "paper, on iemocap/agnews/cifar100]."),
    selection: Optional[str] = typer.Option(_R("selection"), "--selection", help=_SELECTION_HELP),
    dev_fraction: float = typer.Option(_R("dev_fraction"), "--dev-fraction", help="Share of the training pool held out as dev."),
    loss: str = typer.Option(_R("loss"), "--loss", help="auto (focal for speech, else ce) | focal | ce"),
    weight_decay: float = typer.Option(_R("weight_decay"), "--weight-decay", help="AdamW weight decay."),
    mixed_precision: str = typer.Option(_R("mixed_precision"), "--mixed-precision", help=_MP_HELP),
    compile: bool = typer.Option(_R("compile"), "--compile", help="torch.compile the decoder."),  # noqa: A002
    cpu: bool = typer.Option(False, "--cpu", help="Train on the CPU even when a GPU is present."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished or unfinished run in --out."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the interrupted run in --out with its saved settings (other options unused)."),
    method: Optional[str] = typer.Option(_R("method"), "--method", help="Row name in reports [default: decoder name]."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file of these options; flags win."),
    as_json: bool = typer.Option(False, "--json", help="Print metrics.json to stdout."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train a DAT decoder or linear probe on cached features: folds or seeded runs, dev-split model selection."""
    from daamkit.classify.training import train_decoder

    required = ("out",) if resume else ("features", "decoder", "out")
    values = _resolve_options(ctx, config, quiet, required,
                              file_types={"lr": typing.get_type_hints(DecoderRunConfig)["lr"]})
    metrics = train_decoder(values.pop("features"), values.pop("decoder"), values.pop("out"), **values)
    if as_json:
        _echo_json(metrics)
    else:
        acc = metrics["accuracy"]
        typer.echo(f"{metrics['method']}: accuracy {100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} %")


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="Run folder written by classify train or classify lora."),
    features: Optional[Path] = typer.Option(None, "--features", help="Feature cache [default: the run's]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="[default: the run's]"),
    mixed_precision: str = typer.Option("auto", "--mixed-precision", help=_MP_HELP),
    cpu: bool = typer.Option(False, "--cpu", help="Score on the CPU even when a GPU is present."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
) -> None:
    """Re-score a saved run (DAT decoder or LoRA): every fold/run's best checkpoint on its test items."""
    from daamkit.classify.evaluation import evaluate_run
    from daamkit.classify.experiment import LORA_FILE
    from daamkit.classify.lora import evaluate_lora
    from daamkit.infra.progress import set_quiet

    set_quiet(True)
    if (run_dir / LORA_FILE).is_file():
        result = evaluate_lora(run_dir, cpu=cpu)
    else:
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
    from daamkit.infra.progress import set_quiet

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
    pool_seeds: bool = typer.Option(
        False, "--pool-seeds", help="One row for the runs of a method trained with the same settings and other "
        "--seed values; its Δ vs linear ± s.e. is taken over those invocations."),
) -> None:
    """Paper-style tables: per-fold/run accuracy with mean ± std, and the learned Gaussian parameters."""
    from daamkit.classify.report import render_report

    typer.echo(render_report(run_dirs, fmt, pool_seeds))


# --- LoRA baselines, IF ablation, the one-command paper protocol ---


_L = LoRARunConfig.default


@app.command()
def lora(
    task: Optional[str] = typer.Option(None, "--task", help=_TASK_HELP + " Required unless --resume."),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset folder in the task's original layout."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="HF model folder or name in the local HF cache."),
    out: Path = typer.Option(..., "--out", help="Run folder to write (metrics, adapter checkpoints)."),
    rank: int = typer.Option(_L("rank"), "--rank", help="LoRA rank r (the paper: 4 or 8)."),
    alpha: float = typer.Option(_L("alpha"), "--alpha", help="LoRA alpha (scale alpha / r)."),
    plus: bool = typer.Option(_L("plus"), "--plus", help="LoRA+: lora_B learns --loraplus-ratio times faster."),
    loraplus_ratio: float = typer.Option(_L("loraplus_ratio"), "--loraplus-ratio", help="LoRA+ lr ratio of B over A."),
    target_modules: Optional[str] = typer.Option(
        None, "--target-modules", help="Comma-separated module names [default: attention query/key; WavLM: "
        "intermediate_dense,output_dense]."),
    epochs: Optional[int] = typer.Option(
        _L("epochs"), "--epochs", help="Epochs per fold/run [default: the paper's 3 on iemocap/agnews/cifar100; on "
        "your own data at least 500 steps, as classify train]."),
    lr: Optional[str] = typer.Option(_L("lr"), "--lr", help=_LR_HELP),
    batch_size: Optional[int] = typer.Option(_L("batch_size"), "--batch-size", help="[default: 8 for speech, 32 otherwise]"),
    seed: int = typer.Option(_L("seed"), "--seed", help="Seed of the first run; run r uses seed + r (as classify train)."),
    runs: Optional[int] = typer.Option(_L("runs"), "--runs", help=_RUNS_HELP),
    selection: Optional[str] = typer.Option(_L("selection"), "--selection", help=_SELECTION_HELP),
    dev_fraction: float = typer.Option(_L("dev_fraction"), "--dev-fraction", help="Share of the training pool held out as dev."),
    loss: str = typer.Option(_L("loss"), "--loss", help="auto (focal for speech, else ce) | focal | ce"),
    weight_decay: float = typer.Option(_L("weight_decay"), "--weight-decay", help="AdamW weight decay."),
    max_items: Optional[int] = typer.Option(_L("max_items"), "--max-items", help="Evenly spaced subset per split (as extract)."),
    dtype: str = typer.Option(_L("dtype"), "--dtype", help="Encoder weights: float32 | bfloat16 | float16."),
    mixed_precision: str = typer.Option(_L("mixed_precision"), "--mixed-precision", help=_MP_HELP),
    cpu: bool = typer.Option(False, "--cpu", help="Train on the CPU even when a GPU is present."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished or unfinished run in --out."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the interrupted run in --out with its saved settings (other options unused)."),
    method: Optional[str] = typer.Option(_L("method"), "--method", help="Row name in reports [default: LoRA (r=8)]."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's custom code."),
    as_json: bool = typer.Option(False, "--json", help="Print metrics.json to stdout."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """LoRA / LoRA+ baseline: fine-tune the encoder's adapters + a linear head, same folds, dev selection and loop."""
    from daamkit.classify.lora import train_lora
    from daamkit.infra.progress import set_quiet

    set_quiet(quiet)
    targets = [name.strip() for name in target_modules.split(",") if name.strip()] if target_modules else None
    metrics = train_lora(
        task, data, encoder, out, rank=rank, alpha=alpha, plus=plus, loraplus_ratio=loraplus_ratio,
        target_modules=targets, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, runs=runs,
        selection=selection, dev_fraction=dev_fraction, loss=loss, weight_decay=weight_decay, max_items=max_items, dtype=dtype,
        mixed_precision=mixed_precision, cpu=cpu, overwrite=overwrite, resume=resume, method=method,
        trust_remote_code=trust_remote_code,
    )
    if as_json:
        _echo_json(metrics)
    else:
        acc = metrics["accuracy"]
        typer.echo(f"{metrics['method']}: accuracy {100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} % "
                   f"({metrics['trainable_parameters']:,} trainable parameters)")


@app.command()
def ablate(
    run_dir: Path = typer.Argument(..., help="Finished DAAM run (daam-v1/v2, gqdaam, mixture) with its IF."),
    features: Optional[Path] = typer.Option(None, "--features", help="Feature cache [default: the run's]."),
    k: int = typer.Option(3, "--k", help="Number of top-IF and of bottom-IF layers."),
    out: Optional[Path] = typer.Option(None, "--out", help="[default: RUN_DIR/ablation-kK, e.g. ablation-k3]"),
    mixed_precision: str = typer.Option("auto", "--mixed-precision", help=_MP_HELP),
    cpu: bool = typer.Option(False, "--cpu", help="Train on the CPU even when a GPU is present."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """IF layer ablation: the run's decoder on its top-k vs bottom-k Importance-Factor layers (Tables 6-7)."""
    from daamkit.classify.ablation import run_ablation
    from daamkit.infra.progress import set_quiet

    set_quiet(quiet)
    result = run_ablation(run_dir, features, k=k, out_dir=out, mixed_precision=mixed_precision, cpu=cpu)
    if as_json:
        _echo_json(result["table"])
    else:
        typer.echo(result["markdown"])


@app.command()
def reproduce(
    task: str = typer.Option(..., "--task", help="iemocap | agnews | cifar100"),
    data: Path = typer.Option(..., "--data", help="Dataset folder in the task's original layout."),
    encoder: str = typer.Option(..., "--encoder", help="HF model folder or name in the local HF cache."),
    out: Path = typer.Option(..., "--out", help="Experiment folder (features, runs, report); reruns resume."),
    methods: Optional[str] = typer.Option(
        None, "--methods", help="Comma-separated subset of: linear, mha, mha-bn, gqa, daam-v1, daam-v2, gqdaam, "
        "mixture, lora, loraplus, ablation [default: all]."),
    quick: bool = typer.Option(
        False, "--quick", help="Smoke run: 64 items per split, 2 decoder epochs, 1 LoRA epoch, 1 run."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Decoder epochs [default: 35; quick: 2]."),
    lora_epochs: Optional[int] = typer.Option(None, "--lora-epochs", help="LoRA epochs [default: 3; quick: 1]."),
    runs: Optional[int] = typer.Option(None, "--runs", help="Seeded runs for agnews/cifar100 [default: 3; quick: 1]."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first run/fold plan."),
    heads: Optional[int] = typer.Option(None, "--heads", help="Override every decoder's head count."),
    lora_ranks: str = typer.Option("4,8", "--lora-ranks", help="LoRA / LoRA+ ranks, comma-separated."),
    k: int = typer.Option(3, "--k", help="Top-/bottom-IF layers in the ablation."),
    ablation_source: str = typer.Option("daam-v1", "--ablation-source", help="DAAM decoder whose IF ranks layers."),
    max_items: Optional[int] = typer.Option(None, "--max-items", help="Subset per split [quick: 64]."),
    batch_size: int = typer.Option(8, "--extract-batch-size", help="Items per encoder forward pass in extraction."),
    dtype: str = typer.Option("float32", "--dtype", help="Encoder weights/compute: float32 | bfloat16 | float16."),
    mixed_precision: str = typer.Option("auto", "--mixed-precision", help=_MP_HELP),
    cpu: bool = typer.Option(False, "--cpu", help="Run everything on the CPU."),
    as_json: bool = typer.Option(False, "--json", help="Print the final report as JSON."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """One paper experiment end to end: extraction, every decoder, LoRA and LoRA+, IF ablation, the report."""
    from daamkit.classify.reproduce import ReproduceOptions, reproduce_experiment
    from daamkit.infra.progress import set_quiet

    set_quiet(quiet)
    options = ReproduceOptions.build(
        methods=methods, quick=quick, epochs=epochs, lora_epochs=lora_epochs, runs=runs, seed=seed, heads=heads,
        lora_ranks=lora_ranks, k=k, ablation_source=ablation_source, max_items=max_items, batch_size=batch_size,
        dtype=dtype, mixed_precision=mixed_precision, cpu=cpu,
    )
    result = reproduce_experiment(task, data, encoder, out, options)
    if as_json:
        _echo_json(result["report"])
    else:
        typer.echo(result["markdown"])
