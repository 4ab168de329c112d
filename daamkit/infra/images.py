"""Image files decoded as an image viewer shows them, and checked before use: what the VQ-VAE's folders and
the classifier's `image-folder` task share. A file that cannot be decoded is skipped with a reason, never fatal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from daamkit.infra.progress import log, progress_bar

FULL_DECODE_LIMIT = 5000  # folders up to this many files are fully decoded when scanned
LOAD_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode a whole image file to uint8 HWC RGB as a viewer shows it (raises one of LOAD_ERRORS when it
    is unreadable or truncated): EXIF orientation applied, 16-bit samples scaled to 8 bits, transparency
    composited on white, palette, CMYK and greyscale converted."""
    with Image.open(path) as image:
        image.load()  # decodes every byte now, so a truncated file fails here and not half-way
        return np.asarray(_as_rgb(ImageOps.exif_transpose(image)))


def _as_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I"):  # 16-bit (I;16*) or 32-bit integer greyscale holding 16-bit samples
        samples = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.round(samples / 257.0), 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def unreadable_reason(err: BaseException) -> str:
    """A short reason for a file that failed to decode, e.g. "unreadable (OSError: image file is truncated)"."""
    detail = str(err).strip().splitlines()
    return f"unreadable ({type(err).__name__}: {detail[0]})" if detail else f"unreadable ({type(err).__name__})"


@dataclass
class ScanResult:
    files: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _image_size(path: Path, decode: bool) -> tuple[int, int]:
    """(width, height) of an image file: fully decoded when `decode`, else from its header only."""
    if decode:
        height, width = read_rgb(path).shape[:2]
        return width, height
    with Image.open(path) as image:
        return image.size  # EXIF rotation swaps the sides, which leaves min(width, height) alone


def scan_images(files: Sequence[Path], what: str, min_size: int = 0) -> ScanResult:
    """Check every file; unreadable ones and ones smaller than `min_size` (a crop's side) are skipped with a reason.

    Folders of up to FULL_DECODE_LIMIT files are decoded completely, so truncated files are caught here;
    larger ones (COCO) only have their headers read and a file that fails later must be skipped when first used.
    """
    result = ScanResult(files=[])
    decode = len(files) <= FULL_DECODE_LIMIT
    with progress_bar(f"{'checking' if decode else 'scanning'} {what}", total=len(files)) as task:
        for path in files:
            try:
                width, height = _image_size(path, decode)
            except LOAD_ERRORS as err:
                result.skipped.append((path, unreadable_reason(err)))
            else:
                if min(width, height) < min_size:
                    result.skipped.append((path, f"{width}x{height} is smaller than the {min_size} px crop"))
                else:
                    result.files.append(path)
            task.advance()
    if result.skipped:
        unreadable = sum(reason.startswith("unreadable") for _, reason in result.skipped)
        small = len(result.skipped) - unreadable
        log(f"skipped {len(result.skipped)} of {len(files)} {what} file(s): {unreadable} unreadable"
            + (f", {small} too small" if min_size else ""))
    return result
