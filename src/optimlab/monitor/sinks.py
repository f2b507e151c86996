"""Where :class:`~optimlab.monitor.OptimizerMonitor` records go: memory, CSV, JSON lines, TensorBoard.

A sink is any object with ``write(step: int, record: Mapping[str, float])`` and, optionally, ``close()``.
File sinks flush every record, so a crash loses at most the record being written.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Protocol

from optimlab.io import atomic_write

__all__ = ["CSVSink", "JSONLSink", "MemorySink", "Sink", "TensorBoardSink"]


class Sink(Protocol):
    """The sink interface."""

    def write(self, step: int, record: Mapping[str, float]) -> None: ...


class MemorySink:
    """Keeps every record in :attr:`history` as ``{"step": step, **record}``."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def write(self, step: int, record: Mapping[str, float]) -> None:
        """Append the record."""
        self.history.append({"step": step, **record})

    def column(self, key: str) -> list[float]:
        """One metric over the recorded steps (NaN where a record lacks it)."""
        return [row.get(key, math.nan) for row in self.history]

    def close(self) -> None:
        """Nothing to release; the history stays available."""


class _FileSink:
    """Shared file handling: a new file (or appending to an existing one with ``append=True``)."""

    def __init__(self, path: str | os.PathLike[str], append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            with atomic_write(self.path, "w"):
                pass
        self._handle: IO[str] | None = None

    def _file(self) -> IO[str]:
        if self._handle is None:
            self._handle = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115 (kept open)
        return self._handle

    def close(self) -> None:
        """Flush and close the file."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class CSVSink(_FileSink):
    """One row per record, a ``step`` column first. When a later record brings new metrics (state that
    appears late), the file is rewritten atomically with the wider header (earlier rows get empty cells)."""

    def __init__(self, path: str | os.PathLike[str], append: bool = False) -> None:
        super().__init__(path, append)
        self.columns: list[str] = []
        if append and self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, newline="", encoding="utf-8") as handle:
                self.columns = next(csv.reader(handle), [])

    def write(self, step: int, record: Mapping[str, float]) -> None:
        """Append the record as a row (widening the header if needed)."""
        row = {"step": step, **record}
        if not self.columns:
            self.columns = list(row)
            csv.writer(self._file()).writerow(self.columns)
        elif any(key not in self.columns for key in row):
            self._widen([key for key in row if key not in self.columns])
        writer = csv.DictWriter(self._file(), fieldnames=self.columns, restval="")
        writer.writerow(row)
        self._file().flush()

    def _widen(self, new_columns: list[str]) -> None:
        self.close()
        with open(self.path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        self.columns += new_columns
        with atomic_write(self.path, "w") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns, restval="")
            writer.writeheader()
            writer.writerows(rows)


class JSONLSink(_FileSink):
    """One JSON object per line, ``{"step": ..., metric: value, ...}``; non-finite values are written as
    ``null`` so that strict JSON parsers read the file."""

    def write(self, step: int, record: Mapping[str, float]) -> None:
        """Append the record as a JSON line."""
        row: dict[str, Any] = {"step": step}
        row.update({key: value if math.isfinite(value) else None for key, value in record.items()})
        handle = self._file()
        handle.write(json.dumps(row, allow_nan=False) + "\n")
        handle.flush()


class TensorBoardSink:
    """Each metric as a TensorBoard scalar (``torch.utils.tensorboard.SummaryWriter``), tagged by its key,
    e.g. ``grad_norm/group0``. Pass a ``log_dir`` or an existing ``writer`` (which is then not closed)."""

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, writer: Any = None) -> None:
        if (log_dir is None) == (writer is None):
            raise ValueError("TensorBoardSink needs exactly one of log_dir or writer")
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(log_dir))
            self._owns_writer = True
        else:
            self._owns_writer = False
        self.writer = writer

    def write(self, step: int, record: Mapping[str, float]) -> None:
        """Add every metric as a scalar at ``step``."""
        for key, value in record.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        """Flush; close the writer if this sink created it."""
        self.writer.flush()
        if self._owns_writer:
            self.writer.close()
