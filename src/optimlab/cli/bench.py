"""``optimlab bench``, ``optimlab runs list|show|compare``, ``optimlab report`` and ``optimlab recommend``."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from optimlab.cli.app import app, fail

runs_app = typer.Typer(help="List, show and compare stored bench runs.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")

DEFAULT_DB = "optimlab.db"
_DB_OPTION = typer.Option(DEFAULT_DB, "--db", help="SQLite file path, or a SQLAlchemy URL (anything with '://', "
                          "e.g. postgresql+psycopg://user@host/dbname).")


def _console() -> Console:
    """Rich console; wide when the output is not a terminal (logs, pipes), so tables are not squeezed."""
    return Console(markup=False) if sys.stdout.isatty() else Console(width=200, markup=False)


def _split(values: list[str] | None) -> tuple[str, ...]:
    """``["a,b", "c"]`` → ``("a", "b", "c")`` (options accept commas and repetition)."""
    return tuple(part.strip() for value in values or [] for part in value.split(",") if part.strip())


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _open_store(db: str, readonly: bool = True) -> Any:
    """The store at ``db`` (read-only unless asked), or a one-line error (exit code 2) when it is unusable."""
    from optimlab.bench.store import Store, StoreError

    try:
        return Store(db, readonly=readonly)
    except StoreError as err:
        raise fail(str(err)) from None


def _summary_table(rows: list[dict[str, Any]], title: str) -> Table:
    """Best configuration per study; the schedule and clip columns appear only when they vary."""
    varying = [key for key in ("schedule", "clip") if len({row[key] for row in rows}) > 1]
    table = Table(title=title)
    for column in ("task", "optimizer", *varying, "best params", "metric mean ± std", "reached", "steps→target",
                   "ms/step", "state B/param", "diverged tune/final"):
        table.add_column(column)
    for row in rows:
        mean, std = row["metric_mean"], row["metric_std"]
        table.add_row(
            row["task"], row["optimizer"], *(row[key] for key in varying), _params(row["params"]),
            f"{row['metric']} {_fmt(mean)} ± {_fmt(std, 2)}" if mean is not None else "diverged",
            f"{row['reached']}/{row['n_seeds']}", _fmt(row["steps_to_target_mean"]), _fmt(row["ms_per_step"], 3),
            _fmt(row["state_bytes_per_param"], 3), f"{row['tune_diverged']}/{row['n_diverged']}",
        )
    return table


@app.command("bench")
def bench_command(
    task: list[str] = typer.Option(None, "--task", "-t", help="Task name(s), comma-separated or repeated."),
    optimizers: list[str] = typer.Option(None, "--optimizers", "-o", help="Optimizer names, comma-separated."),
    schedules: list[str] = typer.Option(None, "--schedules", help="LR schedules: 'constant' or NAME[:k=v,...]."),
    clips: list[str] = typer.Option(None, "--clips", help="Clipping specs: none, norm:1.0, value:0.5, ..."),
    trials: int = typer.Option(None, help="Tuning trials per optimizer (same for all). Default 20, quick 8."),
    seeds: int = typer.Option(None, help="Seeds for the best configuration's reruns. Default 3, quick 2."),
    steps: int = typer.Option(None, help="Steps per trial (default: each task's budget)."),
    tune: str = typer.Option("lr", help="Hyperparameters to search: lr plus any of weight_decay, momentum, eps."),
    quick: bool = typer.Option(False, "--quick", help="Test functions + digits, 4 optimizers, short budgets."),
    jobs: int = typer.Option(None, "--jobs", "-j", help="Parallel worker processes (default: cores, max 4)."),
    seed: int = typer.Option(0, help="Seed of the tuning sampler."),
    db: str = _DB_OPTION,
    new: bool = typer.Option(False, "--new", help="Start a fresh run even if an identical one exists."),
    lease: float = typer.Option(60.0, "--lease", help="Seconds before a silent worker's study goes to another "
                                "worker (workers renew every lease/4)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Tune each optimizer on each task with the same budget, rerun the best over seeds, store everything.

    Rerunning the same command resumes an interrupted run, skipping finished trials.
    """
    from optimlab.bench.runner import QUICK_OPTIMIZERS, QUICK_TASKS, BenchConfig, default_jobs, run_bench, summarize, \
        winners
    from optimlab.bench.store import StoreError, describe
    from optimlab.bench.worker import check_lease
    from optimlab.bench.tasks import list_tasks

    tasks = _split(task) or (QUICK_TASKS if quick else tuple(list_tasks()))
    config = BenchConfig(
        tasks=tasks,
        optimizers=_split(optimizers) or QUICK_OPTIMIZERS,
        schedules=_split(schedules) or ("constant",),
        clips=_split(clips) or ("none",),
        trials=trials if trials is not None else (8 if quick else 20),
        seeds=seeds if seeds is not None else (2 if quick else 3),
        steps=steps,
        quick=quick,
        tune=_split([tune]),
        seed=seed,
    )
    try:
        config.validate()
        check_lease(lease)
    except (KeyError, ValueError, ImportError) as err:
        raise fail(str(err).strip("'\"")) from None
    _open_store(db, readonly=False).close()  # an unusable --db fails here, before any trial
    command = shlex.join(["optimlab", *sys.argv[1:]])
    try:
        result = run_bench(config, db, jobs=jobs or default_jobs(), quiet=quiet, new_run=new, command=command,
                           lease=lease)
    except StoreError as err:
        raise fail(str(err)) from None
    except (KeyError, ValueError) as err:
        raise fail(str(err).strip("'\"")) from None
    console = _console()
    verb = "resumed" if result.resumed else "started"
    others = f", {result.trials_by_others} by other workers" if result.trials_by_others else ""
    console.print(f"run {result.run_id} ({verb}): {result.trials_run} trials run{others}, {result.trials_skipped} "
                  f"already done, {result.diverged} diverged; database {describe(db)}")
    for message in result.messages:
        console.print(message)
    with _open_store(db) as store:
        rows = summarize(store, result.run_id)
    if rows:
        console.print(_summary_table(rows, f"run {result.run_id}: best configuration per optimizer"))
        for name, row in sorted(winners(rows).items()):
            console.print(f"winner {name}: {row['optimizer']} ({row['metric']} {_fmt(row['metric_mean'])})")
    if not result.complete:
        raise typer.Exit(130)
    console.print(f"next: optimlab report {result.run_id} --db {shlex.quote(describe(db))} -o report/")


@runs_app.command("list")
def runs_list(db: str = _DB_OPTION) -> None:
    """List the stored runs, newest first."""
    with _open_store(db) as store:
        runs = store.runs()
    table = Table(title=f"runs in {store.name}")
    for column in ("id", "status", "created", "tasks", "optimizers", "trials", "diverged", "command"):
        table.add_column(column)
    for run in runs:
        config = run["config"]
        table.add_row(str(run["id"]), run["status"], run["created_at"], ",".join(config["tasks"]),
                      ",".join(config["optimizers"]), str(run["n_trials"]), str(run["n_diverged"]), run["command"])
    _console().print(table)


def _resolve_run(store: Any, run_id: str) -> dict[str, Any]:
    try:
        return store.get_run(run_id)
    except (KeyError, ValueError) as err:
        raise fail(str(err).strip("'\"")) from None


@runs_app.command("show")
def runs_show(run_id: str = typer.Argument(..., help="Run id or 'latest'."), db: str = _DB_OPTION) -> None:
    """Show one run: its configuration and the best configuration per task and optimizer."""
    from optimlab.bench.runner import summarize

    with _open_store(db) as store:
        run = _resolve_run(store, run_id)
        rows = summarize(store, run["id"])
    config = run["config"]
    console = _console()
    console.print(f"run {run['id']} [{run['status']}] created {run['created_at']} finished {run['finished_at'] or '—'}")
    console.print(f"command: {run['command']}")
    console.print(f"tasks: {', '.join(config['tasks'])}; optimizers: {', '.join(config['optimizers'])}; "
                  f"schedules: {', '.join(config['schedules'])}; clips: {', '.join(config['clips'])}; "
                  f"trials {config['trials']}, seeds {config['seeds']}, tune {','.join(config['tune'])}")
    console.print(_summary_table(rows, f"run {run['id']}"))


@runs_app.command("compare")
def runs_compare(run_a: str = typer.Argument(..., help="First run id (or 'latest')."),
                 run_b: str = typer.Argument(..., help="Second run id (or 'latest')."),
                 db: str = _DB_OPTION) -> None:
    """Compare two runs side by side on the task/optimizer pairs they share."""
    from optimlab.bench.runner import summarize

    with _open_store(db) as store:
        first, second = _resolve_run(store, run_a), _resolve_run(store, run_b)
        rows_a = {(r["task"], r["optimizer"], r["schedule"], r["clip"]): r for r in summarize(store, first["id"])}
        rows_b = {(r["task"], r["optimizer"], r["schedule"], r["clip"]): r for r in summarize(store, second["id"])}
    shared = sorted(set(rows_a) & set(rows_b))
    if not shared:
        raise fail(f"runs {first['id']} and {second['id']} share no task/optimizer/schedule/clip configuration")
    table = Table(title=f"run {first['id']} vs run {second['id']}")
    for column in ("task", "optimizer", "schedule", "clip", "metric", f"run {first['id']}", f"run {second['id']}",
                   "difference", "better"):
        table.add_column(column)
    for key in shared:
        a, b = rows_a[key], rows_b[key]
        mean_a, mean_b = a["metric_mean"], b["metric_mean"]
        if mean_a is None or mean_b is None:
            diff, better = "—", "—"
        else:
            diff = _fmt(mean_b - mean_a)
            sign = 1.0 if a["mode"] == "min" else -1.0
            better = "tie" if mean_a == mean_b else (
                f"run {first['id']}" if sign * mean_a < sign * mean_b else f"run {second['id']}")
        table.add_row(*key, a["metric"], f"{_fmt(mean_a)} ± {_fmt(a['metric_std'], 2)}",
                      f"{_fmt(mean_b)} ± {_fmt(b['metric_std'], 2)}", diff, better)
    _console().print(table)


@app.command("report")
def report_command(
    run_id: str = typer.Argument("latest", help="Run id or 'latest'."),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="Folder for index.html and the PNGs."),
    db: str = _DB_OPTION,
) -> None:
    """Write an HTML report (index.html + PNG figures) for one run."""
    from optimlab.bench.report import write_report

    with _open_store(db) as store:
        run = _resolve_run(store, run_id)
        page = write_report(store, run["id"], out)
    typer.echo(f"report for run {run['id']}: {page.resolve()}")


@app.command("recommend")
def recommend_command(
    task: str = typer.Option(..., "--task", "-t", help="Task name."),
    db: str = _DB_OPTION,
) -> None:
    """Recommend the best optimizer, learning rate, schedule and clipping for a task from stored results."""
    from optimlab.bench.recommend import recommend
    from optimlab.bench.tasks import get_task

    try:
        get_task(task)
    except KeyError as err:
        raise fail(str(err).strip("'\"")) from None
    with _open_store(db) as store:
        ranking = recommend(store, task)
    if not ranking:
        raise fail(f"no finished results for task {task!r} in {store.name}; run `optimlab bench --task {task}` first")
    best = ranking[0]
    console = _console()
    console.print(f"recommended for {task}: {best.optimizer} with {_params(best.params)}, schedule {best.schedule}, "
                  f"clip {best.clip} → {best.metric} {_fmt(best.mean)} ± {_fmt(best.std, 2)} over {best.n_seeds} "
                  f"seeds (run {best.run_id})")
    table = Table(title=f"{task}: every stored configuration, best first")
    for column in ("rank", "optimizer", "params", "schedule", "clip", "metric (mean ± std)", "seeds", "run"):
        table.add_column(column)
    for rank, row in enumerate(ranking, 1):
        table.add_row(str(rank), row.optimizer, _params(row.params), row.schedule, row.clip,
                      f"{_fmt(row.mean)} ± {_fmt(row.std, 2)}", str(row.n_seeds), str(row.run_id))
    console.print(table)
