"""LoRA and LoRA+ baselines: the encoder itself fine-tuned through `peft` adapters plus a linear head.

The model is the same frozen Hugging Face encoder the DAT decoders read features from (loaded through
`FrozenEncoder`, with its own processor), LoRA adapters on its attention query/key projections (BEiT and
BERT `query`/`key`, Llama `q_proj`/`k_proj`), the exact masked mean of its last hidden state and one
Linear layer. Only the adapters and the head train; the encoder stays in eval mode (no dropout,
LayerDrop or SpecAugment), so the only thing that changes is what the adapters learn.

Hugging Face WavLM attention hands `q_proj.weight`, `k_proj.weight`, `v_proj.weight` and
`out_proj.weight` straight to `F.multi_head_attention_forward`, so adapters on those modules never see
a gradient; WavLM therefore defaults to its feed-forward `intermediate_dense`/`output_dense`, and any
adapter that gets no gradient in the first step stops the run with one clear error.

The protocol is the one of `classify train`: the same folds (IEMOCAP) or seeded runs, the same dev split
carved from the training pool, the same data-dependent defaults (`lr` auto, the epoch floor, 3 runs and
the last epoch on a user's small task; the paper's recipe on its tasks), and the same `metrics.json`
shape, so `classify report` puts LoRA rows in the DAT tables.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from daamkit.classify.datasets import DatasetSplit, TaskData, check_task, in_cache_order, load_task
from daamkit.classify.encoders import FrozenEncoder, masked_mean
from daamkit.classify.evaluation import accuracy, accuracy_block, has_utterances, utterance_accuracy
from daamkit.classify.experiment import (
    LATE_EPOCHS,
    LORA_FILE,
    LORA_PAPER_EPOCHS,
    LR_GRID,
    METRICS_FILE,
    check_new_run_folder,
    default_batch_size,
    default_epochs,
    is_paper_task,
    is_speech,
    make_accelerator,
    plan_splits,
    resolve_lr,
    resolve_mixed_precision,
    resolve_runs,
    resolve_selection,
    resumable_settings,
    split_checkpoint_dir,
)
from daamkit.classify.feature_cache import FeatureSplit
from daamkit.classify.protocol import SplitPlan
from daamkit.classify.run_config import LoRARunConfig
from daamkit.classify.split_loop import LR_SEARCH_DIR, fit_split, pick_lr, warn_if_collapsed
from daamkit.infra.checkpoint import atomic_write_json, load_config, load_weights, read_json
from daamkit.infra.errors import DaamkitError
from daamkit.infra.output_paths import output_folder
from daamkit.infra.progress import log

# Model types whose query/key adapters cannot train (see the module docstring) -> modules that do.
TARGET_PRESETS = {"wavlm": ("intermediate_dense", "output_dense")}
# Names of the attention query/key projections, tried in order on models without a preset.
QUERY_KEY_NAMES = (("q_proj", "k_proj"), ("query", "key"), ("q_lin", "k_lin"), ("q", "k"))


def default_target_modules(model: nn.Module) -> list[str]:
    """The modules LoRA adapts by default: the attention query/key projections (WavLM: its feed-forward)."""
    model_type = getattr(model.config, "model_type", "")
    if model_type in TARGET_PRESETS:
        return list(TARGET_PRESETS[model_type])
    linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    for pair in QUERY_KEY_NAMES:
        if set(pair) <= linear:
            return list(pair)
    raise DaamkitError(
        f"cannot find the attention query/key projections of this {model_type!r} model; name the Linear "
        f"modules to adapt with `target_modules` (it has: {', '.join(sorted(linear))})"
    )


class LoRAClassifier(nn.Module):
    """A peft-adapted encoder -> exact masked mean of its last hidden state -> Linear(hidden, classes)."""

    def __init__(self, encoder: nn.Module, hidden_size: int, num_classes: int,
                 model_inputs: Callable[[dict, torch.device], dict]):
        super().__init__()
        self.encoder, self.model_inputs = encoder, model_inputs  # model_inputs: FrozenEncoder.model_inputs
        self.head = nn.Linear(hidden_size, num_classes)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True) -> "LoRAClassifier":
        """Only the head follows `mode`; the encoder stays in eval mode (no dropout/LayerDrop/SpecAugment)."""
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, prepared) -> torch.Tensor:
        """Logits `[B, classes]` for a `FrozenEncoder.prepare` batch (its parts are put back in row order)."""
        device = self.head.weight.device
        pooled, rows = [], []
        for part_rows, inputs, lengths in prepared.parts:
            hidden = self.encoder(**self.model_inputs(inputs, device)).last_hidden_state
            pooled.append(masked_mean(hidden, lengths))
            rows.extend(part_rows)
        features = torch.cat(pooled)[torch.argsort(torch.as_tensor(rows, device=device))]
        return self.head(features.to(self.head.weight.dtype))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter and head weights (everything that trains), detached on the CPU."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def parameter_counts(model: LoRAClassifier) -> dict[str, int]:
    """Trainable (adapters + head), adapter, head and frozen encoder parameter counts."""
    adapters = sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and "lora_" in name)
    head = sum(p.numel() for p in model.head.parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"trainable_parameters": adapters + head, "adapter_parameters": adapters, "head_parameters": head,
            "encoder_parameters": frozen}


def modules_without_gradient(model: nn.Module) -> list[str]:
    """Adapted modules none of whose LoRA parameters got a non-zero gradient (call after a backward pass).

    At initialisation lora_B is zero, so lora_A's first gradient is zero by design; a module is reported
    only when every one of its adapter parameters has no gradient or an all-zero one.
    """
    alive: dict[str, bool] = {}
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_" in name:
            module = name.split(".lora_", 1)[0]
            got = param.grad is not None and bool(param.grad.detach().ne(0).any())
            alive[module] = alive.get(module, False) or got
    return [module for module, ok in alive.items() if not ok]


def check_adapter_gradients(model: nn.Module, model_type: str, targets: Sequence[str]) -> None:
    """Stop with one clear error when some adapters received no gradient in the first step."""
    dead = modules_without_gradient(model)
    if not dead:
        return
    names = sorted({module.split("model.", 1)[-1] for module in dead})
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    hint = ""
    if model_type in TARGET_PRESETS:
        hint = (f"; {model_type} attention reads its projection weights directly, so adapters there cannot "
                f"train: use `target_modules` {','.join(TARGET_PRESETS[model_type])} (the default)")
    raise DaamkitError(
        f"LoRA adapters on {shown} received no gradient in the first step (target modules "
        f"{','.join(targets)}): the model's forward pass does not call these modules{hint}"
    )


def make_optimizer(model: LoRAClassifier, settings: dict) -> torch.optim.Optimizer:
    """AdamW over adapters + head; with LoRA+ through peft's helper (lora_B at `loraplus_ratio` x the lr)."""
    from peft.optimizers import create_loraplus_optimizer

    if settings["plus"]:
        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=settings["lr"],
                                         loraplus_lr_ratio=settings["loraplus_ratio"],
                                         loraplus_weight_decay=settings["weight_decay"])
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings["lr"],
                             weight_decay=settings["weight_decay"])


def _label_view(split: DatasetSplit) -> FeatureSplit:
    """A feature-less `FeatureSplit` of a dataset split, for the shared protocol and accuracy helpers."""
    return FeatureSplit(split.name, np.empty((len(split), 0, 0), np.float16), np.asarray(split.labels, np.int64),
                        split.items)


def task_plans(data: TaskData, *, seed: int, runs: int, dev_fraction: float
               ) -> tuple[dict[str, FeatureSplit], list[SplitPlan]]:
    """Label views of the task's splits and the folds/runs `classify train` plans for a cache of the same data.

    `data`'s splits must be in cache row order (`in_cache_order`), so the same seed, runs and dev fraction
    give the same train/dev/test items as a `classify train` run (IEMOCAP folds included).
    """
    views = {name: _label_view(split) for name, split in data.splits.items()}
    plans = plan_splits(data.grouping, views, seed=seed, runs=runs, dev_fraction=dev_fraction)
    return views, plans


def _batches(indices: np.ndarray, batch_size: int, rng: Optional[np.random.Generator]):
    order = indices if rng is None else rng.permutation(indices)
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


class _Job:
    """Everything one LoRA run needs across its folds/runs: data, encoder, settings, the accelerator."""

    def __init__(self, data: TaskData, views: dict[str, FeatureSplit], encoder: FrozenEncoder, settings: dict,
                 accelerator, out_dir: Path):
        self.data, self.views, self.encoder, self.settings = data, views, encoder, settings
        self.accelerator, self.out_dir = accelerator, out_dir
        self.splits = data.splits
        self.model_type = getattr(encoder.config, "model_type", "")

    def predict(self, model: LoRAClassifier, split_name: str, indices: np.ndarray) -> np.ndarray:
        """float32 logits `[n, classes]` for `indices` of a split, in index order."""
        split, logits = self.splits[split_name], []
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch in _batches(indices, self.settings["batch_size"], None):
                with self.accelerator.autocast():
                    out = model(self.encoder.prepare([split.load(int(i)) for i in batch]))
                logits.append(out.float().cpu().numpy())
        model.train(was_training)
        return np.concatenate(logits)

    def adapt(self, base: nn.Module, seed: int) -> LoRAClassifier:
        """`base` with fresh (seeded) LoRA adapters and a fresh linear head."""
        from accelerate.utils import set_seed
        from peft import LoraConfig, get_peft_model

        s = self.settings
        set_seed(seed)
        config = LoraConfig(r=s["rank"], lora_alpha=s["alpha"], lora_dropout=0.0, target_modules=s["target_modules"])
        try:
            with warnings.catch_warnings():  # peft calls a transformers API that transformers deprecated
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                adapted = get_peft_model(base, config)
        except ValueError as err:
            raise DaamkitError(f"cannot add LoRA adapters to {self.encoder.name}: {str(err).splitlines()[0]}") from err
        return LoRAClassifier(adapted, self.encoder.hidden_size, len(self.data.classes), self.encoder.model_inputs)

    def train_split(self, base: nn.Module, plan: SplitPlan) -> tuple[list[dict], dict, nn.Module]:
        """Train one fold/run (or continue it; with `lr` auto, once per lr of LR_GRID, `pick_lr`); returns
        (history, test scores of its kept checkpoint, the base model back without adapters)."""
        s = self.settings
        selection = s["selection"]

        def train(lr: float, folder: Path, log_dir: Path, label: str) -> list[dict]:
            nonlocal base
            split_job = _LoRASplitJob(self, base, plan)
            history = fit_split(split_job, epochs=s["epochs"], lr=lr, loss=s["loss"], accelerator=self.accelerator,
                                folder=folder, log_dir=log_dir, label=label, selection=selection)
            if split_job.model is not None:
                base = split_job.model.encoder.unload()
            return history

        if s["lr"] == "auto":
            # Ranked by the late dev accuracy, not the dev loss DAT runs use: a fine-tuned encoder's predictions
            # at a higher lr are confident, and the loss then punishes its few errors. Ranked by loss, LoRA took
            # a lower lr on two of the README's five sets and lost 1.9 and 1.0 points of test accuracy there.
            lr, history, search = pick_lr(
                lambda lr, folder: train(lr, folder, self.out_dir / "tensorboard" / LR_SEARCH_DIR / folder.name /
                                         plan.name, f"{plan.name} LoRA lr {lr:g}"),
                grid=LR_GRID, selection=selection, late_epochs=LATE_EPOCHS, folder=self.out_dir / LR_SEARCH_DIR,
                split_dir=split_checkpoint_dir(self.out_dir, plan.name).parent, accelerator=self.accelerator,
                by_loss=False)
            s.update(lr=lr, lr_search=search)
            if self.accelerator.is_main_process:
                atomic_write_json(self.out_dir / LORA_FILE, s)
        else:
            history = train(s["lr"], split_checkpoint_dir(self.out_dir, plan.name).parent,
                            self.out_dir / "tensorboard" / plan.name, f"{plan.name} LoRA")
        model = self.adapt(base, plan.seed)
        scores = self.score(model, plan)
        return history, {**scores, "counts": parameter_counts(model)}, model.encoder.unload()

    def score(self, model: LoRAClassifier, plan: SplitPlan) -> dict:
        """Test accuracy (and utterance accuracy for chunked audio) of the split's best checkpoint."""
        best = split_checkpoint_dir(self.out_dir, plan.name)
        model.load_state_dict(load_weights(best), strict=False)
        saved = load_config(best)
        base = {"name": plan.name, "dev_accuracy": saved["dev_accuracy"], "best_epoch": saved["best_epoch"]}
        view = self.views[plan.test_source]
        logits = self.predict(model, plan.test_source, plan.test)
        scores = {"accuracy": {**base, "accuracy": accuracy(logits, plan.test, view)}}
        if has_utterances(view):
            scores["utterance_accuracy"] = {**base, "accuracy": utterance_accuracy(logits, plan.test, view)}
        return scores


class _LoRASplitJob:
    """One fold/run of a LoRA run for `fit_split`: encoder batches, dev predictions, adapter + head state."""

    def __init__(self, job: _Job, base: nn.Module, plan: SplitPlan):
        self.job, self.base, self.plan = job, base, plan
        self.rng = np.random.default_rng(plan.seed)
        self.model: Optional[LoRAClassifier] = None

    def build(self, lr: float):
        self.model = self.job.adapt(self.base, self.plan.seed)
        return self.model, make_optimizer(self.model, {**self.job.settings, "lr": lr})

    def steps_per_epoch(self) -> int:
        return len(_batches(self.plan.train, self.job.settings["batch_size"], None))

    def batches(self):
        job, source = self.job, self.plan.train_source
        for batch in _batches(self.plan.train, job.settings["batch_size"], self.rng):
            prepared = job.encoder.prepare([job.splits[source].load(int(i)) for i in batch])
            yield prepared, torch.as_tensor(job.views[source].labels[batch], device=job.accelerator.device)

    def after_first_step(self) -> None:
        check_adapter_gradients(self.model, self.job.model_type, self.job.settings["target_modules"])

    def dev_predictions(self) -> tuple[np.ndarray, np.ndarray]:
        source = self.plan.train_source
        return self.job.predict(self.model, source, self.plan.dev), self.job.views[source].labels[self.plan.dev]

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.model)

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=False)

    def checkpoint_config(self) -> dict:
        s = self.job.settings
        return {"lora": {k: s[k] for k in ("rank", "alpha", "target_modules", "plus")}, "split": self.plan.name,
                "seed": self.plan.seed}


def _open_job(settings: dict, out_dir: Path, cpu: bool) -> tuple[_Job, nn.Module, list[SplitPlan]]:
    """The encoder, data (in cache row order), folds/runs and accelerator of a LoRA run's settings."""
    # runs written before `encoder_path` was recorded name the encoder only
    frozen = FrozenEncoder.from_pretrained(settings.get("encoder_path", settings.get("encoder")), dtype=settings["dtype"],
                                           device="cpu", trust_remote_code=settings.get("trust_remote_code", False))
    data = load_task(settings["task"], settings["data"], sampling_rate=frozen.sampling_rate or 16000,
                     max_items=settings["max_items"])
    data = replace(data, splits={name: in_cache_order(split, data.modality) for name, split in data.splits.items()})
    if data.modality != frozen.modality:
        raise DaamkitError(f"task {settings['task']} is {data.modality} data but {frozen.name} is a "
                           f"{frozen.modality} encoder")
    if "fingerprint" in settings and settings["fingerprint"] != data.fingerprint:
        raise DaamkitError(f"the data in {settings['data']} changed since the LoRA run in {out_dir} was trained")
    settings.setdefault("selection", "best-epoch")  # runs saved before `selection` existed kept the best epoch
    if settings["runs"] is None:  # a new run: resolved against the data like a `classify train` run's
        pool = data.splits.get("train", next(iter(data.splits.values())))
        settings["runs"] = resolve_runs(None, {"task": settings["task"], "grouping": data.grouping}, len(pool))
    views, plans = task_plans(data, seed=settings["seed"], runs=settings["runs"], dev_fraction=settings["dev_fraction"])
    if settings["epochs"] is None:
        settings["epochs"] = (LORA_PAPER_EPOCHS if is_paper_task(settings) else
                              default_epochs(min(len(plan.train) for plan in plans), settings["batch_size"],
                                             paper_epochs=LORA_PAPER_EPOCHS))
    accelerator = make_accelerator(settings["mixed_precision"], cpu=cpu)
    return _Job(data, views, frozen, settings, accelerator, out_dir), frozen.load(), plans


def train_lora(task: Optional[str], data_dir: Optional[str | Path], encoder: Optional[str], out_dir: str | Path, *,
               resume: bool = False, overwrite: bool = False, cpu: bool = False, trust_remote_code: bool = False,
               **options) -> dict:
    """Fine-tune `encoder` with LoRA (or LoRA+ with `plus`) on `task`; write the run to `out_dir`, return metrics.

    `options` are the fields of `LoRARunConfig`. Folds/runs, seeds and dev splits are those `classify
    train` uses for the same task data (with the same `max_items`, `seed`, `runs` and `dev_fraction`), and so
    are the defaults resolved against the data: on a user's task `lr` auto (LR_GRID, on the first split),
    at least MIN_TRAIN_STEPS optimizer steps, 3 runs on a small pool and the last epoch kept; on the paper's
    tasks the paper's recipe (lr 1e-4, 5e-5 for Llama; 3 epochs; one run; the best dev epoch).
    `target_modules` defaults to the attention query/key projections (WavLM: its feed-forward, see the
    module docstring). With `resume`, the run saved in `out_dir` continues with its settings (`task`,
    `data_dir`, `encoder` and `options` unused; its data must be unchanged): finished folds/runs are kept and
    the interrupted one goes on from its last finished epoch, exactly as an uninterrupted run.
    """
    out_dir = output_folder(out_dir)  # a file in the way is refused before anything is read
    if resume:
        settings = resumable_settings(out_dir, LORA_FILE)
        job, base, plans = _open_job(settings, out_dir, cpu)
    else:
        settings = _new_settings(task, data_dir, encoder, trust_remote_code, LoRARunConfig(**options))
        check_new_run_folder(out_dir, LORA_FILE, overwrite)
        for folder in ("splits", "tensorboard", LR_SEARCH_DIR):  # a new run never continues an old one's epochs
            shutil.rmtree(out_dir / folder, ignore_errors=True)
        (out_dir / METRICS_FILE).unlink(missing_ok=True)
        job, base, plans = _open_job(settings, out_dir, cpu)
        targets = settings["target_modules"] or default_target_modules(base)
        settings.update({"encoder": job.encoder.name, "classes": job.data.classes,
                         "fingerprint": job.data.fingerprint, "target_modules": targets})
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / LORA_FILE, settings)
    log(f"{settings['method']} on {job.encoder.name}: adapting {', '.join(settings['target_modules'])}, "
        f"{settings['epochs']} epochs, lr {settings['lr']}, batch {settings['batch_size']}, keeps the "
        f"{settings['selection']}, {len(plans)} {'fold' if job.data.grouping else 'seeded run'}(s)"
        + (" (resumed)" if resume else ""))
    history, scores = {}, []
    for plan in plans:
        history[plan.name], split_scores, base = job.train_split(base, plan)
        scores.append(split_scores)
    metrics = _metrics(settings, plans, history, scores)
    atomic_write_json(out_dir / METRICS_FILE, metrics)
    log(f"test accuracy {metrics['accuracy']['mean']:.4f} +- {metrics['accuracy']['std']:.4f} "
        f"over {len(plans)} split(s)")
    return metrics


def _new_settings(task: Optional[str], data_dir: Optional[str | Path], encoder: Optional[str],
                  trust_remote_code: bool, config: LoRARunConfig) -> dict:
    """lora.json of a new run before its encoder is opened: the config as given, and the values resolved."""
    if task is None or data_dir is None or encoder is None:
        raise DaamkitError("a new LoRA run needs `task`, `data` and `encoder` (or `resume` to continue one)")
    check_task(task)
    task_info = {"task": task, "encoder": encoder}
    return {
        **config.to_dict(), "config": config.to_dict(), "task": task, "data": str(Path(data_dir).resolve()),
        "encoder_path": encoder, "trust_remote_code": trust_remote_code,
        "loraplus_ratio": config.loraplus_ratio if config.plus else None,
        "lr": resolve_lr(config.lr, task_info),
        "selection": resolve_selection(config.selection, task_info),
        "batch_size": config.batch_size or default_batch_size(task_info),
        "loss": ("focal" if is_speech(task_info) else "ce") if config.loss == "auto" else config.loss,
        "mixed_precision": resolve_mixed_precision(config.mixed_precision),
        "method": config.method or f"{'LoRA+' if config.plus else 'LoRA'} (r={config.rank})",
        "target_modules": list(config.target_modules) if config.target_modules else None,
    }


def evaluate_lora(run_dir: str | Path, cpu: bool = False) -> dict:
    """Re-score a saved LoRA run (`classify evaluate`): every fold/run's best adapters on its test items."""
    run_dir = Path(run_dir)
    settings = read_json(run_dir / LORA_FILE, f"{run_dir} is not a LoRA run folder ({LORA_FILE} is missing)")
    job, base, plans = _open_job(settings, run_dir, cpu)
    scores = []
    for plan in plans:
        if not split_checkpoint_dir(run_dir, plan.name).is_dir():
            raise DaamkitError(f"run {run_dir} has no checkpoint for split {plan.name}")
        model = job.adapt(base, plan.seed)
        scores.append(job.score(model, plan))
        base = model.encoder.unload()
    result = {"accuracy": accuracy_block([s["accuracy"] for s in scores])}
    if "utterance_accuracy" in scores[0]:
        result["utterance_accuracy"] = accuracy_block([s["utterance_accuracy"] for s in scores])
    return result


def _metrics(settings: dict, plans: list[SplitPlan], history: dict, scores: list[dict]) -> dict[str, Any]:
    """metrics.json in the shape of `classify train` (accuracy blocks, method, task, encoder) plus LoRA details."""
    metrics: dict[str, Any] = {"accuracy": accuracy_block([s["accuracy"] for s in scores])}
    if "utterance_accuracy" in scores[0]:
        metrics["utterance_accuracy"] = accuracy_block([s["utterance_accuracy"] for s in scores])
    metrics.update({
        "method": settings["method"],
        "decoder": None,
        "task": settings["task"],
        "encoder": settings["encoder"],
        "layers": None,
        "seeds": [plan.seed for plan in plans],
        "epochs": settings["epochs"],
        "attention_parameters": None,
        **scores[0]["counts"],
        "lora": {key: settings[key] for key in ("rank", "alpha", "plus", "loraplus_ratio", "target_modules", "lr")},
        "history": history,
        "collapsed": warn_if_collapsed(history, settings["lr"]),
    })
    return metrics
