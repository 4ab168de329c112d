"""Loading a trained VQ-VAE from its checkpoint folder and turning user-given image paths into tensors."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from daamkit.infra.checkpoint import atomic_write_bytes, load_config, load_state_dict_strict, load_weights
from daamkit.infra.errors import DaamkitError
from daamkit.infra.images import LOAD_ERRORS, read_rgb, unreadable_reason
from daamkit.infra.progress import log, progress_bar
from daamkit.vqvae.config import TrainConfig, VQVAEConfig, parse_checkpoint_config
from daamkit.vqvae.data import IMAGE_EXTENSIONS, center_crop, list_images, to_tensor, write_skipped_list
from daamkit.vqvae.model import VQVAE
from daamkit.vqvae.weight_ema import EMA_WEIGHTS_FILE


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def uses_ema_weights(checkpoint_dir: str | Path, raw_weights: bool = False) -> bool:
    """Whether `load_model` takes the checkpoint's weight-EMA weights: saved there, and not `raw_weights`."""
    return not raw_weights and (Path(checkpoint_dir) / EMA_WEIGHTS_FILE).is_file()


def load_model(checkpoint_dir: str | Path, device: torch.device | str = "cpu",
               raw_weights: bool = False) -> tuple[VQVAE, TrainConfig | None]:
    """The VQ-VAE stored in `checkpoint_dir` (eval mode, on `device`) and its training config if saved.

    The weight-EMA weights are used when the checkpoint has them, unless `raw_weights`.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise DaamkitError(f"{checkpoint_dir} is a file, not a checkpoint folder (e.g. runs/vqvae/checkpoints/best)")
    if not checkpoint_dir.is_dir():
        raise DaamkitError(f"checkpoint folder {checkpoint_dir} does not exist")
    model_config, train_config = parse_checkpoint_config(load_config(checkpoint_dir), str(checkpoint_dir))
    model = VQVAE(model_config)
    use_ema = uses_ema_weights(checkpoint_dir, raw_weights)
    weights = load_weights(checkpoint_dir, name=EMA_WEIGHTS_FILE) if use_ema else load_weights(checkpoint_dir)
    load_state_dict_strict(model, weights, str(checkpoint_dir))
    return model.to(device).eval(), train_config


def resolve_image_size(config: VQVAEConfig, train_config: TrainConfig | None, image_size: int | None) -> int:
    """`image_size`, defaulting to the training crop size; must be divisible by the down-sampling factor."""
    size = image_size if image_size is not None else (train_config.image_size if train_config else 256)
    factor = config.downsample_factor
    if size < factor or size % factor:
        raise DaamkitError(f"`image_size` {size} must be a positive multiple of {factor} (2^num_downsamples)")
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
    """One input image as [3, H, W] in [-1, 1]: a center crop of `image_size`, or with `full` the whole image
    trimmed to a multiple of `factor`. Raises SkippedInput (with the reason) when it cannot be used."""
    try:
        image = read_rgb(path)
    except LOAD_ERRORS as err:
        raise SkippedInput(unreadable_reason(err)) from err
    return prepare_image(image, image_size, full, factor)


def prepare_image(image: np.ndarray, image_size: int, full: bool, factor: int) -> torch.Tensor:
    """A uint8 HWC RGB image as the model's [3, H, W] input in [-1, 1]: a center crop of `image_size`, or with
    `full` the whole image trimmed to a multiple of `factor`. Raises SkippedInput when it is too small."""
    h, w = image.shape[:2]
    if full:
        if min(h, w) < factor:
            raise SkippedInput(f"{w}x{h} is smaller than the model's down-sampling factor {factor}")
        return to_tensor(image[: h - h % factor, : w - w % factor])
    if min(h, w) < image_size:
        raise SkippedInput(f"{w}x{h} is smaller than the {image_size} px crop")
    return to_tensor(center_crop(image, image_size))


class SkippedInput(Exception):
    """An input image that cannot be used; the message is the reason."""


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write a uint8 HWC array as PNG atomically (a temp file renamed into place), creating parent folders."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


@dataclass
class InputImages:
    """The usable input images of `reconstruct` / `encode`, and those skipped with their reasons."""

    model: VQVAE
    image_size: int
    full: bool
    files: list[Path]
    description: str
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __iter__(self) -> Iterator[tuple[Path, torch.Tensor]]:
        """`(path, image [1, 3, H, W] on the model's device)` for every usable input, with a progress bar;
        unusable ones are added to `skipped` and left out."""
        device = next(self.model.parameters()).device
        factor = self.model.config.downsample_factor
        with progress_bar(self.description, total=len(self.files)) as task:
            for path in self.files:
                try:
                    image = load_input(path, self.image_size, self.full, factor)
                except SkippedInput as reason:
                    self.skipped.append((path, str(reason)))
                else:
                    yield path, image.unsqueeze(0).to(device)
                task.advance()

    def finish(self, processed: int, list_file: Path | None = None) -> None:
        """Report what was skipped, every file with its reason (in `list_file` when given, else on stderr);
        DaamkitError when no input at all could be processed."""
        if processed == 0 and self.skipped:
            first_path, first_reason = self.skipped[0]
            advice = "; a smaller `image_size` or `full` takes small images" if "crop" in first_reason else ""
            raise DaamkitError(f"no input image could be processed: {len(self.skipped)} skipped, e.g. {first_path}: "
                               f"{first_reason}{advice}")
        if list_file is not None:
            write_skipped_list(list_file, self.skipped)
        if not self.skipped:
            return
        where = f"; listed with reasons in {list_file}" if list_file is not None else ":"
        log(f"skipped {len(self.skipped)} of {len(self.files)} input image(s){where}")
        if list_file is None:
            for path, reason in self.skipped:
                log(f"  {path}: {reason}")


def open_inputs(checkpoint_dir: str | Path, inputs: Sequence[str | Path], image_size: int | None,
                full: bool, description: str, raw_weights: bool = False) -> InputImages:
    """The checkpoint's model (on the default device) and the input images to run it on. The input paths
    are checked before the model is loaded; each image is decoded when iterated."""
    files = collect_inputs(inputs)
    model, train_config = load_model(checkpoint_dir, default_device(), raw_weights)
    return InputImages(model, resolve_image_size(model.config, train_config, image_size), full, files, description)
