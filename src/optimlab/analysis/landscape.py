r"""Loss-landscape probes and slices.

* :func:`perturbation_probe`: the loss under Gaussian noise on one named parameter,
  :math:`L(\theta + \sigma\varepsilon)`, :math:`\varepsilon \sim \mathcal N(0, I)` on that tensor only.
* :func:`interpolate`: the loss along the segment :math:`\theta(\alpha) = (1-\alpha)\,\theta_A + \alpha\,\theta_B`
  (Goodfellow et al. 2015, "Qualitatively characterizing neural network optimization problems").
* :func:`slice_1d` / :func:`slice_2d`: :math:`L(\theta_0 + \alpha d_1 + \beta d_2)` along random directions with
  *filter normalization* (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets"): every filter
  :math:`d_{i,j}` (slice ``j`` along the first axis of parameter ``i``) is rescaled to the norm of the matching
  weight filter, :math:`d_{i,j} \leftarrow d_{i,j}\,\lVert\theta_{i,j}\rVert / \lVert d_{i,j}\rVert`, so that the
  picture does not depend on each layer's scale; 1-D parameters (biases, norms) get a zero direction by default.

Every function evaluates in ``eval`` mode without gradients, on one batch or a list of batches (mean), and
restores the model's parameters bitwise afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colors
from matplotlib.figure import Figure
from torch import Tensor, nn

from optimlab.analysis._params import LossFn, as_batches, mean_loss, preserved_model
from optimlab.io import atomic_savefig
from optimlab.progress import progress

__all__ = [
    "ProbeResult",
    "Slice1D",
    "Slice2D",
    "perturbation_probe",
    "random_direction",
    "normalize_direction",
    "interpolate",
    "slice_1d",
    "slice_2d",
    "plot_slice_1d",
    "plot_contour",
    "plot_surface",
]

Direction = dict[str, Tensor]
NORMALIZATIONS = ("filter", "layer", "none")


@dataclass(frozen=True)
class ProbeResult:
    """Loss statistics of :func:`perturbation_probe` (``std`` with Bessel's correction; 0 for one sample)."""

    parameter: str
    scale: float
    base_loss: float
    losses: list[float]

    @property
    def mean(self) -> float:
        """Mean loss over the draws."""
        return float(np.mean(self.losses))

    @property
    def std(self) -> float:
        """Sample standard deviation of the loss (ddof=1)."""
        return float(np.std(self.losses, ddof=1)) if len(self.losses) > 1 else 0.0

    @property
    def min(self) -> float:
        """Smallest loss drawn."""
        return float(np.min(self.losses))

    @property
    def max(self) -> float:
        """Largest loss drawn."""
        return float(np.max(self.losses))


@dataclass(frozen=True)
class Slice1D:
    """Losses along one line: ``losses[i]`` at coordinate ``alphas[i]``; ``label`` names the axis."""

    alphas: np.ndarray
    losses: np.ndarray
    label: str


@dataclass(frozen=True)
class Slice2D:
    """Losses on a plane: ``losses[j, i]`` at ``(xs[i], ys[j])`` (rows follow ``ys``, as for ``contourf``)."""

    xs: np.ndarray
    ys: np.ndarray
    losses: np.ndarray


def _named_trainable(model: nn.Module) -> dict[str, Tensor]:
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError("Invalid model: it has no parameter with requires_grad=True")
    return named


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (accepted range: an integer >= 1)")


def _loss_at(model: nn.Module, loss_fn: LossFn, batches: list[Any], named: Mapping[str, Tensor],
             values: Mapping[str, Tensor]) -> float:
    """Copy ``values`` into the parameters ``named`` and return the mean loss there."""
    with torch.no_grad():
        for name, value in values.items():
            named[name].copy_(value)
    return mean_loss(model, loss_fn, batches)


def perturbation_probe(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    parameter: str,
    scale: float,
    num_samples: int = 10,
    generator: torch.Generator | None = None,
) -> ProbeResult:
    r"""Loss at :math:`\theta + \sigma\varepsilon` for ``num_samples`` draws of noise on one parameter.

    Args:
        model, loss_fn, data: what to evaluate (``loss_fn(model, batch)``; one batch or a list of batches).
        parameter: the name of the parameter to perturb (as in ``model.named_parameters()``).
        scale: the noise's standard deviation :math:`\sigma` (>= 0).
        num_samples: how many noise draws.
        generator: the RNG for the noise (seeded for reproducibility); the global one when ``None``.
    """
    named = dict(model.named_parameters())
    if parameter not in named:
        raise ValueError(f"Invalid parameter: {parameter!r} (accepted: {', '.join(named)})")
    if not (scale >= 0 and math.isfinite(scale)):
        raise ValueError(f"Invalid scale: {scale} (accepted range: a finite value >= 0)")
    _check_positive_int("num_samples", num_samples)
    batches = as_batches(data)
    target = named[parameter]
    with preserved_model(model):
        model.eval()
        origin = target.detach().clone()
        base = mean_loss(model, loss_fn, batches)
        losses = []
        for _ in range(num_samples):
            noise = torch.randn(origin.shape, generator=generator, dtype=origin.dtype, device=origin.device)
            losses.append(_loss_at(model, loss_fn, batches, {parameter: target}, {parameter: origin + scale * noise}))
    return ProbeResult(parameter, float(scale), base, losses)


def normalize_direction(direction: Mapping[str, Tensor], model: nn.Module, normalization: str = "filter",
                        ignore_1d: bool = True) -> Direction:
    r"""Rescale a direction to the model's weights (Li et al. 2018); returns a new dict.

    ``"filter"``: each slice ``d[j]`` along the first axis gets norm :math:`\lVert\theta[j]\rVert`;
    ``"layer"``: each whole tensor gets norm :math:`\lVert\theta\rVert`; ``"none"``: unchanged.
    Parameters with at most one dimension become zero when ``ignore_1d`` (Li et al.'s "biasbn" option),
    otherwise their direction is the weight itself, as in the paper's code.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"Invalid normalization: {normalization!r} (accepted: {', '.join(NORMALIZATIONS)})")
    named = _named_trainable(model)
    if set(direction) != set(named):
        raise ValueError(f"Invalid direction: keys {sorted(direction)} differ from the trainable parameters {sorted(named)}")
    result: Direction = {}
    for name, weight in named.items():
        d = direction[name].detach().to(dtype=weight.dtype, device=weight.device)
        if d.shape != weight.shape:
            raise ValueError(f"Invalid direction[{name!r}]: shape {tuple(d.shape)} != parameter's {tuple(weight.shape)}")
        w = weight.detach()
        if w.dim() <= 1 and normalization != "none":
            result[name] = torch.zeros_like(w) if ignore_1d else w.clone()
        elif normalization == "filter":
            axes = tuple(range(1, w.dim()))
            scale = (torch.linalg.vector_norm(w, dim=axes, keepdim=True)
                     / torch.linalg.vector_norm(d, dim=axes, keepdim=True).clamp_min(1e-12))
            result[name] = d * scale
        elif normalization == "layer":
            result[name] = d * (w.norm() / d.norm().clamp_min(1e-12))
        else:
            result[name] = d.clone()
    return result


def random_direction(model: nn.Module, normalization: str = "filter", ignore_1d: bool = True,
                     generator: torch.Generator | None = None) -> Direction:
    """A Gaussian direction over the trainable parameters, normalized by :func:`normalize_direction`."""
    named = _named_trainable(model)
    raw = {name: torch.randn(p.shape, generator=generator, dtype=p.dtype, device="cpu").to(p.device)
           for name, p in named.items()}
    return normalize_direction(raw, model, normalization, ignore_1d)


def _grid(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    grid = np.asarray(values, dtype=np.float64)
    if grid.ndim != 1 or grid.size < 1 or not np.all(np.isfinite(grid)):
        raise ValueError(f"Invalid {name}: expected a non-empty 1-D sequence of finite numbers")
    return grid


def interpolate(model: nn.Module, loss_fn: LossFn, data: Any, start: Mapping[str, Tensor],
                end: Mapping[str, Tensor], alphas: Sequence[float] | np.ndarray, *, quiet: bool = True) -> Slice1D:
    r"""Loss along :math:`(1-\alpha)\theta_A + \alpha\theta_B` (``torch.lerp``, exact at 0 and 1).

    ``start`` / ``end`` map each trainable parameter name to a tensor (e.g. ``dict(model.named_parameters())``
    cloned at initialisation and after training); ``alphas`` outside [0, 1] extrapolate.
    """
    grid = _grid(alphas, "alphas")
    named = _named_trainable(model)
    for label, point in (("start", start), ("end", end)):
        if set(point) != set(named):
            raise ValueError(f"Invalid {label}: keys {sorted(point)} differ from the trainable parameters {sorted(named)}")
    batches = as_batches(data)
    losses = []
    with preserved_model(model), progress("interpolate", total=grid.size, quiet=quiet) as bar:
        model.eval()
        for alpha in grid:
            values = {n: torch.lerp(start[n].to(p), end[n].to(p), float(alpha)) for n, p in named.items()}
            losses.append(_loss_at(model, loss_fn, batches, named, values))
            bar.advance()
    return Slice1D(grid, np.asarray(losses), "interpolation coefficient α (0 = start, 1 = end)")


def slice_2d(model: nn.Module, loss_fn: LossFn, data: Any, direction_x: Mapping[str, Tensor],
             direction_y: Mapping[str, Tensor] | None, xs: Sequence[float] | np.ndarray,
             ys: Sequence[float] | np.ndarray = (0.0,), *, quiet: bool = True) -> Slice2D:
    r"""Loss at :math:`\theta_0 + x\,d_x + y\,d_y` on the grid ``xs`` x ``ys`` (:math:`\theta_0` = current parameters).

    At :math:`(0, 0)` the parameters are exactly :math:`\theta_0`, so that entry equals the loss at the
    original parameters. ``direction_y=None`` means a 1-D slice (``ys`` must then be ``(0,)``).
    """
    grid_x, grid_y = _grid(xs, "xs"), _grid(ys, "ys")
    named = _named_trainable(model)
    if direction_y is None and not np.array_equal(grid_y, [0.0]):
        raise ValueError("Invalid ys: without direction_y the only accepted ys is (0,)")
    for label, direction in (("direction_x", direction_x), ("direction_y", direction_y)):
        if direction is not None and set(direction) != set(named):
            raise ValueError(f"Invalid {label}: keys {sorted(direction)} differ from the trainable parameters")
    batches = as_batches(data)
    losses = np.empty((grid_y.size, grid_x.size))
    with preserved_model(model), progress("landscape", total=losses.size, quiet=quiet) as bar:
        model.eval()
        origin = {n: p.detach().clone() for n, p in named.items()}
        for j, y in enumerate(grid_y):
            for i, x in enumerate(grid_x):
                values = {}
                for n in named:
                    offset = float(x) * direction_x[n].to(origin[n])
                    if direction_y is not None:
                        offset = offset + float(y) * direction_y[n].to(origin[n])
                    values[n] = origin[n] + offset
                losses[j, i] = _loss_at(model, loss_fn, batches, named, values)
                bar.advance()
    return Slice2D(grid_x, grid_y, losses)


def slice_1d(model: nn.Module, loss_fn: LossFn, data: Any, direction: Mapping[str, Tensor],
             alphas: Sequence[float] | np.ndarray, *, quiet: bool = True) -> Slice1D:
    r"""Loss at :math:`\theta_0 + \alpha d` for each ``alpha`` (a one-row :func:`slice_2d`)."""
    plane = slice_2d(model, loss_fn, data, direction, None, _grid(alphas, "alphas"), quiet=quiet)
    return Slice1D(plane.xs, plane.losses[0], "step along the direction α")


def plot_slice_1d(slices: Mapping[str, Slice1D], path: str | Path, *, title: str = "Loss along a line",
                  log_y: bool = False, marks: Sequence[float] = (0.0,)) -> Path:
    """Plot one or more 1-D slices (legend = the mapping's keys) and save a PNG; dotted lines at ``marks``."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for label, line in slices.items():
        ax.plot(line.alphas, line.losses, marker="o", ms=3, label=label)
    for mark in marks:
        ax.axvline(mark, color="0.5", ls=":", lw=1)
    xlabel = next(iter(slices.values())).label if slices else "α"
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss (log scale)" if log_y else "loss")
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return atomic_savefig(fig, path)


def _norm_and_levels(losses: np.ndarray, count: int = 30) -> tuple[colors.Normalize, np.ndarray]:
    """Log-spaced levels when the losses are positive and span more than two decades, else linear."""
    finite = losses[np.isfinite(losses)]
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        high = low + 1e-12 + abs(low) * 1e-6
    if low > 0 and high / low > 100:
        return colors.LogNorm(low, high), np.geomspace(low, high, count)
    return colors.Normalize(low, high), np.linspace(low, high, count)


def plot_contour(plane: Slice2D, path: str | Path, *, title: str = "Loss landscape (filter-normalized directions)",
                 xlabel: str = "direction 1 (α)", ylabel: str = "direction 2 (β)") -> Path:
    """Filled contours of a 2-D slice with labelled contour lines, the origin marked; save a PNG."""
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.add_subplot()
    norm, levels = _norm_and_levels(plane.losses)
    filled = ax.contourf(plane.xs, plane.ys, plane.losses, levels=levels, norm=norm, cmap="viridis")
    lines = ax.contour(plane.xs, plane.ys, plane.losses, levels=levels[::3], norm=norm, colors="white",
                       linewidths=0.6)
    ax.clabel(lines, fontsize=6, fmt="%.3g")
    ax.plot([0.0], [0.0], marker="*", color="red", ms=14, ls="none", label="original parameters")
    fig.colorbar(filled, ax=ax, label="loss")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    return atomic_savefig(fig, path)


def plot_surface(plane: Slice2D, path: str | Path, *, title: str = "Loss surface (filter-normalized directions)",
                 xlabel: str = "direction 1 (α)", ylabel: str = "direction 2 (β)") -> Path:
    """A 3-D surface of a 2-D slice, coloured by loss; save a PNG."""
    fig = Figure(figsize=(7, 5.5))
    ax = fig.add_subplot(projection="3d")
    grid_x, grid_y = np.meshgrid(plane.xs, plane.ys)
    norm, _ = _norm_and_levels(plane.losses)
    surface = ax.plot_surface(grid_x, grid_y, plane.losses, cmap="viridis", norm=norm, linewidth=0, antialiased=True)
    fig.colorbar(surface, ax=ax, shrink=0.6, pad=0.12, label="loss")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_zlabel("loss")
    ax.set_title(title)
    return atomic_savefig(fig, path)
