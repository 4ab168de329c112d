"""Atomic checkpoint folders: `model.safetensors` + `config.json` + `state.pt` (optimizer/RNG for exact resume).

Every file is written to a temporary name in the same folder and renamed into place, and a whole
checkpoint folder is built beside its target and swapped in, so an interrupted save never destroys the
previous good checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from daamkit.infra.errors import DaamkitError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_checkpoint(
    directory: str | os.PathLike,
    model_state: dict[str, torch.Tensor],
    config: dict[str, Any],
    training_state: dict[str, Any] | None = None,
    extra_weights: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a checkpoint folder atomically: built in a sibling temp folder, then swapped into `directory`.

    `extra_weights` maps further safetensors file names (e.g. a discriminator's) to their tensors.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp"))
    try:
        for name, state in {WEIGHTS_FILE: model_state, **(extra_weights or {})}.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(staging / name))
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if training_state is not None:
            torch.save(training_state, staging / STATE_FILE)
        old = directory.with_name(f".{directory.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if directory.exists():
            os.replace(directory, old)
        os.replace(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def read_json(path: str | os.PathLike, missing: str | None = None) -> Any:
    """Parse a JSON file; a missing file (reported as `missing`) or broken JSON is a one-line DaamkitError."""
    path = Path(path)
    if not path.is_file():
        raise DaamkitError(missing or f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DaamkitError(f"{path} is not valid JSON: {err}") from err


def load_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON config of a checkpoint folder, or DaamkitError naming what is missing."""
    return read_json(Path(directory) / CONFIG_FILE, f"{directory} is not a checkpoint folder: {CONFIG_FILE} is missing")


def load_weights(directory: str | os.PathLike, device: str | torch.device = "cpu",
                 name: str = WEIGHTS_FILE) -> dict[str, torch.Tensor]:
    """The safetensors weights `name` (default the model's) of a checkpoint folder."""
    path = Path(directory) / name
    if not path.is_file():
        what = "is not a checkpoint folder" if name == WEIGHTS_FILE else "lacks a file this run needs"
        raise DaamkitError(f"{directory} {what}: {name} is missing")
    try:
        return load_file(str(path), device=str(device))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError)
        raise DaamkitError(f"{path} is damaged or truncated and cannot be read ({_first_line(err)})") from err


def load_training_state(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The resume state of a checkpoint folder (weights_only=True load), or None when absent."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise DaamkitError(f"{path} is damaged or truncated and cannot be read ({_first_line(err)})") from err


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def load_state_dict_strict(module: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load weights into `module`, turning shape/key mismatches into one readable DaamkitError."""
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = next((line.strip() for line in first[1:] if line.strip()), first[0] if first else "")
        raise DaamkitError(f"checkpoint {source} does not fit this model ({detail})") from err
