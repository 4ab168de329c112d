"""The one split-training loop of DAT decoder and LoRA runs: epochs, dev selection, TensorBoard, exact resume.

A fold/run trains for `epochs` epochs with AdamW and ReduceLROnPlateau on the dev accuracy; the first
epoch with the highest dev accuracy is saved to `FOLDER/best` (`selection="best-epoch"`, the paper's
protocol), or the last epoch (`"last-epoch"`: the schedule has converged; on a dev split of a few dozen
items the highest of 35 noisy dev accuracies is mostly luck). After every epoch the whole training
state (trainable weights, optimizer, scheduler, shuffling and torch RNG, history) goes to `FOLDER/last`,
so an interrupted split continues from its last finished epoch and ends exactly as an uninterrupted one;
a finished split leaves `FOLDER/history.json` and is not trained again.

What differs between a DAT decoder and a LoRA model lives behind `SplitJob`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Protocol

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
from daamkit.infra.progress import progress_bar

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.5
PLATEAU_FACTOR, PLATEAU_PATIENCE = 0.5, 3
HISTORY_FILE = "history.json"


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = FOCAL_ALPHA,
               gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """Multi-class focal loss, mean over the batch: -alpha * (1 - p_t)^gamma * log p_t."""
    log_p = F.log_softmax(logits.float(), dim=-1).gather(1, target[:, None]).squeeze(1)
    return (-alpha * (1.0 - log_p.exp()).pow(gamma) * log_p).mean()


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

    def dev_accuracy(self) -> float: ...

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
            total, seen = 0.0, 0
            for inputs, labels in job.batches():
                batch_loss = loss_fn(trained(inputs).float(), labels)
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(batch_loss)
                optimizer.step()
                if epoch == 1 and seen == 0:
                    job.after_first_step()
                total, seen = total + batch_loss.item() * len(labels), seen + len(labels)
                bar.advance(epoch=epoch, loss=total / seen, best_dev=max(best, 0.0))
            dev_accuracy = job.dev_accuracy()
            scheduler.step(dev_accuracy)
            record = {"epoch": epoch, "train_loss": total / max(seen, 1), "dev_accuracy": dev_accuracy,
                      "lr": optimizer.param_groups[0]["lr"]}
            history.append(record)
            if writer is not None:
                for key in ("train_loss", "dev_accuracy", "lr"):
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


def _training_state(optimizer, scheduler, job: SplitJob, best: float) -> dict:
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "shuffle_rng": job.rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "best": best}
