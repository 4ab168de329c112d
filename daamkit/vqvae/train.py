"""The VQ-VAE training loop on Hugging Face Accelerate (CPU, one GPU, or DDP via `accelerate launch`).

Run layout: `OUT/checkpoints/{last,best}/` (safetensors weights + config.json + state.pt),
`OUT/tb/` (TensorBoard) and `OUT/samples/*.png`. Resuming restores weights, optimizer, schedule, RNG and
the data position, so k steps + resume to N equals N uninterrupted steps. Ctrl-C (or SIGTERM) finishes
the current step and saves `last`; a non-finite loss stops the run before it can touch the weights.
"""

from __future__ import annotations

import math
import shutil
import signal
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from daamkit.infra.checkpoint import load_config, load_state_dict_strict, load_training_state, load_weights, save_checkpoint
from daamkit.infra.cpu_memory import reuse_freed_memory
from daamkit.infra.errors import DaamkitError
from daamkit.infra.output_paths import output_folder
from daamkit.infra.progress import log, progress_bar, set_quiet
from daamkit.vqvae.config import TrainConfig, VQVAEConfig, checkpoint_config, parse_checkpoint_config
from daamkit.vqvae.data import (CropDataset, StepBatchSampler, collate_train, read_skipped_list, sample_photos, to_tensor,
                                to_uint8, training_splits, write_skipped_list)
from daamkit.vqvae.discriminator import (DISC_WEIGHTS_FILE, LeCam, PatchDiscriminator, adaptive_weight,
                                         discriminator_loss, generator_loss)
from daamkit.vqvae.evaluate import evaluate_model, image_grid, side_by_side
from daamkit.vqvae.io import save_png
from daamkit.vqvae.losses import LPIPS_MIN_SIZE, load_lpips, reconstruction_loss
from daamkit.vqvae.metrics import psnr_per_image
from daamkit.vqvae.model import VQVAE
from daamkit.vqvae.quantizer import codebook_usage_and_perplexity
from daamkit.vqvae.weight_ema import EMA_WEIGHTS_FILE, WeightEMA

# Options that may change when a run is resumed; every other option must match the saved run.
RESUME_ADJUSTABLE = {"steps", "log_every", "eval_every", "val_images", "num_workers", "compile", "lpips_weights"}
GRID_IMAGES = 8


@dataclass
class RunPaths:
    root: Path

    @property
    def last(self) -> Path:
        return self.root / "checkpoints" / "last"

    @property
    def best(self) -> Path:
        return self.root / "checkpoints" / "best"

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def skipped(self) -> Path:
        return self.root / "skipped.txt"


@dataclass
class TrainResult:
    status: str                      # "completed" or "interrupted"
    step: int
    best_psnr: float | None
    metrics: dict | None             # validation metrics at the last evaluation of this run
    paths: RunPaths
    train_seconds: float = 0.0       # wall-clock spent in optimizer steps 1..step (kept across resumes)


class WarmupCosine:
    """LR factor: linear warm-up over `warmup` steps, then cosine decay to `min_ratio` at `total` steps."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class _StopRequest:
    """SIGINT/SIGTERM set a flag so the loop can finish its step and save; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            log("aborted without saving: checkpoints/last holds the last saved step")
            raise KeyboardInterrupt
        self.requested = True
        log("stop requested: saving a checkpoint after this step (Ctrl-C again aborts without saving)")

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def saved_run_configs(out_dir: str | Path) -> tuple[VQVAEConfig, TrainConfig]:
    """Model and training configs of the run in `out_dir` (its `checkpoints/last`), for `--resume`."""
    last = RunPaths(Path(out_dir)).last
    if not last.is_dir():
        raise DaamkitError(f"`resume`: no checkpoint at {last}; train without `resume` first")
    model_config, train_config = parse_checkpoint_config(load_config(last), str(last))
    if train_config is None:
        raise DaamkitError(f"`resume`: {last} has no training config to resume")
    return model_config, train_config


def _param_groups(model: VQVAE, weight_decay: float) -> list[dict]:
    """Weight decay on conv kernels only; biases, norms, DAAM parameters and the codebook are exempt."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and not name.startswith("quantizer.") else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _prepare_out_dir(paths: RunPaths, resume: bool, overwrite: bool) -> None:
    output_folder(paths.root)  # a file in the way is refused whatever the flags
    if resume:
        return
    if paths.last.exists():
        if not overwrite:
            raise DaamkitError(f"{paths.root} already holds a run; pass `resume` to continue it, "
                               "`overwrite` to start over, or another `out`")
        for folder in (paths.root / "checkpoints", paths.tb, paths.samples):
            shutil.rmtree(folder, ignore_errors=True)
        paths.skipped.unlink(missing_ok=True)


class Trainer:
    """One training run; `run()` drives the loop. Built by `train()`, or by `dry_run()` with `dry_run=True`:
    then no data is read, nothing is written, and LPIPS keeps a random trunk (same cost, no file needed)."""

    def __init__(self, model_config: VQVAEConfig, config: TrainConfig, out_dir: str | Path, resume: bool,
                 dry_run: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        if config.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise DaamkitError("`mixed_precision` fp16 needs a CUDA GPU; use bf16 or no on CPU")
        if config.perceptual_weight > 0 and config.image_size < LPIPS_MIN_SIZE:
            raise DaamkitError(f"`perceptual_weight` > 0 needs `image_size` >= {LPIPS_MIN_SIZE} (the LPIPS trunk "
                               "down-samples 32x)")
        self.model_config, self.config, self.paths = model_config, config, RunPaths(Path(out_dir))
        self.lpips = self._perceptual_model(dry_run) if config.perceptual_weight > 0 else None
        # Without a GPU, cpu=True lets torchrun / `accelerate launch` start a gloo process group (DDP on CPU).
        no_accelerator = not torch.cuda.is_available() and not torch.backends.mps.is_available()
        if no_accelerator:  # the step's large temporaries are then reused, not paged in again every step
            reuse_freed_memory()
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=no_accelerator)
        self.is_main = self.accelerator.is_main_process
        if not self.is_main:
            set_quiet(True)
        self.splits = None if dry_run else training_splits(config.data, config.image_size, config.seed,
                                                                   config.resize_mode)
        # every file left out, by name: the scan's, those that failed when first decoded, and (on resume)
        # those an earlier part of the run had already listed
        self.skipped = {str(path): reason for path, reason in self.splits.skipped} if self.splits else {}
        self._pending_failures: list[tuple[str, str]] = []  # this process's, not yet gathered
        if resume:
            self.skipped = {**read_skipped_list(self.paths.skipped), **self.skipped}
        set_seed(config.seed)
        device = self.accelerator.device
        model = VQVAE(model_config).to(device)
        optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.99))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupCosine(config.warmup_steps, config.steps, config.min_lr_ratio))
        self.step, self.best_psnr, self.stop_agreed = 0, None, False
        self.train_seconds = 0.0
        discriminator = disc_optimizer = None
        if config.gan:
            discriminator = PatchDiscriminator(model_config.in_channels, config.disc_channels, config.disc_layers).to(device)
            disc_optimizer = torch.optim.Adam(discriminator.parameters(), lr=config.discriminator_lr, betas=(0.5, 0.9))
        self.raw_discriminator = discriminator
        self.lecam = LeCam() if config.gan and config.lecam_weight > 0 else None
        self.weight_ema = WeightEMA(model, config.weight_ema) if config.weight_ema > 0 else None
        if resume:
            self._restore(model, optimizer, discriminator, disc_optimizer)
        if self.lpips is not None:
            self.lpips = self.lpips.to(device)
        if config.compile:
            model.encoder.compile()
            model.decoder.compile()
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.raw_model: VQVAE = model
        self.discriminator = self.disc_optimizer = None
        if discriminator is not None:  # its own DDP wrapper and optimizer
            self.discriminator, self.disc_optimizer = self.accelerator.prepare(discriminator, disc_optimizer)
        self.writer = None
        if self.is_main and not dry_run:
            from torch.utils.tensorboard import SummaryWriter

            # A killed run may have logged past its checkpoint: purge only the steps after it.
            self.writer = SummaryWriter(str(self.paths.tb), purge_step=self.step + 1 if resume else None)

    def _perceptual_model(self, random_trunk: bool) -> torch.nn.Module:
        try:
            return load_lpips(self.config.lpips_net, self.config.lpips_weights, random_trunk)
        except DaamkitError as err:
            raise DaamkitError(f"{err}; or train with `perceptual_weight` 0") from err

    # ----------------------------------------------------------------------------------- checkpoints
    def _restore(self, model: VQVAE, optimizer: torch.optim.Optimizer, discriminator: PatchDiscriminator | None,
                 disc_optimizer: torch.optim.Optimizer | None) -> None:
        last = self.paths.last
        load_state_dict_strict(model, load_weights(last), str(last))
        state = load_training_state(last)
        if state is None:
            raise DaamkitError(f"`resume`: {last} has no training state ({last / 'state.pt'} is missing)")
        missing = sorted({"step", "best_psnr", "optimizer", "scheduler", "torch_rng"} - set(state))
        if missing:
            raise DaamkitError(f"`resume`: {last / 'state.pt'} is not a daamkit training state (no {', '.join(missing)})")
        if self.config.steps < int(state["step"]):
            raise DaamkitError(f"`steps` {self.config.steps} is below the step the run in {self.paths.root} has "
                               f"reached ({state['step']}); give `steps` >= {state['step']} to continue it")
        optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.lr_lambdas[0].total = self.config.steps  # --steps may be extended on resume
        self.step, self.best_psnr = int(state["step"]), state["best_psnr"]
        self.train_seconds = float(state.get("train_seconds", 0.0))
        if discriminator is not None:
            load_state_dict_strict(discriminator, load_weights(last, name=DISC_WEIGHTS_FILE), str(last))
            disc_optimizer.load_state_dict(state["disc_optimizer"])
        if self.lecam is not None:
            self.lecam.load_state_dict(state["lecam"])
        if self.weight_ema is not None:
            load_state_dict_strict(self.weight_ema.module, load_weights(last, name=EMA_WEIGHTS_FILE), str(last))
        torch.set_rng_state(state["torch_rng"])
        if torch.cuda.is_available() and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        log(f"resumed {self.paths.root} at step {self.step}")

    def _save(self, directory: Path) -> None:
        state = {
            "step": self.step,
            "best_psnr": self.best_psnr,
            "train_seconds": self.train_seconds,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else {},
        }
        extra = {}
        if self.raw_discriminator is not None:
            extra[DISC_WEIGHTS_FILE] = self.raw_discriminator.state_dict()
            state["disc_optimizer"] = self.disc_optimizer.state_dict()
        if self.lecam is not None:
            state["lecam"] = self.lecam.state_dict()
        if self.weight_ema is not None:
            extra[EMA_WEIGHTS_FILE] = self.weight_ema.state_dict()
        save_checkpoint(directory, self.raw_model.state_dict(), checkpoint_config(self.model_config, self.config), state,
                        extra)

    def _save_last(self) -> None:
        if self.is_main:
            self._save(self.paths.last)
            self._write_skipped()
        self.accelerator.wait_for_everyone()

    # ---------------------------------------------------------------------------------- one step
    def _train_step(self, images: torch.Tensor, stop: _StopRequest) -> dict[str, torch.Tensor | float]:
        """Forward, finite check (agreed across processes, with the stop flag), backward, clip, step; then the
        discriminator's step (once `disc_start` is reached) and the weight-EMA update.

        Returns the step's statistics as detached tensors (`_step_metrics` turns them into numbers on logging
        steps only): the finite check is the step's one device sync, so the host queues the next step while
        the device still runs this one's backward."""
        self.model.train()
        gan_active = self.discriminator is not None and self.step >= self.config.disc_start
        extra: dict[str, torch.Tensor] = {}
        with self.accelerator.autocast():
            out = self.model(images)
            recon_loss = reconstruction_loss(self.config.recon_loss, out.reconstruction, images)
            nll = recon_loss
            perceptual = None
            if self.lpips is not None:
                perceptual = self.lpips(out.reconstruction.float(), images).mean()
                nll = nll + self.config.perceptual_weight * perceptual
            loss = nll + out.quant.loss
            if gan_active:
                adversarial, weight = self._adversarial_term(out.reconstruction, nll)
                loss = loss + self.config.disc_weight * weight * adversarial
                extra.update({"generator": adversarial.detach(), "adaptive_weight": weight})
        flags = torch.stack([(~torch.isfinite(loss.detach())).float(), torch.tensor(float(stop.requested), device=loss.device)])
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, "sum")
        non_finite, stop_requested = flags.tolist()  # one sync for both flags
        self.stop_agreed = stop_requested > 0  # every process stops after the same step
        if non_finite > 0:
            raise DaamkitError(self._non_finite_message(loss.item()))
        self.accelerator.backward(loss)
        grad_norm = None
        if self.config.grad_clip > 0:
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if gan_active:
            extra.update(self._discriminator_step(images, out.reconstruction.detach()))
        if self.weight_ema is not None:
            self.weight_ema.update(self.raw_model, self.step)
        stats = {
            "loss": loss.detach(), "recon": recon_loss.detach(), "commitment": out.quant.commitment.detach(),
            "psnr": psnr_per_image(out.reconstruction.detach(), images).mean(), "counts": out.quant.counts.detach(),
            "lr": self.scheduler.get_last_lr()[0],
        }
        if perceptual is not None:
            stats["perceptual"] = perceptual.detach()
        if grad_norm is not None:
            stats["grad_norm"] = grad_norm
        return {**stats, **extra}

    @staticmethod
    def _step_metrics(stats: dict[str, torch.Tensor | float]) -> dict[str, float]:
        """A step's statistics as numbers (one device sync for the scalars), with the batch's codebook usage
        and perplexity in place of its code histogram."""
        stats = dict(stats)
        usage, perplexity = codebook_usage_and_perplexity(stats.pop("counts"))
        tensors = {key: value for key, value in stats.items() if isinstance(value, torch.Tensor)}
        values = torch.stack([value.float().reshape(()) for value in tensors.values()]).tolist() if tensors else []
        return {**stats, **dict(zip(tensors, values)), "usage": usage, "perplexity": perplexity}

    def _adversarial_term(self, reconstruction: torch.Tensor, nll: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's adversarial loss and its adaptive weight (1 without `adaptive_disc_weight`).

        The discriminator is called unwrapped with its weights frozen, so this pass neither accumulates
        discriminator gradients nor counts as a DDP forward of it.
        """
        self.raw_discriminator.requires_grad_(False)
        try:
            adversarial = generator_loss(self.config.disc_loss, self.raw_discriminator(reconstruction).float())
        finally:
            self.raw_discriminator.requires_grad_(True)
        if not self.config.adaptive_disc_weight:
            return adversarial, torch.ones((), device=nll.device)
        return adversarial, adaptive_weight(nll, adversarial, self.raw_model.decoder.conv_out.weight)

    def _discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        """One discriminator update on real images and detached reconstructions (one forward over both, so
        DDP sees a single forward per backward; BatchNorm statistics per side, see PatchDiscriminator)."""
        with self.accelerator.autocast():
            logits_real, logits_fake = self.discriminator(torch.cat([real, fake]), batches=2).float().chunk(2)
            disc_loss = discriminator_loss(self.config.disc_loss, logits_real, logits_fake)
            stats = {"discriminator": disc_loss.detach()}
            if self.lecam is not None:
                lecam = self.lecam(logits_real, logits_fake)
                disc_loss = disc_loss + self.config.lecam_weight * lecam
                stats["lecam"] = lecam.detach()
        self.accelerator.backward(disc_loss)
        self.disc_optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)
        return {**stats, "logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}

    def _non_finite_message(self, value: float) -> str:
        where = (f"the last good checkpoint is {self.paths.last} (continue with `resume`)"
                 if self.paths.last.is_dir() else "no checkpoint had been written yet")
        return (f"loss became {value} at step {self.step + 1}; training stopped and this step was not saved; "
                f"{where}; try a lower `lr` or `mixed_precision` no")

    # ---------------------------------------------------------------------------------- logging
    def _log_train(self, stats: dict[str, float]) -> None:
        names = {"loss": "train/loss", "recon": "train/recon", "commitment": "train/commitment",
                 "perceptual": "train/perceptual", "psnr": "train/psnr", "grad_norm": "train/grad_norm",
                 "usage": "codebook/batch_usage", "perplexity": "codebook/batch_perplexity", "lr": "lr",
                 "generator": "gan/generator_loss", "adaptive_weight": "gan/adaptive_weight",
                 "discriminator": "gan/discriminator_loss", "lecam": "gan/lecam",
                 "logits_real": "gan/logits_real", "logits_fake": "gan/logits_fake"}
        for key, value in stats.items():
            self.writer.add_scalar(names[key], value, self.step)
        self.writer.add_scalar("data/skipped_images", len(self.skipped), self.step)

    def _validate(self) -> dict:
        """Validation metrics, TensorBoard images/histograms, a samples PNG, and the `last`/`best` checkpoints."""
        result = None
        if self.is_main:
            result = evaluate_model(self._evaluated_model, self.splits.val, self.accelerator.device,
                                    batch_size=self.config.batch_size, lpips_model=self.lpips,
                                    max_images=self.config.val_images, show_progress=False)
            for key, value in result.metrics.items():
                if value is not None and key != "num_images":
                    self.writer.add_scalar(f"val/{key}", value, self.step)
            grid = image_grid([result.originals[:GRID_IMAGES], result.reconstructions[:GRID_IMAGES]])
            self.writer.add_image("val/originals_vs_reconstructions", grid, self.step, dataformats="HWC")
            save_png(self.paths.samples / f"step_{self.step:06d}.png", grid)
            for name, param in self.raw_model.daam_parameters().items():
                self.writer.add_histogram(f"daam/{name}", param.detach().float().cpu(), self.step)
            self.writer.flush()
            psnr = result.metrics["psnr"]
            improved = self.best_psnr is None or psnr > self.best_psnr
            if improved:
                self.best_psnr = psnr
            self._save(self.paths.last)
            self._write_skipped()
            if improved:
                self._save(self.paths.best)
        self.accelerator.wait_for_everyone()
        return result.metrics if result else None

    @property
    def _evaluated_model(self) -> VQVAE:
        """What validation, `best` and the final pictures judge: the weight EMA when on (what `evaluate` uses)."""
        return self.weight_ema.module if self.weight_ema is not None else self.raw_model

    def _final_pictures(self) -> None:
        """`samples/final.png` (held-out crops) and, on the sample photos, one whole photo reconstructed."""
        last = self.paths.samples / f"step_{self.step:06d}.png"
        if last.is_file():
            shutil.copyfile(last, self.paths.samples / "final.png")
        if self.config.data != "samples":
            return
        factor = self.model_config.downsample_factor
        name, photo = sample_photos(self.config.image_size)[0]
        photo = photo[: photo.shape[0] - photo.shape[0] % factor, : photo.shape[1] - photo.shape[1] % factor]
        model = self._evaluated_model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            image = to_tensor(photo).unsqueeze(0).to(self.accelerator.device)
            recon = model(image).reconstruction
        model.train(was_training)
        save_png(self.paths.samples / f"{name}_full.png", side_by_side(to_uint8(image)[0], to_uint8(recon)[0]))

    # ---------------------------------------------------------------------------------- loop
    def _loader(self, dataset: CropDataset) -> DataLoader:
        sampler = StepBatchSampler(len(dataset), self.config.batch_size, self.config.seed, self.step,
                                   self.accelerator.process_index, self.accelerator.num_processes)
        # An own generator keeps the loader from drawing on the global RNG (saved for exact resume).
        return DataLoader(dataset, batch_sampler=sampler, num_workers=self.config.num_workers, collate_fn=collate_train,
                          pin_memory=self.accelerator.device.type == "cuda", generator=torch.Generator())

    def _gather_failures(self) -> None:
        """Files that failed when first decoded, on any process, reach the main one (one gather, called by
        every process at the same steps); each is warned about once and listed in skipped.txt."""
        failures, self._pending_failures = self._pending_failures, []
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            failures = gather_object(failures)
        for name, reason in failures:
            if name not in self.skipped:
                self.skipped[name] = reason
                log(f"warning: skipping {name}: {reason}")

    def _write_skipped(self) -> None:
        if self.is_main:
            write_skipped_list(self.paths.skipped, sorted(self.skipped.items()))

    def run(self) -> TrainResult:
        config = self.config
        log(f"training on {self.splits.description}; {self.raw_model.num_parameters():,} parameters, "
            f"attention={self.model_config.attention}, device={self.accelerator.device}, "
            f"processes={self.accelerator.num_processes}")
        status, metrics, evaluated_at = "completed", None, None
        batches = iter(self._loader(self.splits.train))
        shown: dict[str, float] = {}  # the progress bar's loss and PSNR, from the last logging step
        try:
            with _StopRequest() as stop, progress_bar("training", total=config.steps, completed=self.step) as task:
                while self.step < config.steps:
                    images, failures = next(batches)
                    images = images.to(self.accelerator.device, non_blocking=True)
                    self._pending_failures += failures
                    started = time.perf_counter()
                    stats = self._train_step(images, stop)
                    self.train_seconds += time.perf_counter() - started
                    self.step += 1
                    logging_step = self.step % config.log_every == 0 or self.step == 1
                    eval_step = self.step % config.eval_every == 0 or self.step == config.steps
                    if logging_step or eval_step or self.stop_agreed:
                        self._gather_failures()
                    if logging_step:  # the only steps whose statistics leave the device
                        values = self._step_metrics(stats)
                        shown = {"loss": values["loss"], "psnr": values["psnr"]}
                        if self.writer is not None:
                            self._log_train(values)
                    task.advance(**shown)
                    if eval_step:
                        metrics, evaluated_at = self._validate(), self.step
                    if self.stop_agreed:
                        self._save_last()
                        status = "interrupted"
                        break
            if status == "completed" and evaluated_at != self.step:  # resumed at/after the final step
                metrics = self._validate()
            if self.is_main and status == "completed":
                self._final_pictures()
        finally:
            self._write_skipped()
            if self.writer is not None:
                self.writer.close()
        if self.skipped:
            log(f"{len(self.skipped)} image file(s) were skipped; each is listed with its reason in {self.paths.skipped}")
        return TrainResult(status, self.step, self.best_psnr, metrics, self.paths, self.train_seconds)


    def measure(self, steps: int) -> dict[str, float | int]:
        """Run `steps` train steps on random images of the configured size with every loss of the recipe
        active (the step counter is set to `disc_start`); time the steps after the first (warm-up)."""
        device = self.accelerator.device
        shape = (self.config.batch_size, self.model_config.in_channels, self.config.image_size, self.config.image_size)
        generator = torch.Generator().manual_seed(self.config.seed)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.step = self.config.disc_start
        try:
            seconds = [self.timed_step((torch.rand(shape, generator=generator) * 2 - 1).to(device))
                       for _ in range(steps)]
        except (MemoryError, RuntimeError) as err:  # CUDA's OutOfMemoryError is a RuntimeError; so is the CPU allocator's
            if not isinstance(err, (MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in str(err):
                raise
            raise DaamkitError(f"`batch_size` {self.config.batch_size} at `image_size` {self.config.image_size} does "
                               f"not fit in {device} memory: lower `batch_size` or `image_size` (the cost of a step "
                               "scales with both)") from err
        ms_per_step = 1000 * statistics.median(seconds[1:] or seconds)
        tokens = (self.config.image_size // self.model_config.downsample_factor) ** 2
        return {
            "parameters": self.raw_model.num_parameters(),
            "discriminator_parameters": (sum(p.numel() for p in self.raw_discriminator.parameters())
                                         if self.raw_discriminator is not None else 0),
            "tokens_per_image": tokens,
            "ms_per_step": ms_per_step,
            "peak_memory_gib": _peak_memory_gib(device),
            "peak_memory_kind": "CUDA allocated" if device.type == "cuda" else "process resident set",
            "device": str(device),
            "steps": self.config.steps,
            "projected_hours": self.config.steps * ms_per_step / 3.6e6,
        }


    def timed_step(self, images: torch.Tensor) -> float:
        """Seconds of one train step on `images` (device work included); advances the step counter."""
        device = self.accelerator.device
        _synchronize(device)
        start = time.perf_counter()
        self._train_step(images, _StopRequest())
        _synchronize(device)
        self.step += 1
        return time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated on `device`, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


DRY_RUN_STEPS = 3


def dry_run(model_config: VQVAEConfig, config: TrainConfig) -> dict[str, float | int]:
    """What a run would cost, measured without data and without writing anything: builds the model (and
    the discriminator / LPIPS of the recipe), runs DRY_RUN_STEPS steps on random images, and projects the
    time of `steps` steps from the median of the steps after the first."""
    _check_image_size(model_config, config)
    return Trainer(model_config, config, Path("."), resume=False, dry_run=True).measure(DRY_RUN_STEPS)


def _check_image_size(model_config: VQVAEConfig, config: TrainConfig) -> None:
    if config.image_size % model_config.downsample_factor:
        raise DaamkitError(f"`image_size` {config.image_size} must be a multiple of {model_config.downsample_factor} "
                           f"(2^num-downsamples)")


def train(model_config: VQVAEConfig, config: TrainConfig, out_dir: str | Path, resume: bool = False,
          overwrite: bool = False) -> TrainResult:
    """Train (or with `resume`, continue) a VQ-VAE run in `out_dir`; returns how it ended."""
    _check_image_size(model_config, config)
    paths = RunPaths(Path(out_dir))
    _prepare_out_dir(paths, resume, overwrite)
    if resume:
        saved_model, _ = saved_run_configs(out_dir)
        if saved_model != model_config:
            raise DaamkitError(f"`resume`: the model options differ from the run saved in {paths.last}")
    return Trainer(model_config, config, out_dir, resume).run()
