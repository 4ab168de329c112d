"""Evaluation passes (PSNR, SSIM, LPIPS, codebook usage, perplexity) and side-by-side reconstructions."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from daamkit.infra.errors import DaamkitError
from daamkit.infra.output_paths import output_folder
from daamkit.infra.progress import log, progress_bar
from daamkit.vqvae.data import CropDataset, collate_valid, evaluation_set, to_uint8
from daamkit.vqvae.io import default_device, load_model, open_inputs, resolve_image_size, save_png
from daamkit.vqvae.config import RESIZE_MODES
from daamkit.vqvae.fid import fid_weights_path, load_fid, missing_fid_message, to_fid_input
from daamkit.vqvae.losses import LPIPS_MIN_SIZE, load_lpips
from daamkit.vqvae.metrics import CodeHistogram, psnr_per_image, ssim_per_image
from daamkit.vqvae.model import VQVAE
from daamkit.vqvae.reconstruction import reconstruct_image


@dataclass
class EvalResult:
    metrics: dict[str, float | int | None]
    originals: torch.Tensor | None        # the first batch, for picture grids
    reconstructions: torch.Tensor | None


@torch.no_grad()
def evaluate_model(model: VQVAE, dataset: CropDataset, device: torch.device, batch_size: int = 32,
                   lpips_model: torch.nn.Module | None = None, max_images: int | None = None,
                   show_progress: bool = True, fid_metric=None) -> EvalResult:
    """Mean per-image PSNR/SSIM (and LPIPS when a model is given) plus code usage over `dataset`; rFID of
    the reconstructions against the originals when a torchmetrics FID metric is given (else None)."""
    if max_images is not None and max_images < len(dataset):
        dataset = Subset(dataset, range(max_images))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_valid,
                        generator=torch.Generator())  # leaves the global RNG of a training run untouched
    was_training = model.training
    model.eval()
    histogram = CodeHistogram(model.config.num_embeddings)
    psnr_sum = ssim_sum = lpips_sum = 0.0
    count = failed = 0
    first: tuple[torch.Tensor, torch.Tensor] | None = None
    with progress_bar("evaluating", total=len(loader)) if show_progress else nullcontext() as task:
        for images, num_failed in loader:
            failed += num_failed
            if images is not None:
                images = images.to(device)
                out = model(images)
                recon = out.reconstruction.float().clamp(-1, 1)
                histogram.update(out.quant.indices)
                psnr_sum += float(psnr_per_image(recon, images).sum())
                ssim_sum += float(ssim_per_image(recon, images).sum())
                if lpips_model is not None:
                    lpips_sum += float(lpips_model(recon, images).sum())
                if fid_metric is not None:
                    fid_metric.update(to_fid_input(images), real=True)
                    fid_metric.update(to_fid_input(recon), real=False)
                count += images.shape[0]
                if first is None:
                    first = (images.cpu(), recon.cpu())
            if task is not None:
                task.advance()
    model.train(was_training)
    if failed:
        log(f"skipped {failed} image(s) that could not be decoded")
    if count == 0:
        raise DaamkitError("no image could be evaluated")
    usage, perplexity = histogram.usage_and_perplexity()
    metrics = {
        "psnr": psnr_sum / count,
        "ssim": ssim_sum / count,
        "lpips": lpips_sum / count if lpips_model is not None else None,
        "rfid": _rfid(fid_metric, count),
        "codebook_usage": usage,
        "perplexity": perplexity,
        "num_images": count,
    }
    return EvalResult(metrics, *(first if first else (None, None)))


def _rfid(fid_metric, count: int) -> float | None:
    if fid_metric is None:
        return None
    if count < 2:
        log("rfid reported as null: it needs at least 2 images")
        return None
    return float(fid_metric.compute())


def evaluate_checkpoint(checkpoint_dir: str | Path, data: str, image_size: int | None = None,
                        batch_size: int = 32, lpips_net: str = "alex",
                        raw_weights: bool = False, lpips_weights: str | Path | None = None,
                        fid_weights: str | Path | None = None, resize_mode: str = "auto") -> dict[str, float | int | None]:
    """Metrics of a checkpoint on `data` (samples held-out crops, COCO val2017, or a folder's images).

    LPIPS is null (None), with one note, when its trunk can be neither found nor downloaded; rFID likewise
    when the Inception weights are not on disk.
    """
    if batch_size < 1:
        raise DaamkitError(f"`batch_size` must be a positive integer, got {batch_size}")
    device = default_device()
    model, train_config = load_model(checkpoint_dir, device, raw_weights)
    size = resolve_image_size(model.config, train_config, image_size)
    if resize_mode not in RESIZE_MODES:
        raise DaamkitError(f"`resize_mode` must be one of {RESIZE_MODES}, got {resize_mode!r}")
    dataset = evaluation_set(data, size, resize_mode=resize_mode)
    fid_file = fid_weights_path(fid_weights)
    if fid_file is None:
        log(f"rfid reported as null: {missing_fid_message()}")
    fid_metric = load_fid(fid_file, device) if fid_file is not None else None
    return evaluate_model(model, dataset, device, batch_size, lpips_for_evaluation(lpips_net, size, device, lpips_weights),
                          fid_metric=fid_metric).metrics


def lpips_for_evaluation(lpips_net: str, image_size: int, device: torch.device,
                         lpips_weights: str | Path | None = None) -> torch.nn.Module | None:
    """The LPIPS model for reported metrics, or None (said once) when its trunk can be neither found nor
    downloaded or `image_size` is below its minimum: a metric is never computed with a random trunk."""
    if lpips_weights is not None and not Path(lpips_weights).is_file():
        raise DaamkitError(f"`lpips_weights` {lpips_weights} does not exist")
    if image_size < LPIPS_MIN_SIZE:
        log(f"lpips reported as null: images of {image_size} px are below its {LPIPS_MIN_SIZE} px minimum")
        return None
    try:
        return load_lpips(lpips_net, lpips_weights).to(device)
    except DaamkitError as err:
        log(f"lpips reported as null: {err}")
        return None


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 4) -> np.ndarray:
    """Two HWC uint8 images of equal height joined with a white gap."""
    spacer = np.full((left.shape[0], gap, 3), 255, dtype=np.uint8)
    return np.concatenate([left, spacer, right], axis=1)


def image_grid(rows: Sequence[torch.Tensor], gap: int = 2) -> np.ndarray:
    """Rows of [N, 3, H, W] images in [-1, 1] stacked as one uint8 picture (white gaps)."""
    from torchvision.utils import make_grid

    stacked = torch.cat([r.float().clamp(-1, 1) for r in rows])
    grid = make_grid(stacked, nrow=rows[0].shape[0], padding=gap, pad_value=1.0)
    return to_uint8(grid)


@torch.no_grad()
def reconstruct_files(checkpoint_dir: str | Path, inputs: Sequence[str | Path], out_dir: str | Path,
                      image_size: int | None = None, full: bool = False, overwrite: bool = False,
                      raw_weights: bool = False) -> list[Path]:
    """Write `original | reconstruction` PNGs for image files/folders into `out_dir`; returns their paths.

    Unusable inputs are skipped and listed with their reasons in `out_dir/skipped.txt`; DaamkitError only
    when none could be processed. An `out_dir` that already holds files needs `overwrite`.
    """
    out_dir = output_folder(out_dir, overwrite=overwrite)
    images = open_inputs(checkpoint_dir, inputs, image_size, full, "reconstructing", raw_weights)
    written = []
    for path, image in images:
        result = reconstruct_image(images.model, image, measure=False)
        pair = side_by_side(result.original, result.reconstruction)
        written.append(save_png(out_dir / f"{len(written):04d}_{path.stem}.png", pair))
    images.finish(len(written), out_dir / "skipped.txt")
    return written
