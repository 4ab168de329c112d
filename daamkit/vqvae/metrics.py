"""Reconstruction metrics: per-image PSNR (data range 1), SSIM (torchmetrics), code-usage accumulation."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from daamkit.vqvae.quantizer import codebook_usage_and_perplexity


def _unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> [0, 1] float32, clamped as a saved image would be."""
    return images.detach().float().clamp(-1, 1).add(1).mul(0.5)


def psnr_per_image(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of every image ([B] tensor), data range 1 after mapping [-1, 1] -> [0, 1]."""
    mse = (_unit_range(reconstruction) - _unit_range(target)).pow(2).flatten(1).mean(1)
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


def ssim_per_image(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM of every image ([B] tensor), data range 1, torchmetrics' Gaussian-window defaults."""
    return structural_similarity_index_measure(
        _unit_range(reconstruction), _unit_range(target), data_range=1.0, reduction="none"
    ).reshape(-1)


class CodeHistogram:
    """Running histogram of chosen code ids -> codebook usage % and perplexity over a whole pass."""

    def __init__(self, num_embeddings: int):
        self.counts = torch.zeros(num_embeddings, dtype=torch.float64)

    def update(self, indices: torch.Tensor) -> None:
        self.counts += torch.bincount(indices.reshape(-1).cpu(), minlength=self.counts.numel()).double()

    def usage_and_perplexity(self) -> tuple[float, float]:
        return codebook_usage_and_perplexity(self.counts)
