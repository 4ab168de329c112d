"""Training losses: L1/MSE reconstruction and the LPIPS perceptual distance built strictly from local files.

LPIPS needs two weight sets: its small linear heads (shipped inside the `lpips` pip package) and the
torchvision AlexNet/VGG trunk, which torchvision would download. Here the trunk is only ever read from the
torch hub cache (`daamkit.infra.local_weights.lpips_trunk_path`); when it is absent, `load_lpips` raises
a DaamkitError naming the file, so nothing silently runs on a random trunk.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from daamkit.infra.errors import DaamkitError
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
            f"(set TORCH_HOME to change the cache folder); copy the file there")


def lpips_available(net: str = "alex") -> bool:
    return lpips_trunk_path(net).is_file()


def load_lpips(net: str = "alex") -> nn.Module:
    """A frozen, eval-mode `lpips.LPIPS` whose trunk comes from the local torch hub cache only.

    Input images are expected in [-1, 1]. Raises DaamkitError when the trunk file is missing or unreadable.
    """
    import lpips

    trunk_file = lpips_trunk_path(net)
    if not trunk_file.is_file():
        raise DaamkitError(f"{missing_lpips_message(net)}, or train with `perceptual_weight` 0")
    model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
    try:
        trunk_state = torch.load(trunk_file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file becomes one user-facing line
        raise DaamkitError(f"cannot read LPIPS trunk weights {trunk_file}: {err}") from err
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
