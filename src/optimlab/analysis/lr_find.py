r"""The learning-rate range test (Smith 2015, "Cyclical Learning Rates for Training Neural Networks";
Smith 2017; Smith 2018, "A disciplined approach to neural network hyper-parameters").

Train for ``num_iter`` steps while the learning rate grows from ``start_lr`` to ``end_lr``,

.. math::
    \eta_i = \eta_0 \left(\frac{\eta_1}{\eta_0}\right)^{i/(N-1)} \ \text{(exponential)}, \qquad
    \eta_i = \eta_0 + (\eta_1 - \eta_0)\,\frac{i}{N-1} \ \text{(linear)},

record the loss smoothed by a bias-corrected exponential moving average

.. math:: a_i = \beta a_{i-1} + (1-\beta)\,\ell_i, \qquad \hat\ell_i = a_i / (1 - \beta^{i+1}),

and stop once :math:`\hat\ell_i > k \min_{j<i} \hat\ell_j` (divergence, :math:`k` = ``diverge_factor``) or the
loss is not finite. Two suggestions are read off the curve: the LR where the smoothed loss falls
fastest against :math:`\log \eta` (steepest descent), and the LR of the minimum divided by 10.
The model's and optimizer's state (and the global RNG) are restored bitwise afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from optimlab.analysis._params import LossFn, cycle_batches, preserved_model, preserved_optimizer, training_step
from optimlab.io import atomic_savefig
from optimlab.progress import progress

__all__ = ["LRFindResult", "lr_schedule", "smooth_losses", "steepest_descent_index", "lr_find", "plot_lr_find"]


@dataclass(frozen=True)
class LRFindResult:
    """The outcome of a range test.

    Attributes:
        lrs: learning rate of each step taken.
        losses: raw training loss of each step (before its update).
        smoothed_losses: bias-corrected EMA of ``losses``.
        diverged: whether the test stopped early (smoothed loss above ``diverge_factor`` x best, or non-finite).
        steepest_index: index of the steepest descent of the smoothed curve (``None`` if too few points).
        min_index: index of the smallest smoothed loss.
    """

    lrs: list[float]
    losses: list[float]
    smoothed_losses: list[float]
    diverged: bool
    steepest_index: int | None
    min_index: int

    @property
    def steepest_lr(self) -> float | None:
        """LR at which the smoothed loss decreases fastest against log LR."""
        return None if self.steepest_index is None else self.lrs[self.steepest_index]

    @property
    def min_loss_lr(self) -> float:
        """LR at the minimum of the smoothed loss."""
        return self.lrs[self.min_index]

    @property
    def suggested_lr(self) -> float:
        """The suggestion: the steepest-descent LR, or the minimum's LR / 10 when the curve is too short."""
        return self.steepest_lr if self.steepest_lr is not None else self.min_loss_lr / 10.0


def lr_schedule(start_lr: float, end_lr: float, num_iter: int, mode: str = "exp") -> list[float]:
    """The ``num_iter`` learning rates of the test, from ``start_lr`` to ``end_lr`` inclusive (see module doc)."""
    if not (start_lr > 0 and math.isfinite(start_lr)):
        raise ValueError(f"Invalid start_lr: {start_lr} (accepted range: a finite value > 0)")
    if not (end_lr > start_lr and math.isfinite(end_lr)):
        raise ValueError(f"Invalid end_lr: {end_lr} (accepted range: finite and > start_lr={start_lr})")
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 2:
        raise ValueError(f"Invalid num_iter: {num_iter!r} (accepted range: an integer >= 2)")
    fractions = np.arange(num_iter) / (num_iter - 1)
    if mode == "exp":
        values = start_lr * (end_lr / start_lr) ** fractions
    elif mode == "linear":
        values = start_lr + (end_lr - start_lr) * fractions
    else:
        raise ValueError(f"Invalid mode: {mode!r} (accepted: 'exp', 'linear')")
    return [float(v) for v in values]


class _BiasCorrectedEMA:
    r"""Running :math:`a_i = \beta a_{i-1} + (1-\beta)\ell_i`; ``update`` returns :math:`a_i / (1 - \beta^{i+1})`."""

    def __init__(self, beta: float) -> None:
        if not (0.0 <= beta < 1.0):
            raise ValueError(f"Invalid beta: {beta} (accepted range: [0, 1))")
        self.beta = beta
        self.average = 0.0
        self.count = 0

    def update(self, value: float) -> float:
        self.average = self.beta * self.average + (1.0 - self.beta) * value
        self.count += 1
        return self.average / (1.0 - self.beta**self.count)


def smooth_losses(losses: Iterable[float], beta: float = 0.98) -> list[float]:
    r"""Bias-corrected EMA: :math:`a_i = \beta a_{i-1} + (1-\beta)\ell_i`, :math:`\hat\ell_i = a_i/(1-\beta^{i+1})`."""
    ema = _BiasCorrectedEMA(beta)
    return [ema.update(loss) for loss in losses]


def steepest_descent_index(lrs: list[float], smoothed: list[float], skip_start: int = 10, skip_end: int = 5,
                           radius: int | None = None) -> int | None:
    r"""Index of the steepest descent of the smoothed curve against :math:`\log_{10}\eta`, before its minimum.

    The slope at :math:`i` is the central difference over :math:`r` points on each side,
    :math:`(\hat\ell_{i+r} - \hat\ell_{i-r}) / (\log_{10}\eta_{i+r} - \log_{10}\eta_{i-r})` (one-sided at the ends),
    with :math:`r` = ``radius`` (default: 1/20 of the points, at least 1) so that wiggles of a noisy loss
    count less than a sustained descent. Only points up to the curve's minimum are candidates, and the first
    ``skip_start`` / last ``skip_end`` points are ignored (the EMA's warm-up, the blow-up); when fewer than
    3 points would remain the skips are dropped, and with fewer than 3 points at all the answer is ``None``.
    """
    if len(lrs) != len(smoothed):
        raise ValueError(f"Invalid smoothed: length {len(smoothed)} differs from lrs' {len(lrs)}")
    if len(lrs) < 3:
        return None
    if radius is None:
        radius = max(1, len(lrs) // 20)
    if radius < 1:
        raise ValueError(f"Invalid radius: {radius} (accepted range: >= 1)")
    low, high = skip_start, len(lrs) - skip_end
    if high - low < 3:
        low, high = 0, len(lrs)
    curve, log_lrs = np.asarray(smoothed[low:high]), np.log10(np.asarray(lrs[low:high]))
    high_index = np.minimum(np.arange(curve.size) + radius, curve.size - 1)
    low_index = np.maximum(np.arange(curve.size) - radius, 0)
    slopes = (curve[high_index] - curve[low_index]) / (log_lrs[high_index] - log_lrs[low_index])
    candidates = slopes[: int(np.argmin(curve)) + 1]
    return low + int(np.argmin(candidates))


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def lr_find(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    data: Iterable[Any],
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_iter: int = 100,
    mode: str = "exp",
    beta: float = 0.98,
    diverge_factor: float = 4.0,
    skip_start: int = 10,
    skip_end: int = 5,
    quiet: bool = True,
) -> LRFindResult:
    """Run the LR range test with ``optimizer`` on ``model``; restore both (and the RNG) afterwards.

    Args:
        model: the model to train; its parameters, buffers, gradients and train/eval flags come back bitwise.
        optimizer: any ``torch.optim.Optimizer`` over ``model``'s parameters (torch's or optimlab's); every
            param group gets the same LR at each step; its ``state_dict`` comes back bitwise. One the registry
            marks ``needs_closure`` (SAM) steps with a closure on the step's batch (:func:`training_step`).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        data: an iterable of batches (a DataLoader, a list); restarted when exhausted.
        start_lr, end_lr, num_iter, mode: the LR sweep (:func:`lr_schedule`).
        beta: EMA factor of the smoothing (:func:`smooth_losses`); 0 disables smoothing.
        diverge_factor: stop once the smoothed loss exceeds this multiple of the best (> 1).
        skip_start, skip_end: points ignored by the steepest-descent search (:func:`steepest_descent_index`).
        quiet: hide the progress bar.
    """
    lrs = lr_schedule(start_lr, end_lr, num_iter, mode)
    ema = _BiasCorrectedEMA(beta)
    if not (diverge_factor > 1.0):
        raise ValueError(f"Invalid diverge_factor: {diverge_factor} (accepted range: > 1)")
    if skip_start < 0 or skip_end < 0:
        raise ValueError(f"Invalid skip_start/skip_end: {skip_start}/{skip_end} (accepted range: >= 0)")
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    taken: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    best, diverged = math.inf, False
    batches = cycle_batches(data)
    with torch.random.fork_rng(devices=devices), preserved_model(model), preserved_optimizer(optimizer), \
            progress("lr-find", total=num_iter, quiet=quiet) as bar:
        model.train()
        for i, lr in enumerate(lrs):
            _set_lr(optimizer, lr)
            raw = training_step(model, optimizer, loss_fn, next(batches))
            current = ema.update(raw)
            taken.append(lr)
            losses.append(raw)
            smoothed.append(current)
            bar.advance(lr=lr, loss=current)
            if not math.isfinite(current) or (i > 0 and current > diverge_factor * best):
                diverged = True
                break
            best = min(best, current)
    usable = len(taken) - 1 if diverged else len(taken)
    min_index = int(np.argmin(smoothed[:max(usable, 1)]))
    steepest = steepest_descent_index(taken[:usable], smoothed[:usable], skip_start, skip_end)
    return LRFindResult(taken, losses, smoothed, diverged, steepest, min_index)


def plot_lr_find(result: LRFindResult, path: str | Path, *, title: str = "LR range test",
                 stable_lr_bound: float | None = None) -> Path:
    """Plot the smoothed (and raw) loss against the LR on a log axis, marking the suggestions; save a PNG.

    ``stable_lr_bound`` (e.g. 2/λ_max from :mod:`optimlab.analysis.hessian`) draws a vertical line when given.
    """
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    lrs, smoothed = np.asarray(result.lrs), np.asarray(result.smoothed_losses)
    shown = len(lrs) - 1 if result.diverged and len(lrs) > 2 else len(lrs)
    ax.plot(lrs[:shown], np.asarray(result.losses)[:shown], color="0.75", lw=0.8, label="raw loss")
    ax.plot(lrs[:shown], smoothed[:shown], color="C0", lw=2, label="smoothed loss")
    finite = smoothed[:shown][np.isfinite(smoothed[:shown])]
    if finite.size:
        spread = float(finite.max() - finite.min()) or abs(float(finite.max())) or 1.0
        ax.set_ylim(float(finite.min()) - 0.05 * spread, float(finite.max()) + 0.15 * spread)
    if result.steepest_index is not None:
        i = result.steepest_index
        ax.plot([lrs[i]], [smoothed[i]], "o", color="C3", ms=9, label=f"steepest descent: {lrs[i]:.3g}")
    ax.axvline(result.min_loss_lr / 10.0, color="C2", ls="--", label=f"min-loss LR / 10: {result.min_loss_lr / 10:.3g}")
    if stable_lr_bound is not None:
        ax.axvline(stable_lr_bound, color="k", ls=":", label=f"stability bound 2/λmax: {stable_lr_bound:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    stop = "stopped at divergence" if result.diverged else "no divergence"
    ax.set_title(f"{title}\nsuggested LR {result.suggested_lr:.3g} ({len(lrs)} steps, {stop})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return atomic_savefig(fig, path)
