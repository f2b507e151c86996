"""``optimlab demo functions``: the test-function comparison (see :mod:`optimlab.demos.functions`)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from optimlab.cli.app import check_writable, demo_app, fail


@demo_app.command("functions")
def functions_command(
    out: Path = typer.Option(Path("optimlab-out"), "--out", "-o",
                             help="Folder for rosenbrock.png, nonconvex.png and functions.md."),
    steps: int = typer.Option(1000, help="Maximum optimizer steps per run."),
    seed: int = typer.Option(0, help="Seed of the 10-D nonconvex start point."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """SGD / momentum / Nesterov on Rosenbrock from (-1, 1); SGD, momentum, Adam, AdamW on a 10-D nonconvex
    sum. Writes two figures and the results table (overwritten atomically) and prints the table."""
    from optimlab.demos.functions import (
        NONCONVEX_OPTIMIZERS,
        ROSENBROCK_OPTIMIZERS,
        results_rows,
        run_functions_demo,
        write_functions_demo,
    )
    from optimlab.progress import progress

    if steps < 1:
        raise fail(f"Invalid --steps: {steps} (accepted range: >= 1)")
    check_writable(out, "--out")
    total = len(ROSENBROCK_OPTIMIZERS) + len(NONCONVEX_OPTIMIZERS)
    with progress("demo functions", total=total, quiet=quiet, unit="run") as bar:
        demo = run_functions_demo(max_steps=steps, seed=seed,
                                  on_run=lambda run: bar.advance(optimizer=run.label, gap=run.final_gap))
    paths = write_functions_demo(demo, out)
    table = Table(title="test functions: Rosenbrock from (-1, 1) and the 10-D nonconvex sum",
                  caption="gap = f(x) - f*; converged: gap < 1e-6 (Rosenbrock) / 1e-3 (nonconvex); "
                          "settled: loss within the tolerance of its final value from that step on")
    for column in ("experiment", "optimizer", "steps", "converged at", "settled at", "final loss", "final gap",
                   "dist. to min"):
        table.add_column(column, justify="left" if column in ("experiment", "optimizer") else "right")
    for row in results_rows(demo):
        converged = "not reached" if row["converged_at"] is None else str(row["converged_at"])
        table.add_row(row["experiment"], row["settings"], str(row["steps"]), converged, str(row["settled_at"]),
                      f"{row['final_loss']:.6g}", f"{row['final_gap']:.3g}", f"{row['distance']:.3g}")
    console = Console() if sys.stdout.isatty() else Console(width=132)  # logs and pipes: no wrapping at 80
    console.print(table)
    console.print("\n".join(f"{name}: {path}" for name, path in paths.items()))
