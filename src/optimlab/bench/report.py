"""The HTML report of one bench run: ``index.html`` plus figures beside it (PNG or SVG), all read from the store.

Top: a summary (per task: the verdict, the tuned configuration, how much better than the runner-up and than
plain AdamW at its tuned learning rate), a table of contents, and across several tasks a performance profile.
Per task: the comparison table (best configuration per optimizer: hyperparameters, metric mean, sample std,
95 % Student-t interval and seeds, steps, gradient evaluations and whole-step seconds to target, ms per
optimizer step, state bytes per parameter, the step size ``d`` a learning-rate-free optimizer found), the sensitivity plot (metric against learning rate for every tuning trial), loss
curves (EMA-smoothed on noisy tasks, raw faint), steps/time-to-target bars when some seed reached the
target (a sentence otherwise; gradient evaluations to target too when an optimizer takes more than one per
step, as SAM does), the learning-rate curves when a schedule is not constant, and for test
functions the 2-D trajectories or the final parameters against the minimiser. Every number cell carries
its exact stored value in a ``data-value`` attribute.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from optimlab.bench import plots
from optimlab.bench.problems import get_problem, list_problems
from optimlab.bench.runner import summarize
from optimlab.bench.store import Store
from optimlab.bench.verdict import RULE, Verdict, lr_warnings, performance_profile, short_label, spread, verdicts
from optimlab.io import atomic_write_text

__all__ = ["FORMATS", "TABLE_COLUMNS", "write_report"]

FORMATS = ("png", "svg")


def smoothing_factor(points: int) -> float | None:
    """The EMA factor of a noisy loss curve of ``points`` steps: a window of about 1/30 of the curve
    (factor 0.9 at 300 steps), so the smoothed line lags by a small fraction of the run; ``None`` below
    60 points (too short to need it)."""
    if points < 60:
        return None
    return 1.0 - 30.0 / points

# (header, key of the row as :func:`_cells` extends it)
TABLE_COLUMNS: list[tuple[str, str]] = [
    ("seeds", "n_seeds"),
    ("metric mean", "metric_mean"),
    ("metric std (sample)", "metric_std"),
    ("95% CI low", "ci_low"),
    ("95% CI high", "ci_high"),
    ("final loss mean", "loss_mean"),
    ("seeds reaching target", "reached"),
    ("steps to target", "steps_to_target_mean"),
    ("gradient evaluations to target", "grad_evals_to_target_mean"),
    ("time to target (s)", "time_to_target_mean"),
    ("ms / optimizer step", "ms_per_step"),
    ("state bytes / param", "state_bytes_per_param"),
    ("diverged tuning trials", "tune_diverged"),
    ("d found (lr-free)", "d_mean"),
]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f0f0f0; } td.name { text-align: left; }
tr.winner td { background: #eaf7ea; } tr.tied td { background: #f5f9e8; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
code { background: #f6f6f6; padding: 1px 4px; } p.warning { color: #a33; } p.verdict { font-size: 1.05em; }
"""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cell(value: Any) -> str:
    if value is None:
        return '<td data-value="">—</td>'
    if isinstance(value, float):
        return f'<td data-value="{value!r}">{value:.4g}</td>'
    return f'<td data-value="{html.escape(str(value))}">{html.escape(str(value))}</td>'


def _cells(row: dict[str, Any]) -> dict[str, Any]:
    """The row plus its interval bounds; deterministic tasks have no spread (std and interval left empty)."""
    low, high = row["metric_ci"] or (None, None)
    extended = {**row, "ci_low": low, "ci_high": high, "d_mean": row.get("d_mean"),
                "grad_evals_to_target_mean": row.get("grad_evals_to_target_mean")}
    if row["deterministic"]:
        extended.update(metric_std=None, ci_low=None, ci_high=None)
    return extended


def _table(rows: Sequence[dict[str, Any]], result: Verdict) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("task", "optimizer", "schedule", "clip", "best hyperparameters",
                                             *(h for h, _ in TABLE_COLUMNS)))
    tied = [(r["optimizer"], r["schedule"], r["clip"]) for r in result.tied]
    body = []
    for row in rows:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items())
        key = (row["optimizer"], row["schedule"], row["clip"])
        css = "winner" if result.kind == "winner" and key in tied else "tied" if result.kind == "tie" and key in tied \
            else ""
        cells = "".join(f'<td class="name">{html.escape(str(row[k]))}</td>'
                        for k in ("task", "optimizer", "schedule", "clip"))
        extended = _cells(row)
        cells += f'<td class="name">{html.escape(params)}</td>' + "".join(_cell(extended[k]) for _, k in TABLE_COLUMNS)
        body.append(f'<tr class="{css}">{cells}</tr>')
    return f'<table class="comparison"><tr>{head}</tr>{"".join(body)}</table>'


def _figure(name: str, caption: str) -> str:
    return (f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _sensitivity(task: str, info: dict[str, Any], rows: Sequence[dict[str, Any]], path: Path) -> str:
    trials = {short_label(r, rows): [(t[0]["lr"], t[1] if t[2] == "complete" else None) for t in r["tune_trials"]]
              for r in rows}
    chosen = {short_label(r, rows): r["params"]["lr"] for r in rows}
    metrics = [m for pairs in trials.values() for _, m in pairs if m is not None and m > 0]
    log_y = info["family"] == "function" and bool(metrics) and max(metrics) / max(min(metrics), 1e-300) > 100
    ranges = [r["lr_range"] for r in rows if r.get("lr_range")]
    fixed = [lr for r in rows if not r.get("lr_range") for lr in [r["params"]["lr"]]]  # an lr-free optimizer's 1.0
    lr_range = (min(low for low, _ in ranges), max(high for _, high in ranges)) if ranges else None
    if lr_range is not None and fixed:
        lr_range = (min(lr_range[0], *fixed), max(lr_range[1], *fixed))
    plots.sensitivity_plot(trials, chosen, path, f"{task}: {info['metric']} after {info['steps']} steps vs learning "
                           "rate (every tuning trial, seed 0)", info["metric"], info["mode"], log_y=log_y,
                           lr_range=lr_range)
    return _figure(path.name, f"{task}: sensitivity: the tuned metric against the learning rate for every tuning "
                              "trial of every optimizer (ring: the chosen one; ×: diverged). A wide good region "
                              "forgives a rough learning rate; a lone good point may mean the budget barely found it.")


def _task_figures(store: Store, run_id: int, task: str, info: dict[str, Any], rows: Sequence[dict[str, Any]],
                  out: Path, fmt: str) -> list[str]:
    """Write the task's figures; returns HTML fragments (figures, or a sentence instead of an empty chart)."""
    finals = {short_label(row, rows): store.trials(run_id, task=task, optimizer=row["optimizer"],
                                                   schedule=row["schedule"], clip=row["clip"], phase="final")
              for row in rows}
    curves_by_label = {label: [store.curve(t["id"]) for t in trials] for label, trials in finals.items()}
    slug = _slug(task)
    parts: list[str] = []
    is_function = info["family"] == "function"

    parts.append(_sensitivity(task, info, rows, out / f"{slug}-sensitivity.{fmt}"))

    curve_column, ylabel = (2, "optimality gap f(x) - f*") if is_function else (1, "training loss")
    series = {label: [([c[0] for c in curve if c[curve_column] is not None],
                       [c[curve_column] for c in curve if c[curve_column] is not None]) for curve in curves]
              for label, curves in curves_by_label.items()}
    smooth = None if is_function else smoothing_factor(max((len(s[0][0]) for s in series.values() if s), default=1))
    name = f"{slug}-loss.{fmt}"
    how = f"; EMA {smooth:.2g}, raw mean faint" if smooth else ""
    plots.curves_plot(series, out / name, f"{task}: {ylabel} (mean over seeds, min–max band{how})", ylabel,
                      smooth=smooth)
    parts.append(_figure(name, f"{task}: {ylabel} per step for each optimizer's best configuration."))

    target = f"{info['metric']} {'<=' if info['mode'] == 'min' else '>='} {info['target']:g}"
    if any(row["reached"] for row in rows):
        charts = [("steps_to_target", "steps", "optimizer steps"),
                  ("time_to_target", "seconds", "whole-step wall time (s)")]
        if any((row.get("grad_evals_per_step") or 1.0) > 1.0 for row in rows):  # SAM: two per step
            charts.insert(1, ("grad_evals_to_target", "gradient evaluations", "forward + backward passes"))
        for key, label_text, ylabel_text in charts:
            values = {}
            for label, trials in finals.items():
                reached = [t[key] for t in trials if t.get(key) is not None]
                mean = float(np.mean(reached)) if reached else None
                std = float(np.std(reached, ddof=1)) if len(reached) > 1 else None
                values[label] = (mean, std, f"{len(reached)}/{len(trials)} reached")
            name = f"{slug}-{key.replace('_', '-')}.{fmt}"
            plots.bars_plot(values, out / name, f"{task}: {label_text} to reach {target}", ylabel_text)
            parts.append(_figure(name, f"{task}: {label_text} until {target}, mean ± sample std over the seeds that "
                                       "reached it (time: forward, backward and optimizer steps, evaluations "
                                       "excluded)."))
    else:
        parts.append(f"<p>No seed of any configuration reached the target ({html.escape(target)}) within "
                     f"{info['steps']} steps, so there is no steps- or time-to-target chart.</p>")

    scheduled = {short_label(row, rows) for row in rows if row["schedule"] != "constant"}
    if scheduled:
        lr_curves = {label: ([c[0] for c in curves[0]], [c[3] for c in curves[0]])
                     for label, curves in curves_by_label.items() if label in scheduled and curves and curves[0]}
        name = f"{slug}-lr.{fmt}"
        plots.lr_plot(lr_curves, out / name, f"{task}: learning rate per step (best configuration, first seed)")
        parts.append(_figure(name, f"{task}: the learning-rate schedules used (constant ones left out: a flat line "
                                   "at the tuned lr in the table)."))

    if is_function and task in list_problems():
        parts.extend(_function_figures(task, finals, store, slug, out, fmt))
    return parts


def _function_figures(task: str, finals: dict[str, list[dict[str, Any]]], store: Store, slug: str, out: Path,
                      fmt: str) -> list[str]:
    problem = get_problem(task)
    first_trials = {label: trials[0] for label, trials in finals.items() if trials}
    if problem.dim == 2:
        trajectories = {label: store.artifact(t["id"], "trajectory") for label, t in first_trials.items()}
        trajectories = {k: v for k, v in trajectories.items() if v}
        if not trajectories:
            return []
        name = f"{slug}-trajectories.{fmt}"
        plots.trajectories_plot(problem, trajectories, out / name, f"{task}: trajectories (best configuration)")
        return [_figure(name, f"{task}: iterates over log-spaced contours of f - f*; start, end, minimum.")]
    points = {label: store.artifact(t["id"], "final_point") for label, t in first_trials.items()}
    points = {k: v for k, v in points.items() if v}
    if not points:
        return []
    name = f"{slug}-final-params.{fmt}"
    plots.final_point_plot(points, problem.minima[0], out / name, f"{task}: final parameters vs the global minimiser")
    return [_figure(name, f"{task}: each coordinate at the end of training next to the minimiser.")]


def _difference(best: dict[str, Any], other: dict[str, Any]) -> str:
    diff = abs(best["metric_mean"] - other["metric_mean"])
    relative = f" ({diff / abs(other['metric_mean']):.1%})" if other["metric_mean"] else ""
    direction = "lower" if best["mode"] == "min" else "higher"
    return f"{diff:.3g} {direction}{relative}"


def _summary_item(task: str, result: Verdict, rows: Sequence[dict[str, Any]]) -> str:
    """One summary bullet: verdict, tuned configuration, margins over the runner-up and plain AdamW."""
    text = html.escape(result.text.split(": ", 1)[1] if ": " in result.text else result.text)
    link = f'<a href="#{_slug(task)}">{html.escape(task)}</a>'
    if result.best is None:
        return f"<li>{link}: {text}</li>"
    margins = []
    best = result.best
    if result.runner_up is not None and result.runner_up["metric_values"]:
        margins.append(f"{_difference(best, result.runner_up)} than the runner-up "
                       f"{html.escape(short_label(result.runner_up, rows))}")
    plain = [r for r in rows if r["optimizer"] == "adamw" and r["schedule"] == "constant" and r["clip"] == "none"
             and r["metric_values"]]
    if plain and plain[0] is not best:
        margins.append(f"{_difference(best, plain[0])} than plain AdamW at its tuned lr "
                       f"({plain[0]['params']['lr']:.3g}: {html.escape(spread(plain[0]))})")
    elif not plain:
        margins.append("plain AdamW (constant lr, no clipping) was not in this run")
    return f"<li>{link}: {text}" + (f"<br>Best mean: {'; '.join(margins)}." if margins else "") + "</li>"


def _profile_section(rows: Sequence[dict[str, Any]], out: Path, fmt: str) -> str:
    profile = performance_profile(rows)
    finite = [r for ratios in profile.ratios.values() for r in ratios if math.isfinite(r)]
    if not finite:
        return ("<h2 id=\"profile\">Performance profile</h2><p>No configuration reached the target on every seed "
                "of any task, so there is no performance profile.</p>")
    top = max(10.0, max(finite) * 1.5)
    taus = list(np.logspace(0, math.log10(top), 200))
    fractions = {label: [profile.fraction(label, tau) for tau in taus] for label in profile.ratios}
    name = f"performance-profile.{fmt}"
    plots.profile_plot(fractions, taus, out / name, f"Performance profile over {len(profile.tasks)} tasks "
                       "(time to target)")
    lines = "".join(f"<li>{html.escape(line)}</li>" for line in profile.summaries.values())
    return ('<h2 id="profile">Performance profile</h2>'
            + _figure(name, "For each configuration, the fraction of tasks whose target it reached on every seed "
                            "within τ × the fastest configuration's mean whole-step time (Dolan & Moré 2002, as in "
                            "AlgoPerf). Higher and further left is better.")
            + f"<ul>{lines}</ul>")


def write_report(store: Store, run_id: int, out: str | Path, tasks: Sequence[str] | None = None,
                 fmt: str = "png") -> Path:
    """Write ``out/index.html`` and its figures for run ``run_id`` (only ``tasks`` when given; figures
    in ``fmt``: ``"png"`` or ``"svg"``); returns the HTML path."""
    if fmt not in FORMATS:
        raise ValueError(f"Invalid format: {fmt!r} (accepted: {', '.join(FORMATS)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = store.get_run(run_id)
    config = run["config"]
    wanted = [t for t in config["tasks"] if tasks is None or t in tasks]
    rows = [r for r in summarize(store, run_id) if r["task"] in wanted]
    results = verdicts(rows)
    sections, summary, toc = [], [], []
    for task in wanted:
        task_rows = [r for r in rows if r["task"] == task]
        if not task_rows:
            continue
        info = config["task_info"][task]
        result = results[task]
        figures = _task_figures(store, run_id, task, info, task_rows, out, fmt)
        warnings = "".join(f'<p class="warning">{html.escape(line)}</p>' for line in lr_warnings(task_rows))
        summary.append(_summary_item(task, result, task_rows))
        toc.append(f'<li><a href="#{_slug(task)}">{html.escape(task)}</a></li>')
        source = "" if info.get("source", "built-in") == "built-in" else \
            f" Source: <code>{html.escape(info['source'])}</code>."
        sections.append(
            f'<section id="{_slug(task)}"><h2>{html.escape(task)}</h2>'
            f"<p>{html.escape(info['description'])}. Metric <code>{html.escape(info['metric'])}</code> "
            f"({'lower' if info['mode'] == 'min' else 'higher'} is better), target {info['target']:g}, "
            f"{info['steps']} steps per trial{', deterministic' if info.get('deterministic') else ''}.{source}</p>"
            f'<p class="verdict"><b>{html.escape(result.text)}</b></p>{warnings}'
            f"{_table(task_rows, result)}{''.join(figures)}</section>"
        )
    profile = _profile_section(rows, out, fmt) if len(sections) > 1 else ""
    if profile:
        toc.insert(0, '<li><a href="#profile">Performance profile</a></li>')
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>optimlab bench run {run_id}</title>
<style>{_STYLE}</style></head><body>
<h1>optimlab bench — run {run_id}</h1>
<h2>Summary</h2>
<ul class="summary">{''.join(summary)}</ul>
<p>Every optimizer had {config['trials']} tuning trials (Optuna TPE, seed {config['seed']}, searching
{html.escape(', '.join(config['tune']))}); its best configuration was rerun with {config['seeds']} seeds.
Values are mean ± sample standard deviation over those seeds with the number of seeds (n); the table adds the
95 % Student-t interval of the mean. Verdict rule: {html.escape(RULE)}. Status <b>{html.escape(run['status'])}</b>,
created {html.escape(run['created_at'])}. Command: <code>{html.escape(run['command'] or '—')}</code></p>
<h2>Contents</h2>
<ul class="toc">{''.join(toc)}</ul>
{profile}
{''.join(sections)}
</body></html>
"""
    index = out / "index.html"
    atomic_write_text(index, page)
    return index
