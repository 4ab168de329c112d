"""What the browser demo shows for one image and checkpoint, as arrays, numbers and text (no web code).

`DemoModel` holds a loaded checkpoint; `DemoModel.run` checks an uploaded file, reconstructs it with
`reconstruct_image` (the code path of `reconstruct`) and adds the pictures the page displays: the
colour-mapped token grid, one gate-entropy heatmap per DAAM block, and the `.npz` token bytes that
`vqvae decode` reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from daamkit.infra.errors import DaamkitError
from daamkit.infra.images import LOAD_ERRORS, read_rgb, unreadable_reason
from daamkit.vqvae.data import sample_photos
from daamkit.vqvae.io import (SkippedInput, default_device, load_model, prepare_image, resolve_image_size, save_png,
                              uses_ema_weights)
from daamkit.vqvae.losses import LPIPS_MIN_SIZE, load_lpips, lpips_available
from daamkit.vqvae.reconstruction import ImageReconstruction, reconstruct_image
from daamkit.vqvae.tokens import token_file_bytes

# Larger uploads are refused with a message. Measured on 2 busy CPU cores with the default 32-channel model:
# a 2048x2048 full image took 65 s and 5.4 GB peak memory, a 64 px crop of it 1.0 s.
MAX_PIXELS = 64 * 2**20       # any upload (decoding alone takes GBs beyond this)
MAX_FULL_PIXELS = 4 * 2**20   # the whole image through the model
GATE_LEGEND = ("Colour = entropy of the DAAM density gate over each head's channels, divided by its maximum and "
               "averaged over heads: dark = the gate focuses on few channels, bright = spread evenly (no focus); "
               "each map is stretched to its own range, given in its caption.")
NO_DAAM = "This checkpoint has no DAAM in the model (attention = none): no gate maps to show."


@dataclass
class DemoResult:
    """One image through one checkpoint, ready to display."""

    reconstruction: ImageReconstruction
    metrics_line: str
    token_image: np.ndarray                                # uint8 [H, W, 3], one colour per code id
    gate_maps: list[tuple[np.ndarray, str]] = field(default_factory=list)  # (uint8 heatmap, caption) per block
    token_file: bytes = b""                               # `.npz` as `vqvae encode` writes it


def read_upload(path: str | Path, image_size: int, full: bool, factor: int) -> torch.Tensor:
    """An uploaded file as a model input [1, 3, H, W]; DaamkitError saying why when it is not a usable image
    (not an image, truncated, smaller than the crop or the down-sampling factor, over MAX_PIXELS, or over
    MAX_FULL_PIXELS for the whole image)."""
    name = Path(path).name
    try:
        with Image.open(path) as probe:
            width, height = probe.size
    except LOAD_ERRORS as err:
        raise DaamkitError(f"{name} is not a readable image: {_reason(err, path)}") from err
    limit = MAX_FULL_PIXELS if full else MAX_PIXELS
    if width * height > limit:
        what = "for the full image (the crop works)" if full else "for an upload"
        raise DaamkitError(f"{name} is {width}x{height}, over the demo's limit of {limit // 2**20} megapixels {what}; "
                           "scale it down first")
    try:
        return prepare_image(read_rgb(path), image_size, full, factor).unsqueeze(0)
    except LOAD_ERRORS as err:
        raise DaamkitError(f"{name} is not a readable image: {_reason(err, path)}") from err
    except SkippedInput as reason:
        raise DaamkitError(f"{name}: {reason}") from reason


def _reason(err: BaseException, path: str | Path) -> str:
    """Why a file could not be decoded, without the server-side upload path (the user knows the file)."""
    reason = unreadable_reason(err).removeprefix("unreadable (").removesuffix(")")
    return reason.replace(f" '{path}'", "").replace(str(path), Path(path).name)


def colour_tokens(tokens: np.ndarray, num_embeddings: int, height: int, width: int) -> np.ndarray:
    """A token-id grid as an RGB picture of `height` x `width`: code id -> a hue spread by the golden ratio
    (neighbouring ids get distant colours), each token a flat block."""
    from matplotlib import colormaps

    hues = (np.arange(num_embeddings) * 0.6180339887) % 1.0
    palette = (colormaps["hsv"](hues)[:, :3] * 255).astype(np.uint8)
    return _upscale(palette[tokens], height, width)


def heatmap(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """A [h, w] map stretched to its own min..max, viridis-coloured, as a uint8 picture of `height` x `width`."""
    from matplotlib import colormaps

    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return _upscale((colormaps["viridis"](scaled)[..., :3] * 255).astype(np.uint8), height, width)


def _upscale(picture: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(picture).resize((width, height), Image.NEAREST))


def block_caption(name: str, entropy: np.ndarray) -> str:
    """`encoder.blocks.0.residual.attention` -> `encoder block 1 (32x32): entropy 0.91-0.99, mean 0.95`."""
    parts = name.split(".")
    where = f"{parts[0]} block {int(parts[2]) + 1}" if len(parts) > 2 and parts[2].isdigit() else name
    return (f"{where} ({entropy.shape[0]}x{entropy.shape[1]}): entropy {entropy.min():.3f}-{entropy.max():.3f}, "
            f"mean {entropy.mean():.3f}")


def format_metrics(metrics: dict) -> str:
    lpips = "n/a (no LPIPS weights)" if metrics["lpips"] is None else f"{metrics['lpips']:.4f}"
    return (f"PSNR {metrics['psnr']:.2f} dB · SSIM {metrics['ssim']:.4f} · LPIPS {lpips} · "
            f"{metrics['tokens']} tokens · {metrics['distinct_codes']} distinct codes")


class DemoModel:
    """A checkpoint loaded for the demo: the model, its crop size, and LPIPS when its trunk weights are on disk."""

    def __init__(self, checkpoint_dir: str | Path, device: torch.device | str | None = None, lpips_net: str = "alex",
                 raw_weights: bool = False, lpips_weights: str | Path | None = None):
        self.path = Path(checkpoint_dir)
        self.device = torch.device(device) if device is not None else default_device()
        self.model, train_config = load_model(self.path, self.device, raw_weights)
        self.ema = uses_ema_weights(self.path, raw_weights)
        self.image_size = resolve_image_size(self.model.config, train_config, None)
        self.has_daam = self.model.config.attention != "none"
        # LPIPS from `lpips_weights` or the torch hub cache; never downloaded (the page works offline)
        local = lpips_weights is not None or lpips_available(lpips_net)
        self.lpips_model = load_lpips(lpips_net, lpips_weights).to(self.device) if local else None

    @property
    def label(self) -> str:
        attention = self.model.config.attention
        weights = ", weight-EMA weights" if self.ema else ""
        return f"{self.path} (attention {attention}, {self.model.config.num_embeddings} codes{weights})"

    def run(self, path: str | Path, full: bool, report: Callable[[float, str], None] | None = None) -> DemoResult:
        """Reconstruct the image file at `path` (a center crop at the training size, or the whole image);
        `report(fraction done, stage)` is called as the work proceeds, for a progress display."""
        report = report or (lambda fraction, stage: None)
        report(0.0, "reading the image")
        image = read_upload(path, self.image_size, full, self.model.config.downsample_factor).to(self.device)
        small = min(image.shape[-2:]) < LPIPS_MIN_SIZE
        report(0.1, f"reconstructing {image.shape[-1]}x{image.shape[-2]} px")
        result = reconstruct_image(self.model, image, None if small else self.lpips_model, gates=True)
        report(0.9, "drawing token grid and gate maps")
        height, width = result.original.shape[:2]
        gate_maps = [(heatmap(entropy, height, width), block_caption(name, entropy))
                     for name, entropy in result.gate_entropy.items()]
        return DemoResult(
            reconstruction=result,
            metrics_line=format_metrics(result.metrics),
            token_image=colour_tokens(result.tokens, self.model.config.num_embeddings, height, width),
            gate_maps=gate_maps,
            token_file=token_file_bytes([result.tokens], [Path(path).name], self.model.config.num_embeddings),
        )


def write_sample_photos(folder: str | Path, size: int = 512) -> list[Path]:
    """The built-in scikit-image photos as PNGs in `folder` (shorter side `size`), for the demo's examples."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in sample_photos(size // 4):
        path = folder / f"{name}.png"
        paths.append(path if path.is_file() else save_png(path, image))
    return paths
