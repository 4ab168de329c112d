"""`daamkit vqvae ...`: train, evaluate, reconstruct, encode and decode the DAAM VQ-VAE."""

from __future__ import annotations

import inspect
import json
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer

from daamkit.cli.app import new_app, options_with_config
from daamkit.infra.errors import DaamkitError
from daamkit.infra.progress import log
from daamkit.vqvae.config import TrainConfig, VQVAEConfig

app = new_app("DAAM-enhanced VQ-VAE image tokenizer: train, compare, evaluate, reconstruct, encode, decode, demo.")

_M, _T = VQVAEConfig(), TrainConfig()
MODEL_KEYS = {f.name for f in fields(VQVAEConfig)}
CheckpointArg = Annotated[Path, typer.Argument(help="Checkpoint folder (e.g. runs/vqvae/checkpoints/best).")]
InputsArg = Annotated[List[Path], typer.Argument(help="Image files or folders.")]
RawWeightsOpt = Annotated[bool, typer.Option(
    "--raw-weights", help="Use the raw trained weights even where the checkpoint has weight-EMA ones.")]
ImageSizeOpt = Annotated[Optional[int], typer.Option(help="Center-crop size (default: the training crop size).")]
FullOpt = Annotated[bool, typer.Option("--full", help="Whole images (trimmed to the down-sampling factor).")]
TRAIN_KEYS = {f.name for f in fields(TrainConfig)}


def _resume_configs(out: Path, values: dict[str, Any], given: set[str]) -> tuple[VQVAEConfig, TrainConfig]:
    """The saved run's configs; options given now may only change what RESUME_ADJUSTABLE allows."""
    from daamkit.vqvae.train import RESUME_ADJUSTABLE, saved_run_configs

    model_config, train_config = saved_run_configs(out)
    saved = {**model_config.to_dict(), **train_config.to_dict()}
    changes = {}
    for key in sorted(given & (MODEL_KEYS | TRAIN_KEYS)):
        if key in RESUME_ADJUSTABLE:
            changes[key] = values[key]
        elif values[key] != saved[key]:
            adjustable = ", ".join(f"`{name}`" for name in sorted(RESUME_ADJUSTABLE))
            raise DaamkitError(f"`resume` keeps the saved run's settings: `{key}` {values[key]} differs from "
                               f"{saved[key]!r} in {out}; only {adjustable} may change")
    return model_config, train_config.replace(**changes)


@app.command()
def train(
    ctx: typer.Context,
    data: str = typer.Option(_T.data, help="'samples' (scikit-image photos), an image folder, or a COCO 2017 root."),
    out: Path = typer.Option(Path("runs/vqvae"), help="Run folder: checkpoints/{last,best}, tb/, samples/."),
    image_size: int = typer.Option(_T.image_size, help="Training crop size (multiple of 2^num-downsamples)."),
    steps: int = typer.Option(_T.steps, help="Optimizer steps in total."),
    batch_size: int = typer.Option(_T.batch_size, help="Images per step and process."),
    lr: float = typer.Option(_T.lr, help="Peak AdamW learning rate (warm-up, then cosine decay)."),
    weight_decay: float = typer.Option(_T.weight_decay, help="AdamW weight decay on conv kernels."),
    warmup_steps: int = typer.Option(_T.warmup_steps, help="Linear warm-up steps."),
    grad_clip: float = typer.Option(_T.grad_clip, help="Gradient-norm clip (0 disables)."),
    base_channels: int = typer.Option(_M.base_channels, help="Channels after conv_in."),
    num_downsamples: int = typer.Option(_M.num_downsamples, help="Stride-2 blocks; tokens grid = image / 2^N."),
    num_embeddings: int = typer.Option(_M.num_embeddings, help="Codebook size."),
    embedding_dim: int = typer.Option(_M.embedding_dim, help="Code vector size."),
    attention: str = typer.Option(
        _M.attention, help="Residual-block form: daam (the paper's), daam-gated, daam-gated-inner, or none (ablation)."),
    heads: int = typer.Option(_M.heads, help="Mixture-DAAM heads over the channel axis."),
    gaussians: int = typer.Option(_M.gaussians, help="Gaussians per Mixture-DAAM head."),
    ema: bool = typer.Option(_M.ema, "--ema/--no-ema", help="EMA codebook updates (else a codebook loss)."),
    l2_normalize: bool = typer.Option(_M.l2_normalize, "--l2-normalize/--no-l2-normalize", help="Unit-norm codes."),
    recon_loss: str = typer.Option(_T.recon_loss, help="Reconstruction loss: l1 or mse."),
    perceptual_weight: float = typer.Option(
        _T.perceptual_weight, help="LPIPS weight (0 = off); needs the trunk weights (see --lpips-weights, `daamkit info`)."),
    lpips_net: str = typer.Option(_T.lpips_net, help="LPIPS trunk of the perceptual loss: vgg (as the anchors) or alex."),
    lpips_weights: Optional[str] = typer.Option(
        _T.lpips_weights, help="The torchvision trunk file (default: the torch hub cache, else torchvision's download)."),
    disc_weight: float = typer.Option(_T.disc_weight, help="PatchGAN adversarial loss weight (0 = no discriminator)."),
    disc_start: int = typer.Option(_T.disc_start, help="Step at which the adversarial loss starts."),
    disc_loss: str = typer.Option(_T.disc_loss, help="Adversarial loss: hinge or non-saturating."),
    adaptive_disc_weight: bool = typer.Option(
        _T.adaptive_disc_weight, "--adaptive-disc-weight/--no-adaptive-disc-weight",
        help="Scale the adversarial term by taming's gradient-norm ratio at the decoder's last layer."),
    lecam_weight: float = typer.Option(_T.lecam_weight, help="LeCam regularisation weight on the discriminator (0 = off)."),
    disc_lr: Optional[float] = typer.Option(_T.disc_lr, help="Discriminator Adam learning rate (default: --lr)."),
    disc_channels: int = typer.Option(_T.disc_channels, help="Discriminator channels in its first layer."),
    disc_layers: int = typer.Option(_T.disc_layers, help="Discriminator stride-2 stages (image size >= 3 * 2^N)."),
    weight_ema: float = typer.Option(_T.weight_ema, help="Weight EMA decay, e.g. 0.999 (0 = off); evaluation uses it."),
    resize_mode: str = typer.Option(
        _T.resize_mode, help="crop, or resize-crop (shorter side to the crop size, then random crop); auto = "
                             "resize-crop on COCO and folders of 1,000+ images, crop on the sample photos."),
    mixed_precision: str = typer.Option(_T.mixed_precision, help="no, bf16 or fp16 (fp16 needs a GPU)."),
    compile: bool = typer.Option(_T.compile, "--compile", help="torch.compile the encoder and decoder."),
    seed: int = typer.Option(_T.seed, help="Random seed (weights, crops, code restarts)."),
    num_workers: int = typer.Option(_T.num_workers, help="DataLoader worker processes."),
    log_every: int = typer.Option(_T.log_every, help="TensorBoard scalar interval (steps)."),
    eval_every: int = typer.Option(_T.eval_every, help="Validation + checkpoint interval (steps)."),
    val_images: int = typer.Option(_T.val_images, help="Held-out images per validation."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in --out (exactly)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in --out."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file of options; command-line flags win."),
    preset: Optional[str] = typer.Option(
        None, "--preset", help="A shipped preset (`daamkit vqvae presets`); --config and flags win over it."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Read no data, write nothing: time 3 steps on random images, project the run's cost."),
    as_json: bool = typer.Option(False, "--json", help="Print the final result as one JSON object."),
) -> None:
    """Train the VQ-VAE tokenizer (defaults: built-in photos, 1,000 steps, no DAAM: add --attention daam)."""
    from daamkit.vqvae.presets import preset_path
    from daamkit.vqvae.train import train as run_training

    values, given = options_with_config(ctx, config, exclude={"resume", "overwrite", "config", "preset", "dry_run",
                                                              "as_json"},
                                        preset=preset_path(preset) if preset else None)
    out_dir = Path(values.pop("out"))
    if resume:
        model_config, train_config = _resume_configs(out_dir, values, given)
    else:
        model_config, train_config = _new_run_configs(values)
    if dry_run:
        _print_dry_run(model_config, train_config, as_json)
        return
    result = run_training(model_config, train_config, out_dir, resume=resume, overwrite=overwrite)
    if as_json:
        typer.echo(json.dumps({"status": result.status, "step": result.step, "best_psnr": result.best_psnr,
                               "metrics": result.metrics, "out": str(out_dir)}))
    if result.status == "interrupted":
        log(f"interrupted at step {result.step}; checkpoint saved in {result.paths.last}; continue with --resume")
        raise typer.Exit(130)
    psnr = f"{result.metrics['psnr']:.2f} dB" if result.metrics else "n/a"
    log(f"done: step {result.step}, validation PSNR {psnr}; checkpoints in {result.paths.root / 'checkpoints'}, "
        f"pictures in {result.paths.samples}; monitor with `tensorboard --logdir {result.paths.tb}`")


def _new_run_configs(values: dict[str, Any]) -> tuple[VQVAEConfig, TrainConfig]:
    model_config = VQVAEConfig.from_dict({k: v for k, v in values.items() if k in MODEL_KEYS})
    return model_config, TrainConfig.from_dict({k: v for k, v in values.items() if k in TRAIN_KEYS})


# `train` options that `compare` sets itself (per run or per variant) instead of sharing them.
COMPARE_OWN = {"ctx", "out", "resume", "overwrite", "as_json", "seed", "attention", "dry_run"}


def _with_train_options(command):
    """Give `command` every option of `train` except COMPARE_OWN, so a comparison's shared budget takes
    exactly the options (and defaults) of a single run; the command receives them as **kwargs."""
    own = [p for p in inspect.signature(command).parameters.values() if p.kind is not p.VAR_KEYWORD]
    shared = [p for name, p in inspect.signature(train).parameters.items() if name not in COMPARE_OWN]
    command.__signature__ = inspect.Signature(own + shared)
    command.__annotations__ = {**{p.name: train.__annotations__[p.name] for p in shared}, **command.__annotations__}
    return command


def _comma_list(text: str, flag: str) -> list[str]:
    """The entries of a comma-separated option; an empty entry (`0,,1`) is refused, not silently dropped."""
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise DaamkitError(f"{flag} has an empty entry in {text!r}; separate the values with single commas")
    return parts


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in _comma_list(text, flag)]
    except ValueError:
        raise DaamkitError(f"{flag} takes comma-separated integers, got {text!r}") from None


@app.command()
@_with_train_options
def compare(
    ctx: typer.Context,
    variants: str = typer.Option("daam,daam-gated,none", help="Comma-separated --attention values to compare."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds; every variant is trained once per seed."),
    eval_data: Optional[str] = typer.Option(
        None, help="Held-out images: a folder, a COCO root (val2017) or 'samples' (default: --data's held-out part)."),
    out: Path = typer.Option(Path("runs/compare"), help="Folder of the runs (OUT/VARIANT-seedK/, e.g. daam-seed0/) and the table."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as one JSON object."),
    **shared: Any,
) -> None:
    """Train variants x seeds on one budget and data; tabulate held-out PSNR (mean +- std), SSIM, LPIPS,
    codebook usage, perplexity, ms per train step and parameters into OUT/compare.{md,json}.

    Every other option is `train`'s and applies to all runs. Finished runs are reused and interrupted
    ones resumed, so a killed comparison continues where it stopped when run again.
    """
    from daamkit.vqvae.compare import compare as run_comparison, markdown_table

    from daamkit.vqvae.presets import preset_path

    preset = shared.get("preset")
    values, _ = options_with_config(ctx, shared.get("config"),
                                    exclude=COMPARE_OWN | {"config", "preset", "variants", "seeds", "eval_data"},
                                    preset=preset_path(preset) if preset else None)
    model_config, train_config = _new_run_configs(values)
    names = _comma_list(variants, "--variants")
    comparison = run_comparison(model_config, train_config, names, _int_list(seeds, "--seeds"), out, eval_data)
    typer.echo(json.dumps(comparison.to_dict()) if as_json else markdown_table(comparison).rstrip("\n"))
    if comparison.status == "interrupted":
        log(f"interrupted; run the same command again to continue the comparison in {out}")
        raise typer.Exit(130)
    log(f"table written to {out / 'compare.md'} and {out / 'compare.json'}")


def _print_dry_run(model_config: VQVAEConfig, train_config: TrainConfig, as_json: bool) -> None:
    from daamkit.vqvae.train import DRY_RUN_STEPS, dry_run

    report = dry_run(model_config, train_config)
    if as_json:
        typer.echo(json.dumps(report))
        return
    side = train_config.image_size // model_config.downsample_factor
    disc = report["discriminator_parameters"]
    hours = report["projected_hours"]
    typer.echo("\n".join([
        f"dry run on {report['device']}: {DRY_RUN_STEPS} steps on random {train_config.image_size} px images, "
        f"batch {train_config.batch_size}; no data read, nothing written",
        f"parameters        {report['parameters']:,}" + (f" (+ discriminator {disc:,})" if disc else ""),
        f"tokens per image  {report['tokens_per_image']:,} ({side} x {side})",
        f"ms per step       {report['ms_per_step']:.1f} (median after the first step; every loss of the recipe on)",
        f"peak memory       {report['peak_memory_gib']:.2f} GiB ({report['peak_memory_kind']})",
        f"projected time    {hours:.2f} h for {report['steps']:,} steps"
        + (f" ({hours / 24:.1f} days)" if hours >= 48 else "") + " on this device, one process",
    ]))


@app.command()
def presets() -> None:
    """List the training presets shipped with daamkit (use one with `train --preset NAME`)."""
    from daamkit.vqvae.presets import preset_description, preset_names, preset_path

    for name in preset_names():
        typer.echo(f"{name:<12} {preset_description(name)}")
    typer.echo(f"files: {preset_path(preset_names()[0]).parent}")


def _format_metrics(metrics: dict) -> str:
    lpips = "n/a (trunk weights missing)" if metrics["lpips"] is None else f"{metrics['lpips']:.4f}"
    rfid = "n/a (Inception weights missing)" if metrics["rfid"] is None else f"{metrics['rfid']:.2f}"
    return (f"psnr {metrics['psnr']:.2f} dB  ssim {metrics['ssim']:.4f}  lpips {lpips}  rfid {rfid}  "
            f"codebook usage {metrics['codebook_usage']:.1f}%  perplexity {metrics['perplexity']:.1f}  "
            f"images {metrics['num_images']}")


@app.command()
def evaluate(
    checkpoint: CheckpointArg,
    data: str = typer.Option("samples", help="'samples' (held-out crops), a COCO 2017 root (val2017) or a folder."),
    image_size: ImageSizeOpt = None,
    batch_size: int = typer.Option(32, help="Images per batch."),
    raw_weights: RawWeightsOpt = False,
    lpips_weights: Optional[Path] = typer.Option(
        None, help="AlexNet trunk file for the LPIPS metric (default: the torch hub cache, else torchvision's download)."),
    fid_weights: Optional[Path] = typer.Option(
        None, help="torch-fidelity's Inception weights for rFID (default: the torch hub cache; null without)."),
    resize_mode: str = typer.Option(
        "auto", help="crop, or resize-crop (shorter side to the size, then centre crop); auto = resize-crop on COCO "
                     "and folders of 1,000+ images."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """PSNR, SSIM, LPIPS and rFID (each null without its weights), codebook usage % and perplexity of a checkpoint."""
    from daamkit.vqvae.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(checkpoint, data, image_size, batch_size, raw_weights=raw_weights,
                                  lpips_weights=lpips_weights, fid_weights=fid_weights,
                                  resize_mode=resize_mode)
    typer.echo(json.dumps(metrics) if as_json else _format_metrics(metrics))


OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace outputs that already exist.")]


@app.command()
def reconstruct(
    checkpoint: CheckpointArg,
    inputs: InputsArg,
    out: Path = typer.Option(..., "--out", help="Folder for the original | reconstruction PNGs (new or empty)."),
    image_size: ImageSizeOpt = None,
    full: FullOpt = False,
    overwrite: OverwriteOpt = False,
    raw_weights: RawWeightsOpt = False,
) -> None:
    """Write side-by-side original | reconstruction PNGs.

    Unreadable or too-small images are skipped and listed with their reasons in OUT/skipped.txt; the exit
    code is non-zero only when no image could be processed.
    """
    from daamkit.vqvae.evaluate import reconstruct_files

    written = reconstruct_files(checkpoint, inputs, out, image_size, full, overwrite, raw_weights)
    log(f"wrote {len(written)} picture(s) to {out}")


def _sizes(shapes: list[tuple[int, int]]) -> str:
    return ", ".join(f"{h}x{w}" for h, w in shapes[:3]) + (f" and {len(shapes) - 3} other size(s)" if len(shapes) > 3 else "")


@app.command()
def encode(
    checkpoint: CheckpointArg,
    inputs: InputsArg,
    out: Path = typer.Option(..., "--out", help="Output .npz of token-id grids."),
    image_size: ImageSizeOpt = None,
    full: FullOpt = False,
    overwrite: OverwriteOpt = False,
    raw_weights: RawWeightsOpt = False,
) -> None:
    """Turn images into token-id grids (.npz).

    Unreadable or too-small images are skipped and listed with their reasons on stderr; the exit code is
    non-zero only when no image could be processed.
    """
    from daamkit.vqvae.tokens import encode_files

    summary = encode_files(checkpoint, inputs, out, image_size, full, overwrite, raw_weights)
    log(f"wrote {summary['images']} token grid(s) of {_sizes(summary['shapes'])} to {out}")


@app.command()
def decode(
    checkpoint: CheckpointArg,
    tokens: Path = typer.Argument(..., help=".npz written by `daamkit vqvae encode`."),
    out: Path = typer.Option(..., "--out", help="Folder for the decoded PNGs (new or empty)."),
    overwrite: OverwriteOpt = False,
    raw_weights: RawWeightsOpt = False,
) -> None:
    """Turn token-id grids (.npz) back into images."""
    from daamkit.vqvae.tokens import decode_file

    written = decode_file(checkpoint, tokens, out, overwrite, raw_weights)
    log(f"wrote {len(written)} image(s) to {out}")


@app.command()
def demo(
    checkpoint: CheckpointArg,
    compare: Optional[Path] = typer.Option(None, "--compare", help="A second checkpoint shown side by side."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (127.0.0.1 = this machine only)."),
    port: int = typer.Option(7860, help="Port to listen on."),
    raw_weights: RawWeightsOpt = False,
    lpips_weights: Optional[Path] = typer.Option(
        None, help="AlexNet trunk file for the LPIPS metric (default: the torch hub cache; the demo downloads nothing)."),
) -> None:
    """Serve a local Gradio page: upload an image, see its reconstruction, metrics, token grid and DAAM gate maps.

    Nothing is shared or fetched from the internet; reach a remote machine's page through an SSH tunnel.
    """
    try:
        from daamkit.cli.demo_app import serve
    except ImportError as err:
        raise DaamkitError(f"the demo needs Gradio ({err.name} is missing): pip install 'daamkit[demo]'") from err
    if not 0 < port < 65536:
        raise DaamkitError(f"--port must be between 1 and 65535, got {port}")
    page, url = serve([checkpoint] + ([compare] if compare else []), host, port, raw_weights, lpips_weights)
    log(f"demo running at {url} (Ctrl+C to stop)")
    page.block_thread()
