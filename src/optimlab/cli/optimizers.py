"""``optimlab optimizers``: list the registry."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from optimlab.cli.app import app, fail
from optimlab.optim.registry import get_spec, list_optimizers


@app.command("optimizers")
def optimizers_command(
    source: str = typer.Option(None, help="Only 'optimlab' or 'torch' entries."),
) -> None:
    """List the optimizers known by name, with their tuning ranges and references."""
    try:
        names = list_optimizers(source)
    except ValueError as err:
        raise fail(str(err)) from None
    table = Table(title="optimizers")
    for column in ("name", "class", "preset", "lr range", "default lr", "description"):
        table.add_column(column)
    for name in names:
        spec = get_spec(name)
        preset = ", ".join(f"{k}={v}" for k, v in spec.preset.items())
        table.add_row(name, spec.target, preset, f"{spec.lr_bounds[0]:g}–{spec.lr_bounds[1]:g}",
                      f"{spec.default_lr:g}", spec.description)
    Console().print(table)
