"""The ``optimlab`` command's Typer applications. Command modules register themselves on these."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="optimlab",
    help="Optimizers, LR schedules, clipping, monitoring, and a lab that compares them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
demo_app = typer.Typer(help="Run the seed's demonstrations (each writes figures and prints a table).",
                       no_args_is_help=True)
app.add_typer(demo_app, name="demo")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``message`` to stderr as an error and return an Exit to raise."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)
