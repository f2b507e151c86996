"""The HTML report of one bench run: ``index.html`` plus PNG figures beside it, all read from the store.

Per task: the comparison table (best configuration per optimizer: hyperparameters, metric mean ± std over
seeds, steps and time to target, ms per optimizer step, optimizer-state bytes per parameter), loss curves
with seed bands, steps-to-target and time-to-target bars, the learning-rate curves used, and for test
functions the 2-D trajectories over log contours or, in more dimensions, the final parameters against
the minimiser. Every number cell carries its exact stored value in a ``data-value`` attribute.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optimlab.bench import plots
from optimlab.bench.problems import get_problem, list_problems
from optimlab.bench.runner import summarize, winners
from optimlab.bench.store import Store
from optimlab.io import atomic_write_text

__all__ = ["write_report", "TABLE_COLUMNS"]

# (header, summary key)
TABLE_COLUMNS: list[tuple[str, str]] = [
    ("metric mean", "metric_mean"),
    ("metric std", "metric_std"),
    ("final loss mean", "loss_mean"),
    ("seeds reaching target", "reached"),
    ("steps to target", "steps_to_target_mean"),
    ("time to target (s)", "time_to_target_mean"),
    ("ms / optimizer step", "ms_per_step"),
    ("state bytes / param", "state_bytes_per_param"),
    ("diverged tuning trials", "tune_diverged"),
]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f0f0f0; } td.name { text-align: left; }
tr.winner td { background: #eaf7ea; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
code { background: #f6f6f6; padding: 1px 4px; }
"""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cell(value: Any) -> str:
    if value is None:
        return '<td data-value="">—</td>'
    if isinstance(value, float):
        return f'<td data-value="{value!r}">{value:.4g}</td>'
    return f'<td data-value="{html.escape(str(value))}">{html.escape(str(value))}</td>'


def _label(row: dict[str, Any], vary_schedule: bool, vary_clip: bool) -> str:
    parts = [row["optimizer"]]
    if vary_schedule:
        parts.append(row["schedule"])
    if vary_clip:
        parts.append(row["clip"])
    return " / ".join(parts)


def _table(rows: Sequence[dict[str, Any]], winner: dict[str, Any] | None) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("task", "optimizer", "schedule", "clip", "best hyperparameters",
                                             *(h for h, _ in TABLE_COLUMNS)))
    body = []
    for row in rows:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items())
        is_winner = winner is not None and all(row[k] == winner[k] for k in ("optimizer", "schedule", "clip"))
        cells = "".join(f'<td class="name">{html.escape(str(row[k]))}</td>'
                        for k in ("task", "optimizer", "schedule", "clip"))
        cells += f'<td class="name">{html.escape(params)}</td>' + "".join(_cell(row[key]) for _, key in TABLE_COLUMNS)
        body.append(f'<tr class="{"winner" if is_winner else ""}">{cells}</tr>')
    return f'<table class="comparison"><tr>{head}</tr>{"".join(body)}</table>'


def _task_figures(store: Store, run_id: int, task: str, info: dict[str, Any], rows: Sequence[dict[str, Any]],
                  out: Path) -> list[tuple[str, str]]:
    """Write the task's PNGs; returns ``(file name, caption)`` pairs."""
    vary_schedule = len({r["schedule"] for r in rows}) > 1
    vary_clip = len({r["clip"] for r in rows}) > 1
    finals: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        finals[_label(row, vary_schedule, vary_clip)] = store.trials(
            run_id, task=task, optimizer=row["optimizer"], schedule=row["schedule"], clip=row["clip"], phase="final")
    curves_by_label = {label: [store.curve(t["id"]) for t in trials] for label, trials in finals.items()}
    slug = _slug(task)
    figures: list[tuple[str, str]] = []
    is_function = info["family"] == "function"

    curve_column, ylabel = (2, "optimality gap f(x) - f*") if is_function else (1, "training loss")
    series = {}
    for label, curves in curves_by_label.items():
        series[label] = [([c[0] for c in curve if c[curve_column] is not None],
                          [c[curve_column] for c in curve if c[curve_column] is not None]) for curve in curves]
    name = f"{slug}-loss.png"
    plots.curves_plot(series, out / name, f"{task}: {ylabel} (mean, min–max band over seeds)", ylabel)
    figures.append((name, f"{task}: {ylabel} per step for each optimizer's best configuration."))

    for key, label_text, ylabel_text in (("steps_to_target", "steps", "optimizer steps"),
                                         ("time_to_target", "seconds", "wall time (s)")):
        values = {}
        for row in rows:
            label = _label(row, vary_schedule, vary_clip)
            reached = [t[key] for t in finals[label] if t[key] is not None]
            mean = sum(reached) / len(reached) if reached else None
            std = (sum((v - mean) ** 2 for v in reached) / len(reached)) ** 0.5 if reached else None
            values[label] = (mean, std, f"{len(reached)}/{len(finals[label])} reached")
        name = f"{slug}-{key.replace('_', '-')}.png"
        target = f"{info['metric']} {'<=' if info['mode'] == 'min' else '>='} {info['target']:g}"
        plots.bars_plot(values, out / name, f"{task}: {label_text} to reach {target}", ylabel_text)
        figures.append((name, f"{task}: {label_text} until {target}, mean ± std over the seeds that reached it."))

    lr_curves = {label: ([c[0] for c in curves[0]], [c[3] for c in curves[0]])
                 for label, curves in curves_by_label.items() if curves and curves[0]}
    name = f"{slug}-lr.png"
    plots.lr_plot(lr_curves, out / name, f"{task}: learning rate per step (best configuration, first seed)")
    figures.append((name, f"{task}: the learning-rate schedules used."))

    if is_function and task in list_problems():
        problem = get_problem(task)
        first_trials = {label: trials[0] for label, trials in finals.items() if trials}
        if problem.dim == 2:
            trajectories = {label: store.artifact(t["id"], "trajectory") for label, t in first_trials.items()}
            trajectories = {k: v for k, v in trajectories.items() if v}
            if trajectories:
                name = f"{slug}-trajectories.png"
                plots.trajectories_plot(problem, trajectories, out / name, f"{task}: trajectories (best configuration)")
                figures.append((name, f"{task}: iterates over log-spaced contours of f - f*; start, end, minimum."))
        else:
            points = {label: store.artifact(t["id"], "final_point") for label, t in first_trials.items()}
            points = {k: v for k, v in points.items() if v}
            if points:
                name = f"{slug}-final-params.png"
                plots.final_point_plot(points, problem.minima[0], out / name,
                                       f"{task}: final parameters vs the global minimiser")
                figures.append((name, f"{task}: each coordinate at the end of training next to the minimiser."))
    return figures


def write_report(store: Store, run_id: int, out: str | Path) -> Path:
    """Write ``out/index.html`` and its PNGs for run ``run_id``; returns the HTML path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = store.get_run(run_id)
    config = run["config"]
    rows = summarize(store, run_id)
    best = winners(rows)
    sections = []
    for task in config["tasks"]:
        task_rows = [r for r in rows if r["task"] == task]
        if not task_rows:
            continue
        info = config["task_info"][task]
        winner = best.get(task)
        figures = _task_figures(store, run_id, task, info, task_rows, out)
        images = "".join(f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>" for name, caption in figures)
        verdict = (f"<p>Best: <b>{html.escape(winner['optimizer'])}</b> ({html.escape(info['metric'])} "
                   f"{winner['metric_mean']:.4g}).</p>") if winner else "<p>Every configuration diverged.</p>"
        sections.append(
            f'<section id="{_slug(task)}"><h2>{html.escape(task)}</h2>'
            f"<p>{html.escape(info['description'])}. Metric <code>{html.escape(info['metric'])}</code> "
            f"({'lower' if info['mode'] == 'min' else 'higher'} is better), target {info['target']:g}, "
            f"{info['steps']} steps per trial.</p>{verdict}{_table(task_rows, winner)}{images}</section>"
        )
    overview = "".join(
        f'<tr><td class="name"><a href="#{_slug(task)}">{html.escape(task)}</a></td>'
        f'<td class="name">{html.escape(row["optimizer"])}</td><td class="name">{html.escape(row["metric"])}</td>'
        f"{_cell(row['metric_mean'])}</tr>"
        for task, row in sorted(best.items()))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>optimlab bench run {run_id}</title>
<style>{_STYLE}</style></head><body>
<h1>optimlab bench — run {run_id}</h1>
<p>Status <b>{html.escape(run['status'])}</b>, created {html.escape(run['created_at'])}.
Command: <code>{html.escape(run['command'] or '—')}</code></p>
<p>Every optimizer had {config['trials']} tuning trials (Optuna TPE, seed {config['seed']}, searching
{html.escape(', '.join(config['tune']))}); its best configuration was rerun with {config['seeds']} seeds.
Means and standard deviations are over those seeds.</p>
<h2>Winners</h2>
<table class="winners"><tr><th>task</th><th>best optimizer</th><th>metric</th><th>mean over seeds</th></tr>
{overview}</table>
{''.join(sections)}
</body></html>
"""
    index = out / "index.html"
    atomic_write_text(index, page)
    return index
