"""Find pretrained weights on local disk only (torch hub cache, Hugging Face cache): nothing downloads."""

from __future__ import annotations

import os
from pathlib import Path

from daamkit.infra.errors import DaamkitError

# torchvision trunk files that LPIPS loads (the file names torchvision's model zoo uses).
LPIPS_TRUNK_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
}


# torch-fidelity's Inception-V3 weights (rFID), cached by torch.hub under this name.
FID_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def torch_hub_checkpoints_dir() -> Path:
    """`$TORCH_HOME/hub/checkpoints` (default `~/.cache/torch/hub/checkpoints`), where torchvision caches weights."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )
    return Path(torch_home) / "hub" / "checkpoints"


def lpips_trunk_path(net: str = "alex") -> Path:
    """Expected path of the LPIPS trunk weights for `net` ("alex" or "vgg"); may not exist."""
    if net not in LPIPS_TRUNK_FILES:
        raise DaamkitError(f"unknown LPIPS network {net!r}; choose one of {sorted(LPIPS_TRUNK_FILES)}")
    return torch_hub_checkpoints_dir() / LPIPS_TRUNK_FILES[net]


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder (`$HF_HUB_CACHE`, `$HF_HOME/hub` or `~/.cache/huggingface/hub`)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(hf_home) / "hub"


def cached_hf_models() -> list[str]:
    """Repo ids of the models present in the local Hugging Face cache (e.g. "microsoft/wavlm-large")."""
    cache = hf_hub_cache_dir()
    if not cache.is_dir():
        return []
    return sorted(
        entry.name[len("models--"):].replace("--", "/")
        for entry in cache.iterdir()
        if entry.is_dir() and entry.name.startswith("models--") and (entry / "snapshots").is_dir()
    )


def resolve_hf_model(name_or_path: str) -> Path:
    """A local folder holding `config.json` for `name_or_path`: the folder itself or its newest cache snapshot.

    Raises DaamkitError naming where the model should be put when neither exists (downloads are impossible).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DaamkitError(f"{path} has no config.json; is it a Hugging Face model folder (save_pretrained)?")
        return path
    snapshots = hf_hub_cache_dir() / f"models--{name_or_path.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir():
        candidates = sorted(
            (s for s in snapshots.iterdir() if (s / "config.json").is_file()),
            key=lambda s: s.stat().st_mtime,
        )
        if candidates:
            return candidates[-1]
    raise DaamkitError(
        f"model {name_or_path!r} is neither a local folder nor in the Hugging Face cache ({hf_hub_cache_dir()}); "
        "download it on a connected machine (e.g. `huggingface-cli download NAME`) and pass its folder"
    )
