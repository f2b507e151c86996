"""The training run's figure: ``loss.png`` from ``metrics.csv`` (train and validation loss, LR on a second axis)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from optimlab.io import atomic_savefig

__all__ = ["plot_training"]


def _column(rows: list[dict[str, str]], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows where ``name`` is filled in."""
    kept = [(float(r["step"]), float(r[name])) for r in rows if r.get(name)]
    steps, values = zip(*kept) if kept else ((), ())
    return np.asarray(steps), np.asarray(values)


def plot_training(metrics_csv: str | Path, path: str | Path, *, title: str = "training run") -> Path:
    """Plot the training loss (every logged step) and the validation loss (every evaluation) against the step,
    with the learning rate on a second y axis; save the figure to ``path`` atomically and return it."""
    with Path(metrics_csv).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    steps, train = _column(rows, "train_loss")
    ax.plot(steps, train, color="C0", lw=1.5, label="training loss (logged steps)")
    val_steps, val = _column(rows, "val_loss")
    ax.plot(val_steps, val, "o-", color="C1", lw=1.5, ms=4, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats per character)")
    ax.grid(True, alpha=0.3)
    lr_steps, lr = _column(rows, "lr")
    lines, labels = ax.get_legend_handles_labels()
    if lr.size:
        lr_axis = ax.twinx()
        lr_axis.plot(lr_steps, lr, color="C2", lw=1, ls="--", label="learning rate (right axis)")
        lr_axis.set_ylabel("learning rate")
        lr_axis.set_ylim(bottom=0)
        lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        more_lines, more_labels = lr_axis.get_legend_handles_labels()
        lines, labels = lines + more_lines, labels + more_labels
    last = f"; last validation loss {val[-1]:.4f} at step {int(val_steps[-1])}" if val.size else ""
    ax.set_title(f"{title}{last}")
    ax.legend(lines, labels, loc="upper right", fontsize=8)
    return atomic_savefig(fig, path)
