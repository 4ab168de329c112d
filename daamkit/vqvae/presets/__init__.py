"""Training presets shipped inside the package: TOML files of `daamkit vqvae train` options (`--preset NAME`).

Each file's first comment line is its one-line description; its keys are option names, as in `--config`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from daamkit.infra.errors import DaamkitError


def preset_names() -> list[str]:
    """The names of the shipped presets, sorted."""
    return sorted(entry.name[:-5] for entry in resources.files(__name__).iterdir() if entry.name.endswith(".toml"))


def preset_path(name: str) -> Path:
    """The TOML file of preset `name`; DaamkitError listing the presets when there is none of that name."""
    if name not in preset_names():
        raise DaamkitError(f"`preset` {name!r} does not exist; choose one of {', '.join(preset_names())}")
    return Path(str(resources.files(__name__).joinpath(f"{name}.toml")))


def preset_description(name: str) -> str:
    """The first comment line of preset `name`, without the `#`."""
    for line in preset_path(name).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""
