r"""Sharpness during training: :math:`\lambda_{\max}(\nabla^2 L)` every few steps against the stability bound.

Gradient descent with step size :math:`\eta` is stable on a quadratic only while :math:`\lambda_{\max} < 2/\eta`
(:math:`(2+2\beta)/\eta` with heavy-ball momentum :math:`\beta`). Cohen et al. 2021 ("Gradient Descent on Neural
Networks Typically Occurs at the Edge of Stability") observe that full-batch training sharpens progressively
until :math:`\lambda_{\max}` reaches :math:`2/\eta` and then hovers there while the loss keeps falling,
non-monotonically. :func:`track_sharpness` trains and records the sharpness so that a run can be read
against that picture; :func:`plot_sharpness` draws it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from optimlab.analysis._params import LossFn, as_batches, cycle_batches, mean_loss, training_step
from optimlab.analysis.hessian import HessianOperator, lanczos_eigenvalues, stability_bound
from optimlab.io import atomic_savefig
from optimlab.progress import progress

__all__ = ["SharpnessTrace", "track_sharpness", "plot_sharpness"]


@dataclass(frozen=True)
class SharpnessTrace:
    """Records of :func:`track_sharpness`: at ``steps[i]`` the loss on the evaluation data, the sharpness
    :math:`\\lambda_{\\max}` and the first param group's learning rate."""

    steps: list[int]
    losses: list[float]
    sharpness: list[float]
    lrs: list[float]
    momentum: float

    def stability_bounds(self) -> list[float]:
        """:math:`(2+2\\beta)/\\eta` at each record (the largest sharpness gradient descent is stable with)."""
        return [stability_bound(lr, self.momentum) for lr in self.lrs]


def track_sharpness(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    train_data: Iterable[Any],
    eval_data: Any,
    *,
    steps: int,
    every: int,
    momentum: float = 0.0,
    tol: float = 1e-4,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
    quiet: bool = True,
) -> SharpnessTrace:
    """Train ``model`` for ``steps`` steps and record the sharpness every ``every`` steps (and at 0 and the end).

    Unlike the other analysis tools this one trains: the model and optimizer are left trained.
    The sharpness is the top eigenvalue of the Hessian of the mean loss over ``eval_data`` (fixed batches),
    by Lanczos to relative residual ``tol``; ``momentum`` only sets the reported bound.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"Invalid steps: {steps!r} (accepted range: an integer >= 0)")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"Invalid every: {every!r} (accepted range: an integer >= 1)")
    stability_bound(1.0, momentum)  # validates momentum
    evaluation = as_batches(eval_data)
    batches = cycle_batches(train_data)
    record_steps: list[int] = []
    losses: list[float] = []
    sharpness: list[float] = []
    lrs: list[float] = []

    def record(step: int) -> None:
        operator = HessianOperator(model, loss_fn, eval_data)
        estimate = lanczos_eigenvalues(operator, operator.dim, 1, max_iter=max_iter, tol=tol, dtype=operator.dtype,
                                       device=operator.device, generator=generator)
        record_steps.append(step)
        losses.append(mean_loss(model, loss_fn, evaluation))
        sharpness.append(estimate.lambda_max)
        lrs.append(float(optimizer.param_groups[0]["lr"]))

    record(0)
    with progress("sharpness", total=steps, quiet=quiet) as bar:
        for step in range(1, steps + 1):
            model.train()
            loss = training_step(model, optimizer, loss_fn, next(batches))
            if step % every == 0 or step == steps:
                record(step)
            bar.advance(loss=loss, sharpness=sharpness[-1])
    return SharpnessTrace(record_steps, losses, sharpness, lrs, momentum)


def plot_sharpness(trace: SharpnessTrace, path: str | Path, *, title: str = "Sharpness during training") -> Path:
    """Two panels: the loss, and the sharpness with the stability bound :math:`(2+2\\beta)/\\eta`; save a PNG."""
    fig = Figure(figsize=(7, 6))
    loss_ax, sharp_ax = fig.subplots(2, 1, sharex=True)
    steps = np.asarray(trace.steps)
    loss_ax.plot(steps, trace.losses, marker="o", ms=3, color="C0", label="loss (evaluation batches)")
    if min(trace.losses) > 0:
        loss_ax.set_yscale("log")
    loss_ax.set_ylabel("loss (log scale)" if min(trace.losses) > 0 else "loss")
    loss_ax.set_title(title)
    loss_ax.grid(True, alpha=0.3)
    loss_ax.legend(loc="best", fontsize=8)
    sharp_ax.plot(steps, trace.sharpness, marker="o", ms=3, color="C3", label="sharpness λmax")
    beta = f"(2+2·{trace.momentum:g})" if trace.momentum else "2"
    sharp_ax.step(steps, trace.stability_bounds(), where="post", color="k", ls="--", label=f"stability bound {beta}/lr")
    sharp_ax.set_xlabel("training step")
    sharp_ax.set_ylabel("largest Hessian eigenvalue")
    sharp_ax.grid(True, alpha=0.3)
    sharp_ax.legend(loc="best", fontsize=8)
    return atomic_savefig(fig, path)
