"""The one place library code reports progress and messages: Rich bars with ETA, quiet when asked.

Library loops call `progress_bar(...)` and `log(...)`; the CLI decides (via `set_quiet`) whether anything
is shown. Output goes to stderr so `--json` results on stdout stay machine-readable. When stderr is not a
terminal (a log file, a job scheduler), a bar would only be drawn at the end, so plain lines are written
instead: one every PLAIN_EVERY_SECONDS or PLAIN_EVERY_FRACTION of the work (whichever comes first, at
most one a second) and one at the end, with count, rate, elapsed time, ETA and the loop's metrics.
"""

from __future__ import annotations

import time
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
_live: Progress | None = None  # the bar display being drawn; a bar opened inside another joins it as a row
PLAIN_EVERY_SECONDS = 30.0
PLAIN_EVERY_FRACTION = 0.05
PLAIN_MIN_GAP_SECONDS = 1.0  # fast loops do not print a line per 5%


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) every progress bar and log line."""
    global _quiet
    _quiet = quiet


def log(message: str) -> None:
    """Print one status line to stderr unless quiet."""
    if not _quiet:
        console.print(message, highlight=False, soft_wrap=True)  # no hard line breaks inside long paths


def _format_metrics(metrics: dict[str, float | str]) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class _Task:
    """Handle yielded by `progress_bar`: advance the bar and show live metrics beside it."""

    def __init__(self, progress: Progress | None, task_id: int | None):
        self._progress, self._task_id = progress, task_id

    def advance(self, steps: int = 1, **metrics: float | str) -> None:
        if self._progress is None:
            return
        self._progress.update(self._task_id, advance=steps, info=_format_metrics(metrics))


class _PlainTask:
    """`progress_bar` for a stderr that is not a terminal: a plain line every so often, and at the end."""

    def __init__(self, description: str, total: int | None, completed: int, clock=time.monotonic):
        self.description, self.total, self.completed, self._clock = description, total, completed, clock
        self._start_count, self._start = completed, clock()
        self._last_time, self._last_count, self._metrics = self._start, completed, {}

    def advance(self, steps: int = 1, **metrics: float | str) -> None:
        self.completed += steps
        self._metrics = metrics
        now = self._clock()
        fraction_step = max(1, int(PLAIN_EVERY_FRACTION * self.total)) if self.total else None
        since = now - self._last_time
        due = since >= PLAIN_EVERY_SECONDS or (
            fraction_step is not None and self.completed - self._last_count >= fraction_step
            and since >= PLAIN_MIN_GAP_SECONDS)
        if due:
            self.report(now)

    def finish(self) -> None:
        """The closing line, unless the last one already showed the final count."""
        if self.completed != self._last_count:
            self.report()

    def report(self, now: float | None = None) -> None:
        now = self._clock() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        rate = (self.completed - self._start_count) / elapsed
        count = f"{self.completed}/{self.total} ({100 * self.completed / self.total:.0f}%)" if self.total else f"{self.completed}"
        line = f"{self.description}: {count}  {rate:.2f}/s  elapsed {_duration(elapsed)}"
        if self.total and rate > 0:
            line += f"  eta {_duration((self.total - self.completed) / rate)}"
        if self._metrics:
            line += "  " + _format_metrics(self._metrics)
        log(line)
        self._last_time, self._last_count = now, self.completed


@contextmanager
def progress_bar(description: str, total: int | None, completed: int = 0) -> Iterator[_Task]:
    """A Rich progress bar with count, elapsed time and ETA (plain lines when stderr is not a terminal); a
    silent no-op when quiet. A bar opened while another is shown (a run inside a series of runs) is drawn
    as a second row below it and removed when done."""
    global _live
    if _quiet:
        yield _Task(None, None)
        return
    if not console.is_terminal:
        task = _PlainTask(description, total, completed)
        yield task
        task.finish()
        return
    if _live is not None:
        outer, task_id = _live, _live.add_task(description, total=total, completed=completed, info="")
        try:
            yield _Task(outer, task_id)
        finally:
            outer.remove_task(task_id)
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
        _live = progress
        try:
            yield _Task(progress, task_id)
        finally:
            _live = None
