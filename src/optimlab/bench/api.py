"""The lab in-process: :func:`compare` runs a bench on your own task and returns its table and verdicts.

Example::

    from optimlab.bench import compare
    result = compare("examples/digits_cnn.py:TASK", optimizers=["adamw", "lion"], trials=8, seeds=3)
    print(result)                    # the table and one verdict line per task
    result.report("report/")         # the HTML report
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from optimlab.bench.runner import BenchConfig, BenchResult, run_bench, summarize
from optimlab.bench.store import Store
from optimlab.bench.tasks import TaskSpec, get_task, list_tasks, register_tasks, resolve_task_names
from optimlab.bench.verdict import Verdict, lr_warnings, spread, verdicts

__all__ = ["CompareResult", "compare"]


@dataclass
class CompareResult:
    """What :func:`compare` ran: the database and run id, the summary rows (one per task × configuration,
    see :func:`optimlab.bench.runner.summarize`), the verdict per task and any learning-rate bound warnings."""

    db: Path
    run_id: int
    rows: list[dict[str, Any]]
    verdicts: dict[str, Verdict]
    warnings: list[str] = field(default_factory=list)
    bench: BenchResult | None = None

    @property
    def table(self) -> str:
        """The rows as aligned text: task, optimizer, schedule, clip, learning rate, metric mean ± std (n)."""
        header = ("task", "optimizer", "schedule", "clip", "lr", "metric")
        lines = [header] + [(r["task"], r["optimizer"], r["schedule"], r["clip"], f"{r['params'].get('lr', 0):.3g}",
                             f"{r['metric']} {spread(r)}" if r["metric_values"] else "diverged") for r in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)

    def report(self, path: str | Path, fmt: str = "png") -> Path:
        """Write the HTML report into the folder ``path``; returns the ``index.html`` path."""
        from optimlab.bench.report import write_report

        with Store(self.db) as store:
            return write_report(store, self.run_id, path, fmt=fmt)

    def __str__(self) -> str:
        return "\n".join([self.table, *(v.text for v in self.verdicts.values()), *self.warnings])


def _task_names(task: str | TaskSpec | Sequence[str | TaskSpec]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Names and references of ``task``; TaskSpec objects made here (source ``"built-in"`` by default, but not
    the registry's own) are registered with source ``"python"``."""
    items = [task] if isinstance(task, (str, TaskSpec)) else list(task)
    names: list[str] = []
    for item in items:
        if isinstance(item, TaskSpec):
            registered = item.name in list_tasks() and get_task(item.name) is item
            if not registered:
                register_tasks([replace(item, source="python") if item.source == "built-in" else item])
            names.append(item.name)
    text_names, sources = resolve_task_names([item for item in items if isinstance(item, str)])
    return tuple(dict.fromkeys([*names, *text_names])), sources


def compare(
    task: str | TaskSpec | Sequence[str | TaskSpec],
    optimizers: Sequence[str] = ("adamw",),
    *,
    schedules: Sequence[str] = ("constant",),
    clips: Sequence[str] = ("none",),
    trials: int = 8,
    seeds: int = 3,
    steps: int | None = None,
    tune: Sequence[str] = ("lr",),
    seed: int = 0,
    lr_range: tuple[float, float] | None = None,
    tune_lr_free: bool = False,
    device: str = "cpu",
    db: str | Path = "optimlab.db",
    jobs: int = 1,
    quiet: bool = True,
    new_run: bool = False,
) -> CompareResult:
    """Tune every optimizer × schedule × clipping on ``task`` with the same budget, rerun the best over
    ``seeds`` seeds, store everything in ``db`` (resuming an identical earlier run), and return the result.

    ``task``: a registered name, a ``PATH.py:NAME`` / ``module:NAME`` reference, a :class:`TaskSpec` (e.g. from
    :func:`optimlab.bench.tasks.make_task`), or a list of these. The other arguments are those of
    ``optimlab bench`` (see :class:`optimlab.bench.runner.BenchConfig`). Bad input raises ``ValueError`` /
    ``KeyError`` before anything is written.
    """
    names, sources = _task_names(task)
    config = BenchConfig(tasks=names, optimizers=tuple(optimizers), schedules=tuple(schedules), clips=tuple(clips),
                         trials=trials, seeds=seeds, steps=steps, tune=tuple(tune), seed=seed, task_sources=sources,
                         lr_range=lr_range, device=device, tune_lr_free=tune_lr_free)
    config.validate()
    outcome = run_bench(config, db, jobs=jobs, quiet=quiet, new_run=new_run, command="optimlab.bench.compare(...)")
    with Store(db) as store:
        rows = summarize(store, outcome.run_id)
    rows = [r for r in rows if r["task"] in names]
    return CompareResult(Path(db), outcome.run_id, rows, verdicts(rows), lr_warnings(rows), outcome)
