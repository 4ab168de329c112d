"""Training DAT decoders on a feature cache, with the paper's defaults and an honest protocol.

`train_decoder` trains one model per fold (IEMOCAP) or per run (train/test tasks) through the shared
split loop (`split_loop.fit_split`), keeps each one's best epoch by accuracy on a dev split carved from
its training pool (never the test items) or, on a user's task, its last epoch (`selection`), re-scores
that checkpoint on the test items, and writes
`run.json`, `metrics.json`, the checkpoints, TensorBoard logs and (for DAAM decoders) the Importance
Factor outputs into the run folder. `resume=True` continues an interrupted run exactly.
"""

from __future__ import annotations

import shutil
from statistics import fmean
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from daamkit.classify.batches import FeatureBatches
from daamkit.classify.decoders import (
    attention_parameters,
    build_decoder,
    check_decoder,
    count_parameters,
    decoder_config,
    gaussian_parameter_ranges,
    layer_mix_shares,
)
from daamkit.classify.evaluation import load_split_decoder, predict, score_run
from daamkit.classify.experiment import (
    LATE_EPOCHS,
    LR_GRID,
    METRICS_FILE,
    RUN_FILE,
    RunContext,
    check_new_run_folder,
    default_batch_size,
    default_epochs,
    is_speech,
    load_run,
    make_accelerator,
    open_sources,
    plan_splits,
    resolve_dropout,
    resolve_head,
    resolve_lr,
    resolve_mixed_precision,
    resolve_residual,
    resolve_runs,
    resolve_selection,
    resumable_settings,
)
from daamkit.classify.feature_cache import FeatureCache
from daamkit.classify.importance import IMPORTANCE_DIR, write_importance
from daamkit.classify.protocol import SplitPlan, parse_layers
from daamkit.classify.run_config import DecoderRunConfig
from daamkit.classify.split_loop import LR_SEARCH_DIR, fit_split, pick_lr, warn_if_collapsed
from daamkit.infra.checkpoint import atomic_write_json
from daamkit.infra.errors import DaamkitError
from daamkit.infra.output_paths import output_folder
from daamkit.infra.progress import log

RUN_OUTPUTS = ("splits", "tensorboard", IMPORTANCE_DIR, LR_SEARCH_DIR)  # what a run writes besides JSON files


def train_decoder(features_dir: Optional[str | Path], decoder: Optional[str], out_dir: str | Path, *,
                  resume: bool = False, overwrite: bool = False, cpu: bool = False, **options) -> dict:
    """Train `decoder` on the cache in `features_dir`; write the run into `out_dir` and return its metrics.

    `options` are the fields of `DecoderRunConfig` (epochs, lr, layers, heads, ...). `layers` is a spec
    ("9", "19-21") of encoder layer numbers; None trains on every cached layer (the linear probe: on the
    last one). `lr` is a number or "auto" (chosen on the first split's dev items from `LR_GRID`); None is
    "auto" on a user's task and the paper's value (1e-4, 5e-5 for Llama) on the paper's tasks. `epochs`
    None is the paper's 35, raised to `MIN_TRAIN_STEPS` optimizer steps on a small training pool. `runs`
    None is 3 seeded runs on a user's train/test task under 5,000 training items, else 1 (`resolve_runs`).
    With `resume`, the run saved in `out_dir` continues (its settings; `features_dir`/`decoder` unused):
    finished folds/runs are kept and the interrupted one goes on from its last finished epoch.
    """
    out_dir = output_folder(out_dir)  # a file in the way is refused before anything is read
    if resume:
        run = resumable_settings(out_dir, RUN_FILE)
    else:
        config = DecoderRunConfig(decoder=decoder, **options)  # validates names before any file is read
        check_new_run_folder(out_dir, RUN_FILE, overwrite)
        run = _new_run(features_dir, config)
        for folder in RUN_OUTPUTS:  # only what a run writes; other files in the folder are left alone
            shutil.rmtree(out_dir / folder, ignore_errors=True)
        (out_dir / METRICS_FILE).unlink(missing_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / RUN_FILE, run)
    context = load_run(out_dir)
    accelerator = make_accelerator(run["mixed_precision"], cpu=cpu)
    log(f"{run['method']}: {run['epochs']} epochs, batch {run['batch_size']}, lr {run['lr']}, "
        f"layers {','.join(map(str, run['layer_numbers']))}, {context.decoder.head} head, "
        f"keeps the {context.selection}, {len(context.plans)} "
        f"{'fold' if run['cache'].get('grouping') else 'seeded run'}(s)"
        + (" (resumed)" if resume else ""))
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
        if check_decoder(run["decoder"]["decoder"]).density:
            write_importance(context, accelerator)
    accelerator.wait_for_everyone()
    return metrics


def _new_run(features_dir, config: DecoderRunConfig) -> dict:
    """run.json of a new run: the config as given, and every value resolved against the cache."""
    if features_dir is None:
        raise DaamkitError("`features` is required: the feature cache folder written by classify extract")
    cache = FeatureCache.open(features_dir)
    manifest = cache.manifest
    spec = check_decoder(config.decoder)
    positions = parse_layers(config.layers, cache.layers)
    if positions is None:
        positions = [len(cache.layers) - 1] if spec.one_layer else list(range(len(cache.layers)))
    decoder = decoder_config(config.decoder, len(positions), manifest["hidden_size"], len(cache.classes),
                             config.heads, config.gaussians, resolve_dropout(config.dropout, manifest, spec.one_layer),
                             config.head if spec.one_layer else resolve_head(config.head, manifest),
                             resolve_residual(config.residual, manifest, spec.residual))
    batch_size = config.batch_size or default_batch_size(manifest)
    sources = open_sources(cache)
    pool = sources["train"] if "train" in sources else next(iter(sources.values()))
    runs = resolve_runs(config.runs, manifest, len(pool))
    plans = plan_splits(manifest.get("grouping"), sources, seed=config.seed, runs=runs,
                        dev_fraction=config.dev_fraction)
    return {
        "version": 2,
        "config": config.to_dict(),
        "features": str(Path(features_dir).resolve()),
        "cache": {key: manifest.get(key) for key in
                  ("task", "encoder", "encoder_config_hash", "classes", "hidden_size", "layers", "grouping",
                   "fingerprint")},
        "task": manifest.get("task"),
        "encoder": manifest.get("encoder"),
        "decoder": decoder.to_dict(),
        "method": config.method or _method(config),
        "layer_positions": positions,
        "layer_numbers": [cache.layers[p] for p in positions],
        "epochs": config.epochs or default_epochs(min(len(plan.train) for plan in plans), batch_size),
        "lr": resolve_lr(config.lr, manifest),
        "batch_size": batch_size,
        "weight_decay": config.weight_decay,
        "loss": ("focal" if is_speech(manifest) else "ce") if config.loss == "auto" else config.loss,
        "selection": resolve_selection(config.selection, manifest),
        "dev_fraction": config.dev_fraction,
        "seed": config.seed,
        "runs": runs,
        "mixed_precision": resolve_mixed_precision(config.mixed_precision),
        "compile": config.compile,
    }


def _method(config: DecoderRunConfig) -> str:
    """The report row name: the decoder, with the layers, head and residual path when they were chosen by hand."""
    chosen = [f"{name} {value}" for name, value in (("layers", config.layers), ("head", config.head)) if value]
    if config.residual is not None:
        chosen.append("residual" if config.residual else "no residual")
    return config.decoder + (f" [{', '.join(chosen)}]" if chosen else "")


def search_lr(context: RunContext, plan: SplitPlan, accelerator) -> list[dict]:
    """`lr="auto"`: train `plan` once per learning rate of LR_GRID (`split_loop.pick_lr`); the winner becomes
    the run's `lr` in run.json, its checkpoint the split's, and every later split trains with it. Cost:
    len(LR_GRID) trainings of the first split."""
    run = context.run

    def train(lr: float, folder: Path) -> list[dict]:
        return fit_split(_DecoderJob(context, plan, accelerator), epochs=run["epochs"], lr=lr, loss=run["loss"],
                         accelerator=accelerator, folder=folder,
                         log_dir=context.run_dir / "tensorboard" / LR_SEARCH_DIR / folder.name / plan.name,
                         label=f"{plan.name} lr {lr:g}", selection=context.selection)

    lr, history, search = pick_lr(train, grid=LR_GRID, selection=context.selection, late_epochs=LATE_EPOCHS,
                                  folder=context.run_dir / LR_SEARCH_DIR,
                                  split_dir=context.checkpoint_dir(plan.name).parent, accelerator=accelerator)
    run.update(lr=lr, lr_search=search)
    if accelerator.is_main_process:
        atomic_write_json(context.run_dir / RUN_FILE, run)
    accelerator.wait_for_everyone()
    return history


def _train_split(context: RunContext, plan: SplitPlan, accelerator) -> list[dict]:
    """Train one fold/run with the run's lr; its best checkpoint lands in `splits/<name>/best`."""
    run = context.run
    return fit_split(_DecoderJob(context, plan, accelerator), epochs=run["epochs"], lr=run["lr"], loss=run["loss"],
                     accelerator=accelerator, folder=context.run_dir / "splits" / plan.name,
                     log_dir=context.run_dir / "tensorboard" / plan.name, label=f"{plan.name} train",
                     selection=context.selection)


class _DecoderJob:
    """One fold/run of a DAT decoder for `fit_split`: batches from the feature cache, dev predictions, state."""

    def __init__(self, context: RunContext, plan: SplitPlan, accelerator):
        self.context, self.plan, self.accelerator = context, plan, accelerator
        self.run = context.run
        self.source = context.sources[plan.train_source]
        self.feature_batches = FeatureBatches(
            self.source.features, self.source.labels, plan.train, self.run["batch_size"], context.layer_positions,
            seed=plan.seed, pin_memory=accelerator.device.type == "cuda",
            shard=(accelerator.process_index, accelerator.num_processes),
        )
        self.rng = self.feature_batches.rng
        self.model: Optional[torch.nn.Module] = None

    def build(self, lr: float):
        from accelerate.utils import set_seed

        set_seed(self.plan.seed)
        self.model = build_decoder(self.context.decoder)
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=self.run["weight_decay"])
        return (torch.compile(self.model) if self.run["compile"] else self.model), optimizer

    def steps_per_epoch(self) -> int:
        return len(self.feature_batches)

    def batches(self):
        device = self.accelerator.device
        for features, labels, _ in self.feature_batches:
            yield features.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    def after_first_step(self) -> None:
        """Nothing to check: every decoder parameter is reached by the loss."""

    def dev_predictions(self) -> tuple[np.ndarray, np.ndarray]:
        logits, indices = predict(self.model, self.source, self.plan.dev, self.context.layer_positions,
                                  self.run["batch_size"], self.accelerator.device, self.accelerator.autocast)
        return logits, self.source.labels[indices]

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def checkpoint_config(self) -> dict:
        return {"decoder": self.run["decoder"], "split": self.plan.name, "seed": self.plan.seed,
                "layer_positions": self.context.layer_positions}


def _finish_run(context: RunContext, accelerator, history: dict[str, list[dict]]) -> dict:
    """metrics.json: test accuracy of each split's best checkpoint, parameter counts, Gaussian ranges."""
    run = context.run
    result = score_run(context, accelerator.device, accelerator.autocast, run["batch_size"])
    kept = [load_split_decoder(context.checkpoint_dir(plan.name), torch.device("cpu")) for plan in context.plans]
    ranges = [gaussian_parameter_ranges(decoder) for decoder in kept]
    shares = [layer_mix_shares(decoder) for decoder in kept]
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
        "decoder_parameters": count_parameters(kept[0]),  # every split's decoder has the run's shape
        "attention_parameters": attention_parameters(kept[0]),
        "history": history,
        "collapsed": warn_if_collapsed(history, run["lr"]),
    }
    if ranges[0] is not None:
        metrics["gaussian_parameters"] = {
            key: {"min": min(r[key]["min"] for r in ranges), "max": max(r[key]["max"] for r in ranges)}
            for key in ("mean_offset", "scaled_variance")
        }
    if shares[0] is not None:  # the mix head's layer shares, mean over the splits, by encoder layer number
        metrics["layer_share"] = {str(number): fmean(split_shares) for number, split_shares in
                                  zip(run["layer_numbers"], zip(*shares))}
        log("layer shares of the mix head: " +
            ", ".join(f"{number} {share:.2f}" for number, share in metrics["layer_share"].items()))
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(context.run_dir / "tensorboard" / "summary")) as writer:
            for index, entry in enumerate(metrics["accuracy"]["per_split"]):
                writer.add_scalar("test/accuracy", entry["accuracy"], index)
    log(f"test accuracy {metrics['accuracy']['mean']:.4f} +- {metrics['accuracy']['std']:.4f} "
        f"over {len(context.plans)} split(s)")
    return metrics
