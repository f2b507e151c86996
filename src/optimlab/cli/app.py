"""The ``optimlab`` command's Typer applications. Command modules register themselves on these.

Conventions every command follows (checked over all commands by ``tests/test_cli_conventions.py``):

* a short flag means one thing everywhere: ``-o`` is ``--out``/``--output``, ``-q`` is ``--quiet`` (on every
  command that has it), ``-t`` is ``--task``, ``-j`` is ``--jobs``;
* defaults are written ``[default: ...]`` (Typer's own form, also for defaults described in words);
* boolean flags take no value, and ``--help`` shows none (:func:`_flags_take_no_value`);
* ``optimlab --version`` prints the package version;
* errors are one ``error: ...`` line on stderr (:func:`fail`), exit code 2 for bad input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
import typer.core

from optimlab import __version__
from optimlab.io import ensure_writable

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


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"optimlab {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Optimizers, LR schedules, clipping, monitoring, and a lab that compares them."""


def _flags_take_no_value() -> None:
    """Typer's rich help shows a type for every option, so boolean flags read ``--quick <bool>`` as if they took
    a value; show none for flags (``--quick``, ``--resume/--no-resume``), keep the rest."""
    shown = getattr(typer.core.TyperOption, "display_type_rich", None)
    if shown is None:  # older Typer: flags were shown without a type already
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    typer.core.TyperOption.display_type_rich = display_type_rich


_flags_take_no_value()


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``message`` to stderr as an error and return an Exit to raise."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def check_writable(folder: Path, option: str) -> None:
    """Before any long computation: ``folder`` (created if needed) must accept files, else exit 2 with one line
    naming ``option`` and the reason (``read-only file system``, ``permission denied``, ...)."""
    try:
        ensure_writable(folder, option)
    except ValueError as error:
        raise fail(str(error)) from None
