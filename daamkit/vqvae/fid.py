"""rFID: the Frechet Inception distance between evaluation images and their reconstructions.

Uses torchmetrics' `FrechetInceptionDistance` (2048-d pool features of torch-fidelity's Inception-V3, the
TF-FID port every tokenizer paper reports), built only from weights already on disk: `fid_weights`, else
the file torch-fidelity/torchmetrics cache in the torch hub folder. Nothing is downloaded; when the file is
absent, the caller reports `"rfid": null` with `missing_fid_message()`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from daamkit.infra.errors import DaamkitError
from daamkit.infra.local_weights import FID_INCEPTION_FILE, torch_hub_checkpoints_dir

FID_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{FID_INCEPTION_FILE}"
FID_FEATURES = 2048  # the pool3 features of the standard FID


def fid_weights_path(explicit: str | Path | None = None) -> Path | None:
    """`explicit` (which must exist), else the torch hub cache file when present, else None."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise DaamkitError(f"`fid_weights` {path} is not a file (expected torch-fidelity's {FID_INCEPTION_FILE})")
        return path
    cached = torch_hub_checkpoints_dir() / FID_INCEPTION_FILE
    return cached if cached.is_file() else None


def missing_fid_message() -> str:
    return (f"rFID needs torch-fidelity's Inception weights {FID_INCEPTION_FILE} at "
            f"{torch_hub_checkpoints_dir() / FID_INCEPTION_FILE} ({FID_WEIGHTS_URL}) or given as `fid_weights`")


def load_fid(weights: Path, device: torch.device):
    """A torchmetrics FrechetInceptionDistance (uint8 inputs) on `device` whose Inception comes from `weights`."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as err:
        raise DaamkitError(f"rFID needs torch-fidelity ({err}); pip install torch-fidelity") from err
    try:  # torch-fidelity reads the file with weights_only=False: accept only a plain tensor file
        torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file becomes one user-facing line
        raise DaamkitError(f"cannot read the Inception weights {weights}: {str(err).splitlines()[0]}") from err
    try:
        metric = FrechetInceptionDistance(feature=FID_FEATURES, feature_extractor_weights_path=str(weights))
    except RuntimeError as err:
        raise DaamkitError(f"the Inception weights {weights} do not fit: {str(err).splitlines()[0]}") from err
    return metric.to(device)


def to_fid_input(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images as the uint8 [0, 255] tensors FrechetInceptionDistance expects."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
