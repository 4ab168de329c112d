"""Loading a trained VQ-VAE from its checkpoint folder and turning user-given image paths into tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from daamkit.infra.checkpoint import load_config, load_state_dict_strict, load_weights
from daamkit.infra.errors import DaamkitError
from daamkit.infra.progress import progress_bar
from daamkit.vqvae.config import TrainConfig, VQVAEConfig, parse_checkpoint_config
from daamkit.vqvae.data import LOAD_ERRORS, IMAGE_EXTENSIONS, center_crop, list_images, read_rgb, to_tensor
from daamkit.vqvae.model import VQVAE


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(checkpoint_dir: str | Path, device: torch.device | str = "cpu") -> tuple[VQVAE, TrainConfig | None]:
    """The VQ-VAE stored in `checkpoint_dir` (eval mode, on `device`) and its training config if saved."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise DaamkitError(f"checkpoint folder {checkpoint_dir} does not exist")
    model_config, train_config = parse_checkpoint_config(load_config(checkpoint_dir), str(checkpoint_dir))
    model = VQVAE(model_config)
    load_state_dict_strict(model, load_weights(checkpoint_dir), str(checkpoint_dir))
    return model.to(device).eval(), train_config


def resolve_image_size(config: VQVAEConfig, train_config: TrainConfig | None, image_size: int | None) -> int:
    """`image_size`, defaulting to the training crop size; must be divisible by the down-sampling factor."""
    size = image_size or (train_config.image_size if train_config else 256)
    factor = config.downsample_factor
    if size < factor or size % factor:
        raise DaamkitError(f"--image-size {size} must be a positive multiple of {factor} (2^num_downsamples)")
    return size


def collect_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named directly or found (recursively) in the given folders, in order."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = list_images(path)
            if not found:
                raise DaamkitError(f"folder {path} contains no {'/'.join(IMAGE_EXTENSIONS)} images")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DaamkitError(f"input {path} does not exist")
    if not files:
        raise DaamkitError("no input images given")
    return files


def load_input(path: Path, image_size: int, full: bool, factor: int) -> torch.Tensor:
    """One explicit input image as [3, H, W] in [-1, 1]: a center crop of `image_size`, or with `full`
    the whole image trimmed to a multiple of `factor`. Unreadable or too-small images are user errors."""
    try:
        image = read_rgb(path)
    except LOAD_ERRORS as err:
        raise DaamkitError(f"cannot read image {path} ({type(err).__name__}: {err})") from err
    h, w = image.shape[:2]
    if full:
        if min(h, w) < factor:
            raise DaamkitError(f"image {path} is {w}x{h}, smaller than the model's down-sampling factor {factor}")
        return to_tensor(image[: h - h % factor, : w - w % factor])
    if min(h, w) < image_size:
        raise DaamkitError(f"image {path} is {w}x{h}, smaller than the {image_size} px crop; "
                           "pass a smaller --image-size or --full")
    return to_tensor(center_crop(image, image_size))


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write a uint8 HWC array as PNG, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def iterate_inputs(checkpoint_dir: str | Path, inputs: Sequence[str | Path], image_size: int | None, full: bool,
                   description: str) -> Iterator[tuple[VQVAE, Path, torch.Tensor]]:
    """Load the checkpoint once, then yield `(model, path, image [1, 3, H, W] on the model's device)` for
    every input image, with a progress bar. All inputs are checked before the model is loaded."""
    files = collect_inputs(inputs)
    device = default_device()
    model, train_config = load_model(checkpoint_dir, device)
    size = resolve_image_size(model.config, train_config, image_size)
    with progress_bar(description, total=len(files)) as task:
        for path in files:
            yield model, path, load_input(path, size, full, model.config.downsample_factor).unsqueeze(0).to(device)
            task.advance()
