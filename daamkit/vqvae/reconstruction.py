"""One image through a trained VQ-VAE: reconstruction, token grid, metrics and DAAM gate-entropy maps.

`reconstruct` (PNG files) and the browser demo both call `reconstruct_image`, so the pictures and the
numbers they show come from one code path; the metrics are `evaluate`'s per-image PSNR/SSIM/LPIPS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from daamkit.common.heads import head_sizes
from daamkit.vqvae.data import to_uint8
from daamkit.vqvae.metrics import psnr_per_image, ssim_per_image
from daamkit.vqvae.model import VQVAE


@dataclass
class ImageReconstruction:
    original: np.ndarray        # uint8 [H, W, 3], the model input as a picture
    reconstruction: np.ndarray  # uint8 [H, W, 3]
    tokens: np.ndarray          # int32 [H/f, W/f] code ids
    # psnr (dB), ssim, lpips (None without an LPIPS model), tokens (per image), distinct_codes
    metrics: dict[str, float | int | None] = field(default_factory=dict)
    # Mixture-DAAM module name -> gate entropy [h, w] in [0, 1] (see `gate_entropy`); empty unless asked
    gate_entropy: dict[str, np.ndarray] = field(default_factory=dict)


def gate_entropy(gate: torch.Tensor, num_heads: int) -> torch.Tensor:
    """How sharply a channel-axis density gate [B, C, H, W] focuses, per pixel: the entropy of each head's
    gate over its channels divided by log(channels in the head), averaged over heads -> [B, H, W] in [0, 1].

    0 = every head puts all its weight on one channel; 1 = the gate is uniform (no focus). Heads split
    the channels as the DAAM modules do: contiguous chunks, the remainder going to the last head.
    """
    per_head = []
    for chunk in gate.float().split(head_sizes(gate.shape[1], num_heads), dim=1):
        entropy = -(chunk * chunk.clamp_min(1e-30).log()).sum(1)
        width = chunk.shape[1]
        per_head.append(entropy / math.log(width) if width > 1 else torch.zeros_like(entropy))
    return torch.stack(per_head).mean(0).clamp(0.0, 1.0)


@torch.no_grad()
def reconstruct_image(model: VQVAE, image: torch.Tensor, lpips_model: torch.nn.Module | None = None,
                      measure: bool = True, gates: bool = False) -> ImageReconstruction:
    """Run one image [1, 3, H, W] in [-1, 1] (on the model's device) through `model`.

    `measure` fills `metrics` (PSNR and SSIM as `evaluate` computes them, LPIPS when `lpips_model` is
    given, token count and distinct codes); `gates` fills `gate_entropy` for every Mixture-DAAM module.
    """
    out = model(image, return_gates=gates)
    recon = out.reconstruction.float().clamp(-1, 1)
    tokens = out.quant.indices[0].cpu().numpy().astype(np.int32)
    result = ImageReconstruction(to_uint8(image)[0], to_uint8(recon)[0], tokens)
    if measure:
        result.metrics = {
            "psnr": float(psnr_per_image(recon, image)[0]),
            "ssim": float(ssim_per_image(recon, image)[0]),
            "lpips": None if lpips_model is None else float(lpips_model(recon, image).reshape(-1)[0]),
            "tokens": int(tokens.size),
            "distinct_codes": int(np.unique(tokens).size),
        }
    for name, gate in out.gates.items():
        num_heads = model.get_submodule(name).num_heads
        result.gate_entropy[name] = gate_entropy(gate, num_heads)[0].cpu().numpy()
    return result
