"""Training losses: L1/MSE reconstruction and the LPIPS perceptual distance.

LPIPS needs two weight sets: its small linear heads (shipped inside the `lpips` pip package) and the
torchvision AlexNet/VGG trunk. The trunk is taken, in this order, from an explicit file, the torch hub
cache (`daamkit.infra.local_weights.lpips_trunk_path`), or torchvision's own download into that cache when
the network answers (announced in one line; `DAAMKIT_OFFLINE=1` forbids it). Offline and absent,
`load_lpips` raises a DaamkitError naming the file and the path, so nothing silently runs on a random trunk.
"""

from __future__ import annotations

import inspect
import os
import urllib.request
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from daamkit.infra.errors import DaamkitError
from daamkit.infra.progress import log
from daamkit.infra.local_weights import lpips_trunk_path

LPIPS_MIN_SIZE = 32  # smallest square input the AlexNet/VGG trunk can take down to its last stage


def reconstruction_loss(kind: str, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 or MSE between images, computed in float32."""
    if kind == "l1":
        return F.l1_loss(reconstruction.float(), target.float())
    if kind == "mse":
        return F.mse_loss(reconstruction.float(), target.float())
    raise DaamkitError(f"unknown reconstruction loss {kind!r}; choose l1 or mse")


def missing_lpips_message(net: str = "alex") -> str:
    """The one-line explanation shown when the LPIPS trunk weights are not on disk."""
    path = lpips_trunk_path(net)
    return (f"LPIPS needs the torchvision {net} trunk weights {path.name}, expected at {path} "
            f"(set TORCH_HOME to change the cache folder); copy the file there or give its path as `lpips_weights`")


def lpips_available(net: str = "alex") -> bool:
    return lpips_trunk_path(net).is_file()


def downloads_allowed() -> bool:
    """False when `DAAMKIT_OFFLINE` is set to anything but 0/empty (tests and air-gapped machines)."""
    return os.environ.get("DAAMKIT_OFFLINE", "") in ("", "0")


def resolve_lpips_trunk(net: str = "alex", weights: str | Path | None = None) -> Path:
    """The trunk file: `weights` when given, else the torch hub cache, else torchvision's download into the
    cache (when allowed and the network answers). DaamkitError naming the file and path otherwise."""
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_dir():
            raise DaamkitError(f"`lpips_weights` {path} is a folder; give the trunk file itself "
                               f"(torchvision's {lpips_trunk_path(net).name})")
        if not path.is_file():
            raise DaamkitError(f"`lpips_weights` {path} does not exist (expected torchvision's {lpips_trunk_path(net).name})")
        return path
    cached = lpips_trunk_path(net)
    if cached.is_file():
        return cached
    if not downloads_allowed():
        raise DaamkitError(f"{missing_lpips_message(net)} (downloads are off: DAAMKIT_OFFLINE is set)")
    try:
        _download_trunk(net, cached)
    except OSError as err:  # URLError, timeouts, refused connections, a full disk
        reason = getattr(err, "reason", None) or err
        raise DaamkitError(f"{missing_lpips_message(net)} (the download failed: {reason})") from err
    return cached


def _download_trunk(net: str, destination: Path) -> None:
    """torchvision's ImageNet weights for `net` into `destination`, checked against the hash in their name."""
    from torchvision import models

    weights = {"alex": models.AlexNet_Weights.IMAGENET1K_V1, "vgg": models.VGG16_Weights.IMAGENET1K_V1}[net]
    with urllib.request.urlopen(urllib.request.Request(weights.url, method="HEAD"), timeout=10):
        pass  # fail fast when offline; torch.hub's own download has no timeout
    log(f"downloading the LPIPS {net} trunk {weights.url} to {destination}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(weights.url, str(destination), hash_prefix=destination.stem.split("-")[-1],
                                   progress=False)


def load_lpips(net: str = "alex", weights: str | Path | None = None, random_trunk: bool = False) -> nn.Module:
    """A frozen, eval-mode `lpips.LPIPS` whose trunk comes from `resolve_lpips_trunk(net, weights)`.

    Input images are expected in [-1, 1]. Raises DaamkitError when the trunk file is missing or unreadable.
    `random_trunk` keeps torchvision's random initialisation (only for cost measurements, never metrics).
    """
    import lpips

    trunk_file = None if random_trunk else resolve_lpips_trunk(net, weights)
    with warnings.catch_warnings():  # lpips builds its trunk with torchvision's deprecated `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
    if trunk_file is not None:
        try:
            trunk_state = torch.load(trunk_file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file becomes one user-facing line
            raise DaamkitError(f"LPIPS trunk weights {trunk_file} are not a readable PyTorch weights file "
                               f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})") from err
        _load_trunk(model.net, trunk_state, trunk_file)
    heads_file = Path(inspect.getfile(lpips.LPIPS)).parent / "weights" / "v0.1" / f"{net}.pth"
    heads_state = torch.load(heads_file, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(heads_state, strict=False)
    # the trunk ("net."), fixed input scaling buffers and the `lins` aliases of lin0..lin4 are not in the file
    if unexpected or any(not key.startswith(("net.", "scaling_layer.", "lins.")) for key in missing):
        raise DaamkitError(f"LPIPS head weights {heads_file} do not fit the {net} model")
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _load_trunk(trunk: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy torchvision `features.<i>.*` tensors into lpips' `slice<k>.<i>.*` modules (same indices)."""
    mapped = {}
    for slice_name, block in trunk.named_children():
        for index, _ in block.named_children():
            for param_name, _ in block.get_submodule(index).named_parameters():
                key = f"features.{index}.{param_name}"
                if key not in state:
                    raise DaamkitError(f"LPIPS trunk weights {source} lack {key}; is it the right torchvision file?")
                mapped[f"{slice_name}.{index}.{param_name}"] = state[key]
    try:
        trunk.load_state_dict(mapped, strict=True)
    except RuntimeError as err:
        raise DaamkitError(f"LPIPS trunk weights {source} do not fit: {str(err).splitlines()[0]}") from err
