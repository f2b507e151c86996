"""The bench report's figures. Each function takes plain data (no store access), writes one figure
atomically (PNG or SVG, from the path's suffix) and returns its path. Every figure has a title, labelled
axes and a legend."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402

from optimlab.bench.problems import Problem  # noqa: E402
from optimlab.io import atomic_savefig  # noqa: E402

__all__ = ["trajectories_plot", "curves_plot", "bars_plot", "final_point_plot", "lr_plot", "sensitivity_plot",
           "profile_plot", "ema"]

Curve = tuple[Sequence[int], Sequence[float]]


def _legend(ax: plt.Axes) -> None:
    """A legend inside the axes for a few series, to the right of them for many."""
    count = len(ax.get_legend_handles_labels()[0])
    if count > 4:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    else:
        ax.legend(fontsize=8)


def _style(index: int) -> dict[str, str]:
    """Distinct colour and line style for series ``index`` (colours repeat every 10, styles change)."""
    return {"color": f"C{index % 10}", "linestyle": ("-", "--", ":", "-.")[(index // 10) % 4]}


def _save(fig: plt.Figure, path: Path) -> Path:
    try:
        return atomic_savefig(fig, path)
    finally:
        plt.close(fig)


def trajectories_plot(problem: Problem, trajectories: Mapping[str, Sequence[Sequence[float]]], path: Path,
                      title: str) -> Path:
    """One panel per optimizer: the iterates over log-spaced contours of ``problem``, start ○, end ■, minimum ★."""
    if problem.bounds is None:
        raise ValueError(f"Invalid problem {problem.name!r}: trajectories need a 2-D problem with plot bounds")
    (x_low, x_high), (y_low, y_high) = problem.bounds
    grid_x, grid_y = torch.meshgrid(torch.linspace(x_low, x_high, 300, dtype=torch.float64),
                                    torch.linspace(y_low, y_high, 300, dtype=torch.float64), indexing="xy")
    values = (problem(torch.stack([grid_x, grid_y], -1)) - problem.min_value).clamp_min(1e-12).numpy()
    names = list(trajectories)
    cols = min(4, max(1, len(names)))
    rows = math.ceil(len(names) / cols) if names else 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    levels = np.logspace(math.log10(max(values.min(), 1e-12)), math.log10(values.max()), 25)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        ax.contour(grid_x.numpy(), grid_y.numpy(), values, levels=levels, norm=LogNorm(), cmap="viridis",
                   linewidths=0.6)
        points = np.asarray(trajectories[name], dtype=float)
        inside = np.clip(points, [x_low, y_low], [x_high, y_high])
        ax.plot(inside[:, 0], inside[:, 1], "-", color="tab:red", lw=1.2, alpha=0.85, label="path")
        ax.plot(*points[0], "o", color="black", ms=7, label="start")
        ax.plot(*inside[-1], "s", color="tab:red", ms=7, label="end")
        for minimum in problem.minima:
            ax.plot(*minimum, "*", color="gold", mec="black", ms=14, label="minimum")
        final_gap = float(problem(torch.tensor(points[-1])) - problem.min_value)
        ax.set_title(f"{name}\n{len(points) - 1} steps, final gap {final_gap:.2e}", fontsize=9)
        ax.set_xlim(x_low, x_high)
        ax.set_ylim(y_low, y_high)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=len(unique), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return _save(fig, path)


def ema(values: Sequence[float], beta: float) -> np.ndarray:
    """Bias-corrected exponential moving average: :math:`m_t = \beta m_{t-1} + (1-\beta) x_t`, reported as
    :math:`m_t / (1 - \beta^t)` (so the first value is :math:`x_1`, not shrunk towards 0)."""
    out = np.empty(len(values))
    mean = 0.0
    for t, value in enumerate(values, 1):
        mean = beta * mean + (1.0 - beta) * value
        out[t - 1] = mean / (1.0 - beta**t)
    return out


def curves_plot(curves: Mapping[str, Sequence[Curve]], path: Path, title: str, ylabel: str,
                log_y: bool = True, smooth: float | None = None) -> Path:
    """Per optimizer, the mean over seeds as a line and the min–max band over seeds (log y by default).

    ``smooth`` (an EMA factor, e.g. 0.9) draws the raw mean faint and its :func:`ema` on top, for noisy
    minibatch losses; the band is then the smoothed per-seed curves' min–max.
    """
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    shown: list[float] = []  # the plotted (smoothed) values: the y range follows them, not raw spikes
    for index, (name, runs) in enumerate(curves.items()):
        if not runs:
            continue
        length = min(len(steps) for steps, _ in runs)
        if length == 0:
            continue
        steps = np.asarray(runs[0][0][:length])
        stacked = np.asarray([np.asarray(values[:length], dtype=float) for _, values in runs])
        if log_y:
            stacked = np.clip(stacked, 1e-12, None)
        label = f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        if smooth:
            ax.plot(steps, stacked.mean(0), lw=0.6, alpha=0.25, **_style(index))
            stacked = np.asarray([ema(row, smooth) for row in stacked])
        mean = stacked.mean(0)
        line, = ax.plot(steps, mean, lw=1.5, label=label, **_style(index))
        shown.extend(stacked.min(0)[np.isfinite(stacked.min(0))])
        shown.extend(stacked.max(0)[np.isfinite(stacked.max(0))])
        if len(runs) > 1:
            ax.fill_between(steps, stacked.min(0), stacked.max(0), color=line.get_color(), alpha=0.2)
    if log_y:
        ax.set_yscale("log")
    if smooth and shown:
        low, high = min(shown), max(shown)
        ax.set_ylim(*((low / 2, high * 2) if log_y else (low - 0.1 * (high - low), high + 0.1 * (high - low))))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    _legend(ax)
    return _save(fig, path)


def bars_plot(values: Mapping[str, tuple[float | None, float | None, str]], path: Path, title: str,
              ylabel: str) -> Path:
    """One bar per optimizer: ``(mean, std, annotation)``; a ``None`` mean is drawn as "not reached".

    The y range holds every error bar and its annotation (placed above the bar's error bar).
    """
    names = list(values)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(names) + 2), 4.2))
    positions = np.arange(len(names))
    means = [values[n][0] for n in names]
    heights = [m if m is not None else 0.0 for m in means]
    errors = [values[n][1] if values[n][1] is not None else math.nan for n in names]  # nan: no error bar
    colors = [f"C{i}" for i in range(len(names))]
    ax.bar(positions, heights, yerr=errors, color=colors, capsize=4, label="mean ± std over seeds")
    tops = [h + (0.0 if math.isnan(e) else e) for h, e in zip(heights, errors)]
    top = max(tops) if tops and max(tops) > 0 else 1.0
    for x, name, mean, bar_top in zip(positions, names, means, tops):
        text = values[name][2] if mean is not None else "not reached"
        ax.text(x, bar_top + 0.02 * top, text, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(positions, names, rotation=20 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center")
    ax.set_ylim(0, top * 1.25)
    ax.set_xlabel("optimizer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def final_point_plot(points: Mapping[str, Sequence[float]], minimum: Sequence[float], path: Path,
                     title: str) -> Path:
    """Grouped bars: each coordinate of each optimizer's final point next to the known minimiser."""
    dim = len(minimum)
    series = {**{name: list(p) for name, p in points.items()}, "minimum": list(minimum)}
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * dim + 3), 4.5))
    for i, (name, values) in enumerate(series.items()):
        offsets = np.arange(dim) - 0.4 + width * (i + 0.5)
        ax.bar(offsets, values, width=width, label=name, color="black" if name == "minimum" else f"C{i}",
               alpha=0.6 if name == "minimum" else 0.9)
    ax.set_xticks(np.arange(dim), [f"x{i}" for i in range(dim)])
    ax.set_xlabel("coordinate")
    ax.set_ylabel("value at the end of training")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def lr_plot(curves: Mapping[str, Curve], path: Path, title: str) -> Path:
    """The learning rate used at every step, one line per configuration (log y)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for index, (name, (steps, lrs)) in enumerate(curves.items()):
        ax.plot(steps, lrs, lw=1.5, label=name, **_style(index))
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    _legend(ax)
    return _save(fig, path)


def sensitivity_plot(trials: Mapping[str, Sequence[tuple[float, float | None]]],
                     chosen: Mapping[str, float], path: Path, title: str, ylabel: str, mode: str,
                     log_y: bool = False, lr_range: tuple[float, float] | None = None) -> Path:
    """The tuned metric against the learning rate for every tuning trial of every optimizer (log x).

    ``trials`` maps a label to ``(lr, metric or None)`` pairs (``None``: diverged, drawn as × on the
    worst edge); ``chosen`` marks each label's selected learning rate with a ring; ``lr_range`` (the union
    of the searched ranges) sets the x limits, so where the trials sit within the search shows. How wide each
    optimizer's good region is, and whether the trial budget found it, reads off the picture.
    """
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    finite = [m for pairs in trials.values() for _, m in pairs if m is not None and math.isfinite(m)]
    if log_y:
        finite = [m for m in finite if m > 0]
    if finite:
        low, high = min(finite), max(finite)
    else:
        low, high = (1e-3, 1.0) if log_y else (0.0, 1.0)
    if log_y:
        edge = high * 3.0 if mode == "min" else low / 3.0
    else:
        pad = (high - low) * 0.08 or max(abs(high), 1.0) * 0.05
        edge = high + pad if mode == "min" else low - pad
    for index, (name, pairs) in enumerate(trials.items()):
        style = _style(index)
        ok = sorted((lr, m) for lr, m in pairs if m is not None and math.isfinite(m) and (m > 0 or not log_y))
        bad = [lr for lr, m in pairs if m is None or not math.isfinite(m) or (log_y and m <= 0)]
        if ok:
            ax.plot(*zip(*ok), "o-", color=style["color"], lw=0.8, ms=5, alpha=0.85, label=name)
        if bad:
            ax.plot(bad, [edge] * len(bad), "x", color=style["color"], ms=8, mew=2,
                    label=None if ok else name)
        if name in chosen:
            value = dict(ok).get(chosen[name])
            if value is not None:
                ax.plot([chosen[name]], [value], "o", ms=13, mfc="none", mec=style["color"], mew=2)
    ax.set_xscale("log")
    if lr_range is not None:
        ax.set_xlim(lr_range[0] / 1.3, lr_range[1] * 1.3)
    ax.xaxis.set_minor_formatter(NullFormatter())
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("learning rate (tuning trials; ring: chosen; ×: diverged)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    _legend(ax)
    return _save(fig, path)


def profile_plot(fractions: Mapping[str, Sequence[float]], taus: Sequence[float], path: Path, title: str) -> Path:
    """A performance profile (Dolan & Moré 2002): per configuration, the fraction of tasks solved within
    τ × the fastest time, as a step function of τ (log x)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for index, (name, values) in enumerate(fractions.items()):
        # a small vertical offset per line keeps identical profiles visible
        offset = 0.008 * (index - (len(fractions) - 1) / 2)
        ax.step(taus, np.asarray(values) + offset, where="post", lw=1.8, label=name, **_style(index))
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(taus[0], taus[-1])
    ax.set_ylim(-0.04, 1.04)
    ax.set_xlabel("τ (time to target / fastest time to target on that task)")
    ax.set_ylabel("fraction of tasks solved within τ")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    _legend(ax)
    return _save(fig, path)
