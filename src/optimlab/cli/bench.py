"""``optimlab bench``, ``optimlab runs list|show|compare``, ``optimlab report`` and ``optimlab recommend``."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from optimlab.cli.app import app, check_writable, fail

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
    """Best configuration per study; the schedule and clip columns appear only when they vary.
    The metric is mean ± sample std with the number of seeds (deterministic tasks: no spread); gradient
    evaluations to target count SAM's two per step; the ``d`` column (the step size learning-rate-free
    optimizers found, mean over seeds) appears when one is in the run."""
    from optimlab.bench.verdict import spread

    varying = [key for key in ("schedule", "clip") if len({row[key] for row in rows}) > 1]
    table = Table(title=title)
    lr_free = any(row.get("d_mean") is not None for row in rows)
    for column in ("task", "optimizer", *varying, "best params", "metric (mean ± std, seeds)", "reached",
                   "steps→target", "grad evals→target", "s→target", "ms/opt step", "state B/param",
                   *(("d (lr-free)",) if lr_free else ()), "diverged tune/final"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["task"], row["optimizer"], *(row[key] for key in varying), _params(row["params"]),
            f"{row['metric']} {spread(row)}" if row["metric_values"] else "diverged",
            f"{row['reached']}/{row['n_seeds']}", _fmt(row["steps_to_target_mean"]),
            _fmt(row.get("grad_evals_to_target_mean")), _fmt(row["time_to_target_mean"], 3),
            _fmt(row["ms_per_step"], 3), _fmt(row["state_bytes_per_param"], 3),
            *((_fmt(row.get("d_mean"), 3),) if lr_free else ()), f"{row['tune_diverged']}/{row['n_diverged']}",
        )
    return table


def _task_values(values: list[str] | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``--task`` values (names or PATH.py:NAME / module:NAME references) → (names, references); a bad value
    is a one-line error (exit 2)."""
    from optimlab.bench.tasks import TaskLoadError, resolve_task_names

    try:
        return resolve_task_names(_split(values))
    except (KeyError, TaskLoadError) as err:
        raise fail(str(err.args[0] if err.args else err)) from None


def _lr_range(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise fail(f"Invalid --lr-range: {text!r} (accepted: LOW,HIGH, e.g. 1e-5,1e-1)") from None
    if not 0 < low < high:
        raise fail(f"Invalid --lr-range: {text!r} (accepted: 0 < LOW < HIGH)")
    return low, high


def print_verdicts(console: Console, rows: list[dict[str, Any]]) -> None:
    """The verdict line per task, then learning-rate bound warnings."""
    from optimlab.bench.verdict import lr_warnings, verdicts

    for item in verdicts(rows).values():
        console.print(item.text)
    for line in lr_warnings(rows):
        console.print(line)


_TASK_HELP = "Task name(s), or your own: PATH.py:NAME / package.module:NAME (comma-separated or repeated)."
_DEVICE_HELP = ("Where the tasks' models run: cpu or cuda. "
                "\\[default: cuda when available and the task supports it]")


@app.command("bench")
def bench_command(
    task: list[str] = typer.Option(None, "--task", "-t", help=_TASK_HELP),
    optimizers: list[str] = typer.Option(None, "--optimizers", help="Optimizer names, comma-separated."),
    schedules: list[str] = typer.Option(None, "--schedules", help="LR schedules: 'constant' or NAME[:k=v,...]."),
    clips: list[str] = typer.Option(None, "--clips", help="Clipping specs: none, norm:1.0, value:0.5, ..."),
    trials: int = typer.Option(None, help="Tuning trials per optimizer (same for all). "
                               "\\[default: 20; 8 with --quick]"),
    seeds: int = typer.Option(None, help="Seeds for the best configuration's reruns. "
                              "\\[default: 3; 2 with --quick]"),
    steps: int = typer.Option(None, help="Steps per trial. \\[default: each task's budget]"),
    tune: str = typer.Option("lr", help="Hyperparameters to search: lr plus any of weight_decay, momentum, eps."),
    tune_lr_free: bool = typer.Option(False, "--tune-lr-free", help="Also search the lr of learning-rate-free "
                                      "optimizers (prodigy, dadapt-adam: a multiplier of their own step size d). "
                                      "\\[default: held at 1.0]"),
    quick: bool = typer.Option(False, "--quick", help="Test functions + digits, 4 optimizers, short budgets."),
    jobs: int = typer.Option(None, "--jobs", "-j", help="Parallel worker processes. \\[default: cores, max 4]"),
    seed: int = typer.Option(0, help="Seed of the tuning sampler."),
    lr_range: str = typer.Option(None, "--lr-range", help="LOW,HIGH: search the learning rate in this range for "
                                 "every optimizer alike. \\[default: each optimizer's registry bounds]"),
    device: str = typer.Option(None, "--device", help=_DEVICE_HELP),
    db: str = _DB_OPTION,
    new: bool = typer.Option(False, "--new", help="Start a fresh run even if an identical one exists."),
    lease: float = typer.Option(60.0, "--lease", help="Seconds before a silent worker's study goes to another "
                                "worker (workers renew every lease/4)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Tune each optimizer on each task with the same budget, rerun the best over seeds, store everything.

    Rerunning the same command resumes an interrupted run, skipping finished trials.
    """
    from optimlab.bench.runner import QUICK_OPTIMIZERS, QUICK_TASKS, BenchConfig, default_jobs, run_bench, summarize
    from optimlab.bench.store import StoreError, describe
    from optimlab.bench.tasks import TaskLoadError, list_tasks
    from optimlab.bench.worker import check_lease

    tasks, sources = _task_values(task)
    tasks = tasks or (QUICK_TASKS if quick else tuple(list_tasks()))
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
        task_sources=sources,
        lr_range=_lr_range(lr_range),
        device=device or _auto_device(tasks),
        tune_lr_free=tune_lr_free,
    )
    if jobs is not None and jobs < 1:
        raise fail(f"Invalid --jobs: {jobs} (accepted range: >= 1)")
    try:
        config.validate()
        check_lease(lease)
    except (KeyError, ValueError, ImportError) as err:
        raise fail(str(err.args[0] if err.args else err)) from None
    command = shlex.join(["optimlab", *(describe(arg) if "://" in arg else arg for arg in sys.argv[1:])])
    try:
        result = run_bench(config, db, jobs=jobs or default_jobs(), quiet=quiet, new_run=new, command=command,
                           lease=lease)
    except StoreError as err:
        raise fail(str(err)) from None
    except (KeyError, ValueError, TaskLoadError) as err:
        raise fail(str(err.args[0] if err.args else err)) from None
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
        print_verdicts(console, rows)
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


def _auto_device(tasks: tuple[str, ...]) -> str:
    """CUDA when available and every task can run there, else the CPU."""
    from optimlab.bench.runner import default_device
    from optimlab.bench.tasks import get_task

    device = default_device()
    if device != "cpu" and not all(get_task(name).accepts_device for name in tasks):
        return "cpu"
    return device


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
    """Compare two runs side by side on the configurations they share: "better" only beyond the noise
    (Welch's t-test at 5 % over seeds; deterministic tasks: beyond rounding)."""
    from optimlab.bench.runner import summarize
    from optimlab.bench.verdict import compare_groups, spread

    with _open_store(db) as store:
        first, second = _resolve_run(store, run_a), _resolve_run(store, run_b)
        rows_a = {(r["task"], r["optimizer"], r["schedule"], r["clip"]): r for r in summarize(store, first["id"])}
        rows_b = {(r["task"], r["optimizer"], r["schedule"], r["clip"]): r for r in summarize(store, second["id"])}
    shared = sorted(set(rows_a) & set(rows_b))
    if not shared:
        raise fail(f"runs {first['id']} and {second['id']} share no task/optimizer/schedule/clip configuration")
    table = Table(title=f"run {first['id']} vs run {second['id']}")
    for column in ("task", "optimizer", "schedule", "clip", "metric", f"run {first['id']}", f"run {second['id']}",
                   "difference", "better", "Welch p"):
        table.add_column(column)
    for key in shared:
        a, b = rows_a[key], rows_b[key]
        mean_a, mean_b = a["metric_mean"], b["metric_mean"]
        outcome, p_value = compare_groups(a, b)
        better = {"a": f"run {first['id']}", "b": f"run {second['id']}"}.get(outcome, outcome)
        diff = _fmt(mean_b - mean_a) if mean_a is not None and mean_b is not None else "—"
        table.add_row(*key, a["metric"], spread(a) if a["metric_values"] else "diverged",
                      spread(b) if b["metric_values"] else "diverged", diff, better, _fmt(p_value, 2))
    _console().print(table)


@app.command("report")
def report_command(
    run_id: str = typer.Argument("latest", help="Run id or 'latest'."),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="Folder for index.html and the figures."),
    task: list[str] = typer.Option(None, "--task", "-t", help="Only these tasks (names or PATH.py:NAME references). "
                                   "\\[default: every task of the run]"),
    fmt: str = typer.Option("png", "--format", help="Figure format: png or svg."),
    db: str = _DB_OPTION,
) -> None:
    """Write an HTML report (index.html + figures) for one run."""
    from optimlab.bench.report import FORMATS, write_report

    if fmt not in FORMATS:
        raise fail(f"Invalid --format: {fmt!r} (accepted: {', '.join(FORMATS)})")
    tasks = _task_names_in_run(task) if task else None
    created = not out.exists()
    check_writable(out, "--out")
    try:
        with _open_store(db) as store:
            run = _resolve_run(store, run_id)
            if tasks is not None:
                missing = [name for name in tasks if name not in run["config"]["tasks"]]
                if missing:
                    raise fail(f"run {run['id']} has no task {', '.join(map(repr, missing))} (its tasks: "
                               f"{', '.join(run['config']['tasks'])})")
            page = write_report(store, run["id"], out, tasks=tasks, fmt=fmt)
    except typer.Exit:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an unusable --db or run leaves no empty report folder behind
        raise
    typer.echo(f"report for run {run['id']}: {page.resolve()}")


def _task_names_in_run(values: list[str]) -> tuple[str, ...]:
    """``--task`` values of commands that read stored results: names, or references resolved to their names."""
    return _task_values(values)[0]


@app.command("recommend")
def recommend_command(
    task: str = typer.Option(..., "--task", "-t", help="Task name or your own: PATH.py:NAME / package.module:NAME."),
    db: str = _DB_OPTION,
) -> None:
    """Recommend the best optimizer, learning rate, schedule and clipping for a task from stored results,
    with a ready-to-paste snippet that builds them."""
    from optimlab.bench.recommend import recommend, snippet

    names = _task_names_in_run([task])
    console = _console()
    with _open_store(db) as store:
        rankings = {name: recommend(store, name) for name in names}
    for name, ranking in rankings.items():
        if not ranking:
            raise fail(f"no finished results for task {name!r} in {store.name}; run `optimlab bench --task {task}` "
                       "first")
        best = ranking[0]
        console.print(f"recommended for {name}: {best.optimizer} with {_params(best.params)}, schedule "
                      f"{best.schedule}, clip {best.clip} → {best.metric} {best.spread()} (run {best.run_id})")
        console.print(snippet(best))
        table = Table(title=f"{name}: every stored configuration, best first")
        for column in ("rank", "optimizer", "params", "schedule", "clip", "metric (mean ± std, seeds)", "run"):
            table.add_column(column)
        for rank, row in enumerate(ranking, 1):
            table.add_row(str(rank), row.optimizer, _params(row.params), row.schedule, row.clip, row.spread(),
                          str(row.run_id))
        console.print(table)


@app.command("tasks")
def tasks_command(
    task: list[str] = typer.Option(None, "--task", "-t", help="Also load these task references "
                                   "(PATH.py:NAME / package.module:NAME) and list their tasks."),
) -> None:
    """List every task: built-in, from installed packages (entry-point group optimlab.tasks) and from --task."""
    from optimlab.bench.tasks import all_tasks

    _task_values(task)
    specs, errors = all_tasks()
    table = Table(title="tasks")
    for column in ("task", "source", "metric", "target", "steps (quick)", "description"):
        table.add_column(column)
    for spec in specs:
        table.add_row(spec.name, spec.source, f"{spec.metric} ({spec.mode})",
                      f"{'<=' if spec.mode == 'min' else '>='} {spec.target:g}", f"{spec.steps} ({spec.quick_steps})",
                      spec.description)
    console = _console()
    console.print(table)
    for line in errors:
        console.print(f"warning: {line}")
