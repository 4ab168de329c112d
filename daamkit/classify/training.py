"""Training DAT decoders on a feature cache, with the paper's defaults and an honest protocol.

`train_decoder` trains one model per fold (IEMOCAP) or per run (train/test tasks), picks each one's best
epoch by accuracy on a dev split carved from its training pool (never the test items), re-scores the
best checkpoint on the test items, and writes `run.json`, `metrics.json`, the checkpoints, TensorBoard
logs and (for DAAM decoders) the Importance Factor outputs into the run folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from daamkit.classify.batches import FeatureBatches
from daamkit.classify.decoders import (
    DecoderConfig,
    attention_parameters,
    build_decoder,
    check_decoder,
    count_parameters,
    decoder_config,
    gaussian_parameter_ranges,
)
from daamkit.classify.evaluation import accuracy, load_split_decoder, predict, score_run
from daamkit.classify.experiment import (
    METRICS_FILE,
    RUN_FILE,
    LR_GRID,
    RunContext,
    default_batch_size,
    default_epochs,
    is_speech,
    load_run,
    make_accelerator,
    open_sources,
    plan_splits,
    resolve_lr,
    resolve_mixed_precision,
    split_checkpoint_dir,
)
from daamkit.classify.feature_cache import FeatureCache
from daamkit.classify.importance import IMPORTANCE_DIR, write_importance
from daamkit.classify.protocol import DEFAULT_DEV_FRACTION, SplitPlan, parse_layers
from daamkit.infra.checkpoint import atomic_write_json, save_checkpoint
from daamkit.infra.errors import DaamkitError
from daamkit.infra.output_paths import output_folder
from daamkit.infra.progress import log, progress_bar

LOSSES = ("auto", "focal", "ce")
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.5
PLATEAU_FACTOR, PLATEAU_PATIENCE = 0.5, 3
LR_SEARCH_DIR = "lr_search"


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = FOCAL_ALPHA,
               gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """Multi-class focal loss, mean over the batch: -alpha * (1 - p_t)^gamma * log p_t."""
    log_p = F.log_softmax(logits.float(), dim=-1).gather(1, target[:, None]).squeeze(1)
    return (-alpha * (1.0 - log_p.exp()).pow(gamma) * log_p).mean()


def train_decoder(
    features_dir: str | Path,
    decoder: str,
    out_dir: str | Path,
    *,
    layers: Optional[str] = None,
    epochs: Optional[int] = None,
    lr: float | str | None = None,
    batch_size: Optional[int] = None,
    seed: int = 0,
    runs: int = 1,
    heads: Optional[int] = None,
    gaussians: Optional[int] = None,
    dev_fraction: float = DEFAULT_DEV_FRACTION,
    loss: str = "auto",
    weight_decay: float = 0.1,
    mixed_precision: str = "auto",
    compile: bool = False,
    cpu: bool = False,
    overwrite: bool = False,
    method: Optional[str] = None,
) -> dict:
    """Train `decoder` on the cache in `features_dir`; write the run into `out_dir` and return its metrics.

    `layers` is a `--layers` spec ("9", "19-21") of encoder layer numbers; None trains on every cached
    layer (the linear probe: on the last one). `lr` is a number or "auto" (chosen on the first split's dev
    items from `LR_GRID`); None is "auto" on a user's task and the paper's value (1e-4, 5e-5 for Llama) on
    the paper's tasks. `epochs` None is the paper's 35, raised to `MIN_TRAIN_STEPS` optimizer steps on a
    small training pool. `batch_size` defaults to the paper's (8 for speech, 32 otherwise);
    `loss="auto"` is the focal loss for speech and cross-entropy otherwise. `method` names the row in
    reports (default: the decoder name, plus the layers when a subset is used).
    """
    out_dir = output_folder(out_dir)  # a file in the way is refused before anything is read
    if epochs is not None and epochs < 1:
        raise DaamkitError(f"epochs must be at least 1, got {epochs}")
    if loss not in LOSSES:
        raise DaamkitError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    spec = check_decoder(decoder)  # before any file is read
    if (out_dir / METRICS_FILE).exists() and not overwrite:
        raise DaamkitError(f"{out_dir} already holds a finished run; pass `overwrite` or choose another `out`")
    cache = FeatureCache.open(features_dir)
    manifest = cache.manifest
    positions = parse_layers(layers, cache.layers)
    if positions is None:
        positions = [len(cache.layers) - 1] if spec.one_layer else list(range(len(cache.layers)))
    config = decoder_config(decoder, len(positions), manifest["hidden_size"], len(cache.classes), heads, gaussians)
    lr = resolve_lr(lr, manifest)
    if batch_size is not None and batch_size < 1:
        raise DaamkitError(f"batch size must be at least 1, got {batch_size}")
    batch_size = batch_size or default_batch_size(manifest)
    plans = plan_splits(manifest.get("grouping"), open_sources(cache), seed=seed, runs=runs, dev_fraction=dev_fraction)
    run = {
        "version": 1,
        "features": str(Path(features_dir).resolve()),
        "cache": {key: manifest.get(key) for key in
                  ("task", "encoder", "encoder_config_hash", "classes", "hidden_size", "layers", "grouping",
                   "fingerprint")},
        "task": manifest.get("task"),
        "encoder": manifest.get("encoder"),
        "decoder": config.to_dict(),
        "method": method or (decoder if layers is None else f"{decoder} [layers {layers}]"),
        "layer_positions": positions,
        "layer_numbers": [cache.layers[p] for p in positions],
        "epochs": epochs or default_epochs(min(len(plan.train) for plan in plans), batch_size),
        "lr": lr,
        "batch_size": batch_size,
        "weight_decay": weight_decay,
        "loss": ("focal" if is_speech(manifest) else "ce") if loss == "auto" else loss,
        "dev_fraction": dev_fraction,
        "seed": seed,
        "runs": runs,
        "mixed_precision": resolve_mixed_precision(mixed_precision),
        "compile": compile,
    }
    if overwrite:  # only what a run writes; other files in the folder are left alone
        for folder in ("splits", "tensorboard", IMPORTANCE_DIR, LR_SEARCH_DIR):
            shutil.rmtree(out_dir / folder, ignore_errors=True)
        (out_dir / METRICS_FILE).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / RUN_FILE, run)
    context = load_run(out_dir)
    accelerator = make_accelerator(run["mixed_precision"], cpu=cpu)
    log(f"{run['method']}: {run['epochs']} epochs, batch {batch_size}, lr {lr}, "
        f"layers {','.join(map(str, run['layer_numbers']))}")
    history = {}
    plans = context.plans
    if run["lr"] == "auto":
        history[plans[0].name] = search_lr(context, plans[0], accelerator)
        plans = plans[1:]
    for plan in plans:
        history[plan.name] = _train_split(context, plan, accelerator)
    metrics = _finish_run(context, accelerator, history)
    if accelerator.is_main_process:
        atomic_write_json(out_dir / METRICS_FILE, metrics)
        if spec.density:
            write_importance(context, accelerator)
    accelerator.wait_for_everyone()
    return metrics


def search_lr(context: RunContext, plan: SplitPlan, accelerator) -> list[dict]:
    """`lr="auto"`: train `plan` once per learning rate of LR_GRID, keep the best by dev accuracy.

    The winner (highest best-epoch dev accuracy; ties go to the higher mean dev accuracy over all epochs,
    i.e. the faster, steadier learner) becomes the run's `lr` in run.json, its checkpoint is the split's
    best checkpoint, and every later split trains with it. Cost: len(LR_GRID) trainings of the first split.
    """
    run = context.run
    results = []
    for lr in LR_GRID:
        folder = context.run_dir / LR_SEARCH_DIR / f"lr{lr:g}"
        history = _train_split(context, plan, accelerator, lr=lr, checkpoint_dir=folder,
                               log_dir=f"{LR_SEARCH_DIR}/lr{lr:g}/{plan.name}")
        dev = [record["dev_accuracy"] for record in history]
        results.append({"lr": lr, "best_dev_accuracy": max(dev), "mean_dev_accuracy": sum(dev) / len(dev),
                        "history": history, "checkpoint": folder})
    winner = max(results, key=lambda r: (r["best_dev_accuracy"], r["mean_dev_accuracy"]))
    if accelerator.is_main_process:
        target = context.checkpoint_dir(plan.name)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(winner["checkpoint"], target)
        run["lr"] = winner["lr"]
        run["lr_search"] = {"split": plan.name, "grid": list(LR_GRID), "chosen": winner["lr"],
                            "dev_accuracy": {f"{r['lr']:g}": r["best_dev_accuracy"] for r in results}}
        atomic_write_json(context.run_dir / RUN_FILE, run)
    accelerator.wait_for_everyone()
    run["lr"] = winner["lr"]
    log(f"lr auto: {winner['lr']:g} (dev accuracy " +
        ", ".join(f"{r['lr']:g}: {r['best_dev_accuracy']:.3f}" for r in results) + ")")
    return winner["history"]


def _train_split(context: RunContext, plan: SplitPlan, accelerator, lr: Optional[float] = None,
                 checkpoint_dir: Optional[Path] = None, log_dir: Optional[str] = None) -> list[dict]:
    """Train one fold/run for the configured epochs; save the checkpoint of the best dev epoch.

    `lr`, `checkpoint_dir` and `log_dir` (under `tensorboard/`) override the run's for the lr search.
    """
    from accelerate.utils import set_seed
    from torch.utils.tensorboard import SummaryWriter

    run = context.run
    set_seed(plan.seed)
    model = build_decoder(DecoderConfig(**run["decoder"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr or run["lr"], weight_decay=run["weight_decay"])
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE
    )
    trained = torch.compile(model) if run["compile"] else model
    trained, optimizer = accelerator.prepare(trained, optimizer)
    source = context.sources[plan.train_source]
    batches = FeatureBatches(
        source.features, source.labels, plan.train, run["batch_size"], context.layer_positions, seed=plan.seed,
        pin_memory=accelerator.device.type == "cuda",
        shard=(accelerator.process_index, accelerator.num_processes),
    )
    loss_fn = focal_loss if run["loss"] == "focal" else F.cross_entropy
    log_dir = context.run_dir / "tensorboard" / (log_dir or plan.name)
    writer = SummaryWriter(str(log_dir)) if accelerator.is_main_process else None
    history, best = [], -1.0
    with progress_bar(f"{plan.name} train", total=run["epochs"] * len(batches)) as bar:
        for epoch in range(1, run["epochs"] + 1):
            trained.train()
            total, seen = 0.0, 0
            for features, labels, _ in batches:
                features = features.to(accelerator.device, non_blocking=True)
                labels = labels.to(accelerator.device, non_blocking=True)
                loss = loss_fn(trained(features).float(), labels)
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                optimizer.step()
                total, seen = total + loss.item() * len(labels), seen + len(labels)
                bar.advance(epoch=epoch, loss=total / seen, best_dev=max(best, 0.0))
            logits, indices = predict(trained, source, plan.dev, context.layer_positions, run["batch_size"],
                                      accelerator.device, accelerator.autocast)
            dev_accuracy = accuracy(logits, indices, source)
            scheduler.step(dev_accuracy)
            record = {"epoch": epoch, "train_loss": total / max(seen, 1), "dev_accuracy": dev_accuracy,
                      "lr": optimizer.param_groups[0]["lr"]}
            history.append(record)
            if writer is not None:
                for key in ("train_loss", "dev_accuracy", "lr"):
                    writer.add_scalar(key.replace("_", "/", 1), record[key], epoch)
            if dev_accuracy > best:  # first epoch with the highest dev accuracy wins
                best = dev_accuracy
                if accelerator.is_main_process:
                    save_checkpoint(
                        checkpoint_dir or split_checkpoint_dir(context.run_dir, plan.name),
                        model.state_dict(),
                        {"decoder": run["decoder"], "split": plan.name, "seed": plan.seed, "best_epoch": epoch,
                         "dev_accuracy": dev_accuracy, "layer_positions": context.layer_positions},
                    )
    if writer is not None:
        writer.close()
    accelerator.wait_for_everyone()
    return history


def _finish_run(context: RunContext, accelerator, history: dict[str, list[dict]]) -> dict:
    """metrics.json: test accuracy of each split's best checkpoint, parameter counts, Gaussian ranges."""
    run = context.run
    result = score_run(context, accelerator.device, accelerator.autocast, run["batch_size"])
    model = build_decoder(DecoderConfig(**run["decoder"]))
    ranges = [gaussian_parameter_ranges(load_split_decoder(context.checkpoint_dir(plan.name), torch.device("cpu")))
              for plan in context.plans]
    metrics = {
        **result,
        "method": run["method"],
        "decoder": run["decoder"]["decoder"],
        "task": run["task"],
        "encoder": run["encoder"],
        "layers": run["layer_numbers"],
        "seeds": [plan.seed for plan in context.plans],
        "epochs": run["epochs"],
        "lr": run["lr"],
        "decoder_parameters": count_parameters(model),
        "attention_parameters": attention_parameters(model),
        "history": history,
    }
    if ranges[0] is not None:
        metrics["gaussian_parameters"] = {
            key: {"min": min(r[key]["min"] for r in ranges), "max": max(r[key]["max"] for r in ranges)}
            for key in ("mean_offset", "scaled_variance")
        }
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(context.run_dir / "tensorboard" / "summary")) as writer:
            for index, entry in enumerate(metrics["accuracy"]["per_split"]):
                writer.add_scalar("test/accuracy", entry["accuracy"], index)
    log(f"test accuracy {metrics['accuracy']['mean']:.4f} +- {metrics['accuracy']['std']:.4f} "
        f"over {len(context.plans)} split(s)")
    return metrics
