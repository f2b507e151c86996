"""Progress reporting for long work: a rich progress bar with rate and ETA on a terminal, plain
periodic lines when output is not a TTY (CI logs, pipes), nothing at all when quiet."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["ProgressReporter", "progress"]


class ProgressReporter:
    """One task's progress. ``advance(n, **fields)`` moves it on; ``fields`` show as ``key=value``."""

    def __init__(self, description: str, total: int | None, *, mode: str, unit: str = "it",
                 plain_every: float = 10.0, stream: Any = None) -> None:
        self.description = description
        self.total = total
        self.mode = mode
        self.unit = unit
        self.completed = 0
        self._fields: dict[str, Any] = {}
        self._start = time.perf_counter()
        self._last_line = self._start
        self._plain_every = plain_every
        self._stream = stream or sys.stderr
        self._rich: Progress | None = None
        self._task_id: Any = None
        if mode == "rich":
            self._rich = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(file=self._stream),
                transient=False,
            )
            self._rich.start()
            self._task_id = self._rich.add_task(description, total=total, rate="", info="")

    def _rate(self) -> float:
        elapsed = time.perf_counter() - self._start
        return self.completed / elapsed if elapsed > 0 else 0.0

    def _info(self) -> str:
        return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self._fields.items())

    def advance(self, n: int = 1, **fields: Any) -> None:
        """Record ``n`` more units of work done, and optionally update the displayed fields."""
        self.completed += n
        self._fields.update(fields)
        if self.mode == "rich" and self._rich is not None:
            self._rich.update(self._task_id, advance=n, rate=f"{self._rate():.2f} {self.unit}/s", info=self._info())
        elif self.mode == "plain":
            now = time.perf_counter()
            done = self.total is not None and self.completed >= self.total
            if done or now - self._last_line >= self._plain_every:
                self._last_line = now
                self._write_plain()

    def _write_plain(self) -> None:
        rate = self._rate()
        if self.total:
            remaining = (self.total - self.completed) / rate if rate > 0 else float("nan")
            where = f"{self.completed}/{self.total} ({100.0 * self.completed / self.total:.0f}%)"
            eta = f" ETA {remaining:.0f}s"
        else:
            where, eta = f"{self.completed}", ""
        info = self._info()
        print(f"{self.description}: {where} {rate:.2f} {self.unit}/s{eta}{(' ' + info) if info else ''}",
              file=self._stream, flush=True)

    def close(self) -> None:
        """Stop the bar (rich) or print a final line (plain)."""
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
        elif self.mode == "plain" and (self.total is None or self.completed < self.total):
            self._write_plain()


@contextmanager
def progress(description: str, total: int | None = None, *, quiet: bool = False, unit: str = "it",
             stream: Any = None) -> Iterator[ProgressReporter]:
    """Context manager yielding a :class:`ProgressReporter`.

    A rich bar (rate, elapsed, ETA) when the stream is a terminal, plain lines every 10 s otherwise,
    and silence with ``quiet=True``.
    """
    stream = stream or sys.stderr
    mode = "quiet" if quiet else ("rich" if getattr(stream, "isatty", lambda: False)() else "plain")
    reporter = ProgressReporter(description, total, mode=mode, unit=unit, stream=stream)
    try:
        yield reporter
    finally:
        reporter.close()
