"""The one split-training loop of DAT decoder and LoRA runs: epochs, dev selection, TensorBoard, exact resume.

A fold/run trains for `epochs` epochs with AdamW and ReduceLROnPlateau on the dev accuracy; the first
epoch with the highest dev accuracy is saved to `FOLDER/best` (`selection="best-epoch"`, the paper's
protocol), or the last epoch (`"last-epoch"`: the schedule has converged; on a dev split of a few dozen
items the highest of 35 noisy dev accuracies is mostly luck). After every epoch the whole training
state (trainable weights, optimizer, scheduler, shuffling and torch RNG, history) goes to `FOLDER/last`,
so an interrupted split continues from its last finished epoch and ends exactly as an uninterrupted one;
a finished split leaves `FOLDER/history.json` and is not trained again.

Each epoch's record holds the dev accuracy and `dev_loss`, the cross-entropy of the dev items. The lr
search (`pick_lr`) of a last-epoch DAT run ranks its candidates by `dev_loss`: on a dev split of a few
dozen items the accuracy moves in steps of 2-3 points and candidates tie, while the loss of the same
logits moves with every item's confidence. LoRA runs rank by the dev accuracy (see lora.py).

Each epoch's record also holds `chance_loss`, the loss of always predicting that epoch's class frequencies.
A split whose last training loss ends within `CHANCE_BAND` of it has collapsed to that constant
prediction (`collapsed`): on a user's few hundred items a density decoder with dropout 0.8 at `lr` 3e-4
does, and its test accuracy (22-44 % on the README walkthrough's sets) then says little about the decoder.
The runs name such splits (`warn_if_collapsed`) instead of leaving a low accuracy unexplained.

What differs between a DAT decoder and a LoRA model lives behind `SplitJob`; both pick `lr` auto the same
way (`pick_lr`).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from statistics import fmean
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from daamkit.infra.checkpoint import (
    atomic_write_json,
    load_config,
    load_training_state,
    load_weights,
    read_json,
    save_checkpoint,
)
from daamkit.infra.progress import log, progress_bar

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.5
PLATEAU_FACTOR, PLATEAU_PATIENCE = 0.5, 3
HISTORY_FILE = "history.json"
LR_SEARCH_DIR = "lr_search"  # a run folder's `pick_lr` candidates (and their TensorBoard folder)
CHANCE_BAND = 0.05  # a final training loss within this fraction of the chance-level loss: collapsed


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = FOCAL_ALPHA,
               gamma: float = FOCAL_GAMMA, reduction: str = "mean") -> torch.Tensor:
    """Multi-class focal loss, -alpha * (1 - p_t)^gamma * log p_t, mean over the batch (or per item: "none")."""
    log_p = F.log_softmax(logits.float(), dim=-1).gather(1, target[:, None]).squeeze(1)
    loss = -alpha * (1.0 - log_p.exp()).pow(gamma) * log_p
    return loss.mean() if reduction == "mean" else loss


def chance_loss(loss_fn, counts: torch.Tensor) -> float:
    """The mean loss of a model that ignores its input and predicts the class frequencies `counts` for every item."""
    frequencies = counts.double() / counts.sum()
    classes = torch.arange(len(counts))
    per_class = loss_fn(frequencies.log().expand(len(counts), -1), classes, reduction="none")
    return float((frequencies * per_class).nansum())


def collapsed(history: list[dict]) -> bool:
    """Whether the split's last training loss ended within CHANCE_BAND of the chance-level loss."""
    last = history[-1] if history else {}
    return "chance_loss" in last and abs(last["train_loss"] - last["chance_loss"]) <= CHANCE_BAND * last["chance_loss"]


def warn_if_collapsed(histories: dict[str, list[dict]], lr: float) -> list[str]:
    """The folds/runs that collapsed (`collapsed`), named in one warning line when there are any."""
    failed = [name for name, history in histories.items() if collapsed(history)]
    if failed:
        last = histories[failed[0]][-1]
        log(f"warning: {', '.join(failed)} collapsed to always predicting the class frequencies (training loss "
            f"{last['train_loss']:.3f}, that prediction's {last['chance_loss']:.3f}, in {failed[0]}), so the accuracy "
            f"says little about the model; raise the learning rate (it was {lr:g}) or train more epochs")
    return failed


class SplitJob(Protocol):
    """One fold/run of a DAT decoder or LoRA run, as the loop sees it."""

    rng: np.random.Generator  # shuffles the training items (its state is part of `last`)

    def build(self, lr: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """A fresh model (seeded) and its optimizer, not yet prepared by Accelerate."""

    def steps_per_epoch(self) -> int: ...

    def batches(self) -> Iterable[tuple[object, torch.Tensor]]:
        """(model inputs, labels on the device) of one epoch, shuffled with `rng`."""

    def after_first_step(self) -> None:
        """Checks that need one backward pass (LoRA: every adapter got a gradient)."""

    def dev_predictions(self) -> tuple[np.ndarray, np.ndarray]:
        """(logits [n, classes], labels [n]) of the dev items, in eval mode."""

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps (what trains, plus buffers such as BatchNorm statistics)."""

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def checkpoint_config(self) -> dict:
        """JSON saved beside the best weights (enough to rebuild the model)."""


def fit_split(job: SplitJob, *, epochs: int, lr: float, loss: str, accelerator, folder: Path, log_dir: Path,
              label: str, selection: str = "best-epoch") -> list[dict]:
    """Train `job` (or continue it from `folder/last`); returns the per-epoch history."""
    from torch.utils.tensorboard import SummaryWriter

    folder = Path(folder)
    if (folder / HISTORY_FILE).is_file():
        return read_json(folder / HISTORY_FILE)
    model, optimizer = job.build(lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=PLATEAU_FACTOR,
                                                           patience=PLATEAU_PATIENCE)
    history, best, start = [], -1.0, 1
    last = folder / "last"
    if (last / "state.pt").is_file():  # resume: everything the next epoch depends on
        job.load_checkpoint_state(load_weights(last))
        state = load_training_state(last)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        job.rng.bit_generator.state = state["shuffle_rng"]
        torch.set_rng_state(state["torch_rng"])
        history, best = load_config(last)["history"], state["best"]
        start = len(history) + 1
    trained, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = focal_loss if loss == "focal" else F.cross_entropy
    writer = SummaryWriter(str(log_dir), purge_step=start) if accelerator.is_main_process else None
    with progress_bar(label, total=epochs * job.steps_per_epoch(), completed=(start - 1) * job.steps_per_epoch()) as bar:
        for epoch in range(start, epochs + 1):
            trained.train()
            total, seen, counts = 0.0, 0, torch.zeros(0, dtype=torch.long)
            for inputs, labels in job.batches():
                batch_loss = loss_fn(trained(inputs).float(), labels)
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(batch_loss)
                optimizer.step()
                if epoch == 1 and seen == 0:
                    job.after_first_step()
                total, seen = total + batch_loss.item() * len(labels), seen + len(labels)
                counts = _add_counts(counts, labels)
                bar.advance(epoch=epoch, loss=total / seen, best_dev=max(best, 0.0))
            dev_accuracy, dev_loss = dev_scores(*job.dev_predictions())
            scheduler.step(dev_accuracy)
            record = {"epoch": epoch, "train_loss": total / max(seen, 1), "dev_accuracy": dev_accuracy,
                      "dev_loss": dev_loss, "lr": optimizer.param_groups[0]["lr"],
                      "chance_loss": chance_loss(loss_fn, counts)}
            history.append(record)
            if writer is not None:
                for key in ("train_loss", "dev_accuracy", "dev_loss", "lr"):
                    writer.add_scalar(key.replace("_", "/", 1), record[key], epoch)
            if accelerator.is_main_process:
                keep = epoch == epochs if selection == "last-epoch" else dev_accuracy > best  # first highest wins
                if keep:
                    save_checkpoint(folder / "best", job.checkpoint_state(),
                                    {**job.checkpoint_config(), "best_epoch": epoch, "dev_accuracy": dev_accuracy})
                save_checkpoint(last, job.checkpoint_state(), {"history": history}, _training_state(
                    optimizer, scheduler, job, max(best, dev_accuracy)))
            best = max(best, dev_accuracy)
    if writer is not None:
        writer.close()
    if accelerator.is_main_process:
        atomic_write_json(folder / HISTORY_FILE, history)
    accelerator.wait_for_everyone()
    return history


def dev_scores(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of dev logits against their labels."""
    logits_t = torch.as_tensor(logits, dtype=torch.float64)
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    return float((logits_t.argmax(1) == labels_t).double().mean()), float(F.cross_entropy(logits_t, labels_t))


def pick_lr(train: Callable[[float, Path], list[dict]], *, grid: Sequence[float], selection: str, late_epochs: int,
            folder: Path, split_dir: Path, accelerator, by_loss: bool = True) -> tuple[float, list[dict], dict]:
    """`lr` auto for one fold/run: `train(lr, folder / "lr<lr>")` once per lr of `grid` (each candidate resumes
    like any split), and keep the winner:
    - last-epoch selection: the lowest mean dev loss over the last `late_epochs` epochs (the converged model;
      the module docstring says why the loss), or with `by_loss=False` the highest mean dev accuracy there;
    - best-epoch selection: the highest best-epoch dev accuracy (the paper's criterion).
    A candidate whose dev loss is not finite (it diverged) ranks last; ties go to the higher mean dev accuracy
    over all epochs; a search with a candidate trained before `dev_loss` was recorded ranks by accuracy. The
    winner's kept checkpoint and history become the split's (`split_dir`), so a resumed run does not train
    it again. Returns (its lr, its history, the search record for the run's settings file)."""
    histories = {lr: train(lr, folder / f"lr{lr:g}") for lr in grid}
    by_loss = by_loss and selection == "last-epoch" and all(
        "dev_loss" in record for history in histories.values() for record in history[-late_epochs:])
    criterion = "dev_loss" if by_loss else "dev_accuracy"

    def value(history: list[dict]) -> float:
        values = [record[criterion] for record in history]
        return max(values) if selection == "best-epoch" else fmean(values[-late_epochs:])

    def rank(lr: float) -> tuple[float, float]:  # a lower loss, a higher accuracy wins; a diverged (NaN) one never
        score = -value(histories[lr]) if by_loss else value(histories[lr])
        return (score if math.isfinite(score) else -math.inf), fmean(r["dev_accuracy"] for r in histories[lr])

    lr = max(grid, key=rank)
    history = histories[lr]
    if accelerator.is_main_process:
        shutil.rmtree(split_dir / "best", ignore_errors=True)
        shutil.copytree(folder / f"lr{lr:g}" / "best", split_dir / "best")
        atomic_write_json(split_dir / HISTORY_FILE, history)
    accelerator.wait_for_everyone()
    scores = {f"{candidate:g}": value(histories[candidate]) for candidate in grid}
    what = ("best dev accuracy" if selection == "best-epoch"
            else f"mean {criterion.replace('_', ' ')} of the last {late_epochs} epochs")
    log(f"lr auto: {lr:g} ({what}: " + ", ".join(f"{name}: {score:.3f}" for name, score in scores.items()) + ")")
    return lr, history, {"split": split_dir.name, "grid": list(grid), "chosen": lr, criterion: scores}


def _add_counts(counts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Running per-class label counts (grown to the largest label seen)."""
    batch = torch.bincount(labels.detach().flatten().cpu())
    size = max(len(counts), len(batch))
    return F.pad(counts, (0, size - len(counts))) + F.pad(batch, (0, size - len(batch)))


def _training_state(optimizer, scheduler, job: SplitJob, best: float) -> dict:
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "shuffle_rng": job.rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "best": best}
