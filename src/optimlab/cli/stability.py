"""``optimlab demo clipping``: the seed's clipping study (see :mod:`optimlab.demos.clipping`)."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from optimlab.cli.app import check_writable, demo_app, fail


@demo_app.command("clipping")
def clipping_command(
    out: Path = typer.Option(Path("optimlab-out"), "--out", "-o", help="Folder for clipping.png and clipping.json."),
    epochs: int = typer.Option(100, help="Epochs per method."),
    lr: float = typer.Option(0.01, help="SGD learning rate."),
    seed: int = typer.Option(0, help="Seed of the data, the initial weights and the batch order."),
    guard: bool = typer.Option(True, "--guard/--no-guard", help="Skip and count steps with NaN/inf gradients."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Train an exploding 3-layer RNN four ways (no clipping, norm 1.0, value 0.5, adaptive) from identical
    weights; write a 2x2 figure and print the statistics table."""
    from optimlab.demos.clipping import METHODS, run_clipping_study, statistics_rows, write_clipping_study
    from optimlab.progress import progress

    if epochs < 1:
        raise fail(f"Invalid --epochs: {epochs} (accepted range: >= 1)")
    if not (lr > 0.0) or math.isinf(lr):
        raise fail(f"Invalid --lr: {lr} (accepted range: a finite value > 0)")
    check_writable(out, "--out")
    with progress("clipping study", total=epochs * len(METHODS), quiet=quiet, unit="epoch") as bar:
        runs = run_clipping_study(epochs=epochs, lr=lr, seed=seed, guard=guard,
                                  on_epoch=lambda run: bar.advance(method=run.spec, loss=run.epoch_losses[-1]))
    paths = write_clipping_study(runs, out)
    table = Table(title=f"clipping study: exploding RNN, SGD lr {lr:g}, {epochs} epochs",
                  caption="final loss: mean over the last 10 epochs; norms: total L2 gradient norm before "
                          "clipping; clip %: steps clipped; spikes: steps flagged by ExplosionDetector (6 sigma); "
                          "skips: steps skipped by NonFiniteGuard")
    for column in ("method", "final loss", "max norm", "mean norm", "clip %", "spikes", "skips"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    for row in statistics_rows(runs):
        table.add_row(str(row["method"]), f"{row['final_loss']:.4g}", f"{row['max_grad_norm']:.3g}",
                      f"{row['mean_grad_norm']:.3g}", f"{row['clip_rate_percent']:.1f}", str(row["explosions"]),
                      str(row["skipped_steps"]) if guard else "off")
    console = Console()
    console.print(table)
    console.print(f"figure: {paths['figure']}\nresults: {paths['results']}")
