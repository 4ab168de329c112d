"""Checks every command makes on where it will write, before it writes anything.

An output is refused with one DaamkitError, naming the field (`out`), when a file stands where a folder
must go (or a folder where a file must go, or a file in the middle of the path), and, unless `overwrite`
is set, when it already holds results. Nothing on disk is touched by these checks.
"""

from __future__ import annotations

import os
from pathlib import Path

from daamkit.infra.errors import DaamkitError


def _check_parents(path: Path, field: str) -> None:
    """The nearest existing ancestor of `path` must be a writable folder."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DaamkitError(f"`{field}` {path} cannot be created: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise DaamkitError(f"`{field}` {path} cannot be created: folder {parent} is not writable")
            return


def output_folder(path: str | os.PathLike, field: str = "out", overwrite: bool = True) -> Path:
    """`path` as a folder to write into. Refused when a file is in the way or (without `overwrite`) when
    the folder already holds anything."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise DaamkitError(f"`{field}` {path} is a file; give a folder path")
        if not overwrite and any(path.iterdir()):
            raise DaamkitError(f"`{field}` {path} is not empty; pass `overwrite` to write into it, or choose "
                               f"another `{field}`")
        if not os.access(path, os.W_OK | os.X_OK):
            raise DaamkitError(f"`{field}` folder {path} is not writable")
    else:
        _check_parents(path, field)
    return path


def output_file(path: str | os.PathLike, field: str = "out", overwrite: bool = False) -> Path:
    """`path` as a file to (re)write. Refused when it is a folder or (without `overwrite`) already exists."""
    path = Path(path)
    if path.is_dir():
        raise DaamkitError(f"`{field}` {path} is a folder; give a file path")
    if path.exists() and not overwrite:
        raise DaamkitError(f"`{field}` {path} already exists; pass `overwrite` to replace it, or choose "
                           f"another `{field}`")
    _check_parents(path, field)
    return path
