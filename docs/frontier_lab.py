"""The tables of docs/frontier_lab.md from a bench database: per task, each optimizer's tuned configuration with
its metric, steps, gradient evaluations and whole-step seconds to target (mean ± 95 % Student-t half-width over
the seeds, with n), each against tuned AdamW's, the ms per optimizer step and the d of the lr-free ones; then
the verdict lines and warnings exactly as ``optimlab bench`` prints them.

    OMP_NUM_THREADS=1 python docs/frontier_lab.py DB [RUN]        # RUN defaults to the latest
"""

from __future__ import annotations

import sys
from typing import Any

from optimlab.bench import stats
from optimlab.bench.runner import summarize
from optimlab.bench.store import Store
from optimlab.bench.verdict import lr_warnings, verdicts

BASELINE = "adamw"


def _spread(values: list[float], digits: int = 4) -> str:
    """``mean ± half-width (n=N)`` of the 95 % interval; ``—`` for no values, ``mean (n=1)`` for one."""
    if not values:
        return "—"
    summary = stats.describe(values)
    if summary.ci_low is None:
        return f"{summary.mean:.{digits}g} (n=1)"
    return f"{summary.mean:.{digits}g} ± {(summary.ci_high - summary.ci_low) / 2:.2g} (n={summary.n})"


def _ratio(value: float | None, baseline: float | None) -> str:
    return f"{value / baseline:.2f}x" if value is not None and baseline else "—"


def _finals(store: Store, run_id: int, row: dict[str, Any]) -> list[dict[str, Any]]:
    return store.trials(run_id, task=row["task"], optimizer=row["optimizer"], schedule=row["schedule"],
                        clip=row["clip"], phase="final")


def table(store: Store, run_id: int, rows: list[dict[str, Any]]) -> list[str]:
    """One markdown table for one task's summary rows."""
    base = next((r for r in rows if r["optimizer"] == BASELINE), None)
    lines = ["| optimizer | lr | " + rows[0]["metric"] + " (mean ± 95% CI) | reached | steps to target | vs AdamW "
             "| gradient evaluations to target | time to target (s) | vs AdamW | ms / opt. step | d (lr-free) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["optimizer"] != BASELINE, r["optimizer"])):
        reached = [t for t in _finals(store, run_id, row) if t["steps_to_target"] is not None]
        steps = [float(t["steps_to_target"]) for t in reached]
        evals = [float(t["grad_evals_to_target"]) for t in reached if t.get("grad_evals_to_target") is not None]
        seconds = [t["time_to_target"] for t in reached]
        d = f"{row['d_mean']:.3g}" if row.get("d_mean") is not None else "—"
        lines.append(
            f"| {row['optimizer']} | {row['params']['lr']:.3g} | {_spread(row['metric_values'])} | "
            f"{row['reached']}/{row['n_seeds']} | {_spread(steps, 3)} | "
            f"{_ratio(row['steps_to_target_mean'], base and base['steps_to_target_mean'])} | {_spread(evals, 3)} | "
            f"{_spread(seconds, 3)} | {_ratio(row['time_to_target_mean'], base and base['time_to_target_mean'])} | "
            f"{row['ms_per_step']:.3g} | {d} |")
    return lines


def main(db: str, run: str = "latest") -> None:
    with Store(db, readonly=True) as store:
        run_id = int(store.get_run(run)["id"])
        rows = summarize(store, run_id)
        for task in dict.fromkeys(r["task"] for r in rows):
            print(f"\n**{task}**\n")
            print("\n".join(table(store, run_id, [r for r in rows if r["task"] == task])))
    print("\n```")
    for item in verdicts(rows).values():
        print(item.text)
    for line in lr_warnings(rows):
        print(line)
    print("```")


if __name__ == "__main__":
    main(*sys.argv[1:])
