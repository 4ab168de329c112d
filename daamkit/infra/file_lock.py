"""A lock file that keeps two independent processes from writing the same output at once.

The lock is a small JSON file (pid, host, start time) created with O_EXCL. A lock left by a process that
is gone (same host, pid no longer running) is taken over; any other is refused with one DaamkitError.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from daamkit.infra.errors import DaamkitError


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # running, under another user
        return True
    return True


@contextmanager
def exclusive(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold lock file `path` while the block runs; DaamkitError naming `what` when another process holds it."""
    path = Path(path)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                other = json.loads(path.read_text())
            except (OSError, ValueError):
                other = {}
            if other.get("host") == me["host"] and isinstance(other.get("pid"), int) and not _running(other["pid"]):
                path.unlink(missing_ok=True)  # left behind by a process that is gone
                continue
            raise DaamkitError(
                f"{what} is being written by another process (pid {other.get('pid', '?')} on "
                f"{other.get('host', '?')} since {other.get('since', '?')}); wait for it to finish, or delete "
                f"{path} if that process is gone"
            ) from None
        with os.fdopen(handle, "w") as file:
            json.dump(me, file)
        break
    else:
        raise DaamkitError(f"{what}: could not take the lock {path}; try again")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
