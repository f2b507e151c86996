"""Learning-rate curves of named schedules: trajectories, summary statistics, and a one-panel-per-schedule figure."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from optimlab.schedules.registry import create_scheduler, step_scheduler

__all__ = ["LRStats", "ScheduleCurve", "SEED_FIGURE", "lr_trajectory", "plateau_metric", "plot_schedules",
           "schedule_curves"]


@dataclass(frozen=True)
class LRStats:
    """Initial, final, largest and smallest learning rate of a curve."""

    initial: float
    final: float
    max: float
    min: float

    @classmethod
    def of(cls, values: Sequence[float]) -> LRStats:
        """The statistics of ``values`` (at least one)."""
        if not values:
            raise ValueError("LRStats needs at least one value")
        return cls(values[0], values[-1], max(values), min(values))


@dataclass(frozen=True)
class ScheduleCurve:
    """One schedule's learning rate at each step of a run (first param group), with a panel label."""

    label: str
    values: list[float]

    @property
    def stats(self) -> LRStats:
        """Initial/final/max/min of :attr:`values`."""
        return LRStats.of(self.values)


#: The seed's 2×3 figure: (label, registry name, keyword arguments), 100 epochs from lr 0.1, log-scale y.
SEED_FIGURE: list[tuple[str, str, dict[str, Any]]] = [
    ("StepLR (step 30, γ=0.1)", "step", {"step_size": 30, "gamma": 0.1}),
    ("ExponentialLR (γ=0.95)", "exponential", {"gamma": 0.95}),
    ("CosineAnnealingLR (T=100)", "cosine", {"T_max": 100}),
    ("WarmupCosineLR (10 warmup)", "warmup-cosine", {"warmup_steps": 10, "start_factor": 0.01}),
    ("CyclicLR (triangular, 1e-3–0.1)", "cyclic", {"base_lr": 1e-3, "max_lr": 0.1, "step_size_up": 10}),
    ("OneCycleLR (max 0.1)", "onecycle", {"max_lr": 0.1}),
]


def plateau_metric(step: int, steps: int) -> float:
    """A synthetic loss for drawing ``plateau``: it improves linearly over the first third of the run, then stalls.

    ``m(t) = 1 + max(0, 1 − 3t/steps)``.
    """
    return 1.0 + max(0.0, 1.0 - 3.0 * step / steps)


def lr_trajectory(name: str, steps: int, lr: float = 0.1, **kwargs: Any) -> list[float]:
    """The learning rates a run of ``steps`` optimizer steps uses (steps ``0..steps-1``) under schedule ``name``.

    The schedule is built with ``create_scheduler(name, optimizer, steps, **kwargs)`` on an SGD optimizer with
    learning rate ``lr`` (momentum 0.9, so momentum cycling works) and stepped after each optimizer step;
    ``plateau`` is fed :func:`plateau_metric`.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Invalid steps: {steps!r} (accepted: an integer >= 1)")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"Invalid lr: {lr!r} (accepted range: a finite value > 0)")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)
    scheduler = create_scheduler(name, optimizer, steps, **kwargs)
    values = [float(optimizer.param_groups[0]["lr"])]
    for step in range(steps - 1):
        optimizer.step()
        step_scheduler(scheduler, metric=plateau_metric(step, steps))
        values.append(float(optimizer.param_groups[0]["lr"]))
    return values


def schedule_curves(specs: Sequence[tuple[str, str, Mapping[str, Any]]], steps: int, lr: float = 0.1
                    ) -> list[ScheduleCurve]:
    """Trajectories of several ``(label, name, kwargs)`` specs."""
    return [ScheduleCurve(label, lr_trajectory(name, steps, lr, **dict(kwargs))) for label, name, kwargs in specs]


def plot_schedules(curves: Sequence[ScheduleCurve], path: str | os.PathLike[str], *, log_y: bool = True,
                   title: str = "Learning-rate schedules", columns: int = 3) -> Path:
    """Draw one panel per curve (learning rate against step) and save the figure atomically to ``path``.

    Panels are laid out ``columns`` wide (fewer when there are fewer curves). With ``log_y`` the y axis is
    logarithmic; values <= 0 are then left out of the drawing (the printed statistics still include them).
    """
    import matplotlib

    if not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from optimlab.io import atomic_savefig

    if not curves:
        raise ValueError("plot_schedules needs at least one curve")
    columns = max(1, min(columns, len(curves)))
    rows = math.ceil(len(curves) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, curve in zip(axes.flat, curves):
        steps = range(len(curve.values))
        ax.plot(steps, curve.values, color="tab:blue", linewidth=1.6, label=curve.label.split(" (")[0])
        if log_y and any(v > 0 for v in curve.values):
            ax.set_yscale("log")
        ax.set_title(curve.label, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in list(axes.flat)[len(curves):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        return atomic_savefig(fig, path)
    finally:
        plt.close(fig)
