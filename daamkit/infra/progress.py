"""The one place library code reports progress and messages: Rich bars with ETA, quiet when asked.

Library loops call `progress_bar(...)` and `log(...)`; the CLI decides (via `set_quiet`) whether anything
is shown. Output goes to stderr so `--json` results on stdout stay machine-readable.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) every progress bar and log line."""
    global _quiet
    _quiet = quiet


def log(message: str) -> None:
    """Print one status line to stderr unless quiet."""
    if not _quiet:
        console.print(message, highlight=False)


class _Task:
    """Handle yielded by `progress_bar`: advance the bar and show live metrics beside it."""

    def __init__(self, progress: Progress | None, task_id: int | None):
        self._progress, self._task_id = progress, task_id

    def advance(self, steps: int = 1, **metrics: float | str) -> None:
        if self._progress is None:
            return
        info = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        self._progress.update(self._task_id, advance=steps, info=info)


@contextmanager
def progress_bar(description: str, total: int | None, completed: int = 0) -> Iterator[_Task]:
    """A Rich progress bar with count, elapsed time and ETA; a silent no-op when quiet."""
    if _quiet:
        yield _Task(None, None)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    )
    with progress:
        task_id = progress.add_task(description, total=total, completed=completed, info="")
        yield _Task(progress, task_id)
