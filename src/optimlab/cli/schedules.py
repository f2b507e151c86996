"""``optimlab schedule plot|list`` and ``optimlab demo schedules``: draw learning-rate schedules."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import typer

from optimlab.cli.app import app, check_writable, demo_app, fail

schedule_app = typer.Typer(help="Learning-rate schedules: list them, draw them.", no_args_is_help=True)
app.add_typer(schedule_app, name="schedule")


def _parse_value(text: str) -> Any:
    """``"0.1"`` → 0.1, ``"[3, 6]"`` → [3, 6], ``"True"`` → True; anything else stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_params(params: list[str], names: list[str]) -> dict[str, dict[str, Any]]:
    """``["eta_min=0.01", "step.gamma=0.5"]`` → keyword arguments per schedule name.

    ``key=value`` applies to every name; ``name.key=value`` to that name only.
    """
    per_name: dict[str, dict[str, Any]] = {name: {} for name in names}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"Invalid --param {item!r} (expected KEY=VALUE or NAME.KEY=VALUE)")
        target, dot, arg = key.rpartition(".")
        if dot and target not in per_name:
            raise ValueError(f"--param {item!r} names schedule {target!r}, which is not being plotted "
                             f"({', '.join(names)})")
        for name in [target] if dot else names:
            per_name[name][arg] = _parse_value(value)
    return per_name


def _print_stats(curves: list[Any]) -> None:
    width = max(len(curve.label) for curve in curves)
    for curve in curves:
        s = curve.stats
        typer.echo(f"{curve.label:<{width}}  initial={s.initial:.10g}  final={s.final:.10g}  "
                   f"max={s.max:.10g}  min={s.min:.10g}")


def _draw(specs: list[tuple[str, str, dict[str, Any]]], steps: int, lr: float, output: Path, log_y: bool,
          title: str) -> None:
    from optimlab.schedules.plot import plot_schedules, schedule_curves

    try:
        curves = schedule_curves(specs, steps, lr)
    except ValueError as err:
        raise fail(str(err)) from None
    _print_stats(curves)
    path = plot_schedules(curves, output, log_y=log_y, title=title)
    typer.echo(f"wrote {path}")


@schedule_app.command("plot")
def plot_command(
    names: list[str] = typer.Argument(..., help="Schedule names (see `optimlab schedule list`); one panel each."),
    steps: int = typer.Option(100, "--steps", "-n", help="Number of steps to draw."),
    lr: float = typer.Option(0.1, "--lr", help="The optimizer's learning rate (the schedules' base/peak)."),
    param: list[str] = typer.Option([], "--param", "-p",
                                    help="KEY=VALUE for every schedule, or NAME.KEY=VALUE for one; repeatable."),
    output: Path = typer.Option(Path("lr.png"), "--output", "-o", help="PNG file to write."),
    log_y: bool = typer.Option(True, "--log-y/--linear-y", help="Logarithmic or linear learning-rate axis."),
) -> None:
    """Draw schedules (a panel each) and print each one's initial, final, max and min learning rate."""
    try:
        per_name = parse_params(param, names)
    except ValueError as err:
        raise fail(str(err)) from None
    check_writable(output.parent, "--output")
    _draw([(name, name, per_name[name]) for name in names], steps, lr, output, log_y,
          f"Learning-rate schedules over {steps} steps (lr={lr:g})")


@schedule_app.command("list")
def list_command() -> None:
    """List the schedule names, their classes and a one-line description of their defaults."""
    from optimlab.schedules.registry import get_schedule_spec, list_schedules

    for name in list_schedules():
        spec = get_schedule_spec(name)
        typer.echo(f"{name:<16} {spec.cls.__name__:<28} {spec.description}")


@demo_app.command("schedules")
def demo_schedules_command(
    out: Path = typer.Option(Path("optimlab-out"), "--out", "-o", help="Folder for schedules.png."),
) -> None:
    """The seed's 2×3 figure: StepLR, ExponentialLR, CosineAnnealing, WarmupCosine, CyclicLR, OneCycleLR over
    100 epochs from lr 0.1, log-scale y; prints each schedule's statistics."""
    from optimlab.schedules.plot import SEED_FIGURE

    check_writable(out, "--out")
    _draw(SEED_FIGURE, 100, 0.1, out / "schedules.png", True, "Learning-rate schedules (100 epochs, lr 0.1)")
