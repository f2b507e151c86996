"""Verdicts the data support, from :func:`optimlab.bench.runner.summarize` rows.

Per task (:func:`verdict`):

* nothing finished → "every configuration diverged";
* no configuration reached the target on any seed → "no configuration reached the target (best: …)",
  nobody crowned;
* otherwise the configurations are ranked by mean metric; the best is the **winner** only when it differs
  from the runner-up beyond the noise (:func:`optimlab.bench.stats.significantly_different`: Welch's
  two-sided t-test at 5 % over seeds, or any difference beyond rounding on a deterministic task);
  else every configuration not distinguishable from the best is listed: "tie: A, B (within noise)".
  On a deterministic task the rule is target-aware: two configurations whose final metrics both meet the
  target tie whatever their gap (0 against 5e-7 when the target is a gap <= 1e-3: the target says what
  matters, and rounding-level differences there only reflect where the iterates stopped), "tie: A, B
  (both meet the target)".

Also: :func:`lr_warnings` (a tuned learning rate within a factor 1.5 of its search bound),
:func:`compare_groups` (for ``runs compare``) and :func:`performance_profile` (Dolan & Moré 2002, the
AlgoPerf way: for each configuration, the fraction of tasks it solves within τ × the fastest time).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from optimlab.bench import stats

__all__ = ["RULE", "BOUND_FACTOR", "Verdict", "config_label", "meets_target", "verdict", "verdicts", "lr_warnings", "compare_groups",
           "Profile", "performance_profile"]

RULE = ("winner only when it beats the runner-up beyond the noise: Welch's two-sided t-test at 5 % over seeds; "
        f"deterministic tasks: any difference beyond relative {stats.DETERMINISTIC_RTOL:g}, and two configurations "
        "that both meet the target tie")
BOUND_FACTOR = 1.5
_TINY = 1e-9  # seconds: a target met before the first step counts as this fast


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def config_label(row: dict[str, Any]) -> str:
    """``"adamw (lr=0.0031, schedule constant, clip none)"``: the whole configuration."""
    params = ", ".join(f"{k}={_fmt(v)}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items())
    return f"{row['optimizer']} ({params}, schedule {row['schedule']}, clip {row['clip']})"


def short_label(row: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """The optimizer name, plus schedule and clip where they vary among ``rows``."""
    parts = [row["optimizer"]]
    for key in ("schedule", "clip"):
        if len({r[key] for r in rows}) > 1:
            parts.append(row[key])
    return " / ".join(parts)


def spread(row: dict[str, Any]) -> str:
    """The row's metric as ``mean ± std (n=N)`` (or deterministic / single seed forms)."""
    return stats.format_value(stats.describe(row["metric_values"]), row["deterministic"])


def meets_target(row: dict[str, Any]) -> bool:
    """Whether the row's mean final metric meets its task's target (``<=`` for min-mode, ``>=`` for max-mode)."""
    mean = row["metric_mean"]
    return mean is not None and (mean <= row["target"] if row["mode"] == "min" else mean >= row["target"])


def _distinguishable(best: dict[str, Any], row: dict[str, Any]) -> bool | None:
    """Whether ``row`` differs from ``best`` beyond the noise (``None``: unknown, a single seed); on a
    deterministic task two configurations that both meet the target do not differ (module docstring)."""
    if best["deterministic"] and meets_target(best) and meets_target(row):
        return False
    return stats.significantly_different(best["metric_values"], row["metric_values"], best["deterministic"])


def _ranked(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    sign = 1.0 if rows[0]["mode"] == "min" else -1.0
    return sorted(rows, key=lambda r: (sign * r["metric_mean"], r["steps_to_target_mean"] or math.inf,
                                       r["optimizer"], r["schedule"], r["clip"]))


@dataclass
class Verdict:
    """One task's verdict.

    Attributes:
        task: the task.
        kind: ``"winner"``, ``"tie"``, ``"unreached"`` (no configuration reached the target) or ``"diverged"``.
        best: the best-ranked row (``None`` when everything diverged).
        tied: the rows not distinguishable from the best (the best first; just the best for a winner).
        runner_up: the second-ranked row, if any.
        p_value: Welch's p between the best and the runner-up (``None``: deterministic, or a single seed).
        text: the one-line verdict.
    """

    task: str
    kind: str
    best: dict[str, Any] | None
    tied: list[dict[str, Any]] = field(default_factory=list)
    runner_up: dict[str, Any] | None = None
    p_value: float | None = None
    text: str = ""


def verdict(task: str, rows: Sequence[dict[str, Any]]) -> Verdict:
    """The verdict for one task's summary rows (see the module docstring)."""
    finished = [r for r in rows if r["task"] == task and r["metric_values"]]
    if not finished:
        return Verdict(task, "diverged", None, text=f"{task}: every configuration diverged")
    ranked = _ranked(finished)
    best = ranked[0]
    runner_up = ranked[1] if len(ranked) > 1 else None
    metric = best["metric"]
    if not any(r["reached"] for r in finished):
        op = "<=" if best["mode"] == "min" else ">="
        return Verdict(task, "unreached", best, [best], runner_up, text=(
            f"{task}: no configuration reached the target ({metric} {op} {best['target']:g}) "
            f"(best: {config_label(best)}, {metric} {spread(best)})"))
    deterministic = best["deterministic"]
    tied, unknown = [best], False
    for row in ranked[1:]:
        different = _distinguishable(best, row)
        unknown |= different is None
        if not different:
            tied.append(row)
    p_value = None
    if runner_up is not None and not deterministic:
        welch = stats.welch_test(best["metric_values"], runner_up["metric_values"])
        p_value = welch.p if welch else None
    if len(tied) == 1:
        against = ""
        if runner_up is not None:
            evidence = "" if deterministic else f", Welch p={p_value:.2g}"
            against = f"; runner-up {short_label(runner_up, finished)} {spread(runner_up)}{evidence}"
        text = f"{task}: winner {config_label(best)}: {metric} {spread(best)}{against}"
        return Verdict(task, "winner", best, tied, runner_up, p_value, text)
    names = ", ".join(short_label(r, finished) for r in tied)
    why = ("a single seed: noise unknown" if unknown
           else f"{'both' if len(tied) == 2 else 'all'} meet the target" if deterministic
           and all(meets_target(r) for r in tied) else "within noise")
    return Verdict(task, "tie", best, tied, runner_up, p_value,
                   f"{task}: tie: {names} ({why}); best mean {config_label(best)}: {metric} {spread(best)}")


def verdicts(rows: Sequence[dict[str, Any]]) -> dict[str, Verdict]:
    """:func:`verdict` for every task in ``rows`` (in first-seen order)."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    return {task: verdict(task, rows) for task in tasks}


def lr_warnings(rows: Sequence[dict[str, Any]], factor: float = BOUND_FACTOR) -> list[str]:
    """One line per configuration whose tuned learning rate lies within ``factor`` of its search bound."""
    lines = []
    for row in rows:
        lr, bounds = row["params"].get("lr"), row.get("lr_range")
        if lr is None or not bounds:
            continue
        low, high = bounds
        side = "lower" if lr < low * factor else "upper" if lr > high / factor else None
        if side:
            bound = low if side == "lower" else high
            lines.append(f"warning: {row['task']}/{row['optimizer']}: tuned lr {_fmt(lr)} lies within {factor:g}x of "
                         f"the {side} search bound {_fmt(bound)}; the best may lie outside: widen the range "
                         f"(--lr-range LOW,HIGH)")
    return lines


def compare_groups(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, float | None]:
    """Which of two summary rows of the same configuration is better beyond the noise:
    ``("a" | "b" | "within noise" | "both meet the target" | "noise unknown", Welch p or None)``; on a
    deterministic task two different results that both meet the target are not ranked (as in :func:`verdict`)."""
    if not a["metric_values"] or not b["metric_values"]:
        return "—", None
    deterministic = a["deterministic"] and b["deterministic"]
    different = stats.significantly_different(a["metric_values"], b["metric_values"], deterministic)
    welch = None if deterministic else stats.welch_test(a["metric_values"], b["metric_values"])
    p = welch.p if welch else None
    if different is None:
        return "noise unknown", p
    if not different:
        return "within noise", p
    if deterministic and meets_target(a) and meets_target(b):
        return "both meet the target", None
    sign = 1.0 if a["mode"] == "min" else -1.0
    return ("a" if sign * a["metric_mean"] < sign * b["metric_mean"] else "b"), p


@dataclass(frozen=True)
class Profile:
    """A performance profile: per configuration label, the time-to-target ratio to the fastest on each task
    (``inf`` when it did not solve it), and a one-line summary."""

    tasks: list[str]
    ratios: dict[str, list[float]]
    summaries: dict[str, str]

    def fraction(self, label: str, tau: float) -> float:
        """:math:`\\rho(\\tau)`: the fraction of tasks ``label`` solves within ``tau`` × the fastest time."""
        return sum(r <= tau for r in self.ratios[label]) / len(self.tasks)


def performance_profile(rows: Sequence[dict[str, Any]]) -> Profile:
    """The profile over every task in ``rows``. A configuration *solves* a task when every one of its seeds
    reached the target; its time is the mean whole-step time-to-target over them."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    labels = list(dict.fromkeys(short_label(r, rows) for r in rows))
    times: dict[str, dict[str, float]] = {label: {} for label in labels}
    for row in rows:
        solved = row["n_seeds"] > 0 and row["reached"] == row["n_seeds"] and row["time_to_target_mean"] is not None
        times[short_label(row, rows)][row["task"]] = row["time_to_target_mean"] if solved else math.inf
    fastest = {t: min(times[label].get(t, math.inf) for label in labels) for t in tasks}
    ratios = {label: [max(times[label].get(t, math.inf), _TINY) / max(fastest[t], _TINY) for t in tasks]
              for label in labels}
    summaries = {}
    for label, values in ratios.items():
        solved = sum(math.isfinite(v) for v in values)
        best = sum(v == 1.0 for v in values)
        within2 = sum(v <= 2.0 for v in values)
        summaries[label] = (f"{label}: solved {solved}/{len(tasks)} tasks, fastest on {best}, within 2x of the "
                            f"fastest on {within2}")
    return Profile(tasks, ratios, summaries)
