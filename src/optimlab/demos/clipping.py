"""The seed's clipping study: an exploding 3-layer RNN trained four ways from identical weights.

No clipping, total-norm clipping at 1.0, value clipping at 0.5 and adaptive (percentile) clipping,
each with SGD (lr 0.01) for 100 epochs on the same data in the same order, optionally behind a
:class:`~optimlab.guard.NonFiniteGuard` so that non-finite steps are skipped and counted instead of
destroying the weights. Writes a 2×2 figure (loss, gradient norm, clip rate, mean final loss) and
the statistics as JSON; :func:`statistics_rows` gives the printed table.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from optimlab.clip import make_clipper
from optimlab.guard import ExplosionDetector, NonFiniteGuard
from optimlab.io import atomic_savefig, atomic_write_text
from optimlab.models.rnn import ExplodingRNN, SequenceData, make_sequence_data, sequence_batches

__all__ = ["METHODS", "ClippingRun", "plot_clipping_study", "run_clipping_study", "statistics_rows",
           "train_with_clipping", "write_clipping_study"]

#: The four ways of the study: label -> :func:`optimlab.clip.make_clipper` spec.
METHODS: dict[str, str] = {
    "no clipping": "none",
    "norm 1.0": "norm:1.0",
    "value 0.5": "value:0.5",
    "adaptive p=10": "adaptive:10",
}
FINAL_EPOCHS = 10  # "final loss" = the mean epoch loss over the last FINAL_EPOCHS epochs


@dataclass
class ClippingRun:
    """One training run: per-epoch mean loss and clip rate (%), per-step gradient norms (before clipping)."""

    label: str
    spec: str
    epoch_losses: list[float] = field(default_factory=list)
    epoch_clip_rates: list[float] = field(default_factory=list)
    epoch_mean_grad_norms: list[float] = field(default_factory=list)
    step_grad_norms: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    explosion_steps: list[int] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        """Mean epoch loss over the last :data:`FINAL_EPOCHS` epochs."""
        return float(np.mean(self.epoch_losses[-FINAL_EPOCHS:]))

    @property
    def clip_rate(self) -> float:
        """Percentage of steps whose gradients were clipped, over the whole run."""
        return float(np.mean(self.epoch_clip_rates))

    def statistics(self) -> dict[str, float | int | str]:
        """The row of the printed table."""
        finite = [n for n in self.step_grad_norms if math.isfinite(n)]
        return {"method": self.label, "spec": self.spec, "final_loss": self.final_loss,
                "max_grad_norm": max(finite, default=math.nan), "mean_grad_norm": float(np.mean(finite)),
                "clip_rate_percent": self.clip_rate, "skipped_steps": self.skipped_steps,
                "nonfinite_grad_steps": len(self.step_grad_norms) - len(finite),
                "explosions": len(self.explosion_steps)}


def train_with_clipping(label: str, spec: str, model: nn.Module, data: SequenceData, epochs: int = 100,
                        lr: float = 0.01, batch_size: int = 32, seed: int = 0, guard: bool = True,
                        on_epoch: Callable[[ClippingRun], None] | None = None) -> ClippingRun:
    """Train ``model`` in place with SGD and the clipper ``spec`` (MSE loss); return what happened.

    The batch order depends only on ``seed``, so runs that start from the same weights see the same data.
    With ``guard`` a step whose gradients are NaN/inf is skipped and counted. An
    :class:`~optimlab.guard.ExplosionDetector` (6 sigma over the last 100 norms) records gradient spikes.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    clipper = make_clipper(spec, model.parameters())
    stepper = NonFiniteGuard(optimizer, max_consecutive_skips=None, log=False) if guard else optimizer
    detector = ExplosionDetector(k_sigma=6.0, window=100, min_history=10, log=False)
    order = torch.Generator().manual_seed(seed)
    run = ClippingRun(label, spec)
    for _ in range(epochs):
        losses, clipped, norms = [], [], []
        for inputs, targets in sequence_batches(data, batch_size, order):
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(inputs), targets)
            loss.backward()
            result = clipper.step()
            if detector.update(result.norm) is not None:
                run.explosion_steps.append(detector.steps)
            stepper.step()
            losses.append(float(loss.detach()))
            clipped.append(result.clipped)
            norms.append(result.norm)
        run.epoch_losses.append(float(np.mean(losses)))
        run.epoch_clip_rates.append(100.0 * float(np.mean(clipped)))
        run.epoch_mean_grad_norms.append(float(np.mean(norms)))
        run.step_grad_norms.extend(norms)
        if on_epoch is not None:
            on_epoch(run)
    if guard:
        run.skipped_steps = stepper.skipped_steps  # type: ignore[union-attr]
    return run


def run_clipping_study(epochs: int = 100, lr: float = 0.01, seed: int = 0, guard: bool = True,
                       batch_size: int = 64, methods: dict[str, str] | None = None,
                       on_epoch: Callable[[ClippingRun], None] | None = None) -> list[ClippingRun]:
    """Train one :class:`~optimlab.models.rnn.ExplodingRNN` (hidden 50, 3 layers, U(−2, 2)) per method,
    all from the same initial weights and on the same batches (256 sequences of length 20, batches of
    ``batch_size``)."""
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"Invalid epochs: {epochs} (accepted range: an int >= 1)")
    torch.manual_seed(seed)
    data = make_sequence_data(seed=seed)
    template = ExplodingRNN(input_size=data.inputs.shape[-1], hidden_size=50, num_layers=3, init_range=2.0)
    runs = []
    for label, spec in (methods or METHODS).items():
        model = copy.deepcopy(template)
        runs.append(train_with_clipping(label, spec, model, data, epochs=epochs, lr=lr, batch_size=batch_size,
                                        seed=seed, guard=guard, on_epoch=on_epoch))
    return runs


def statistics_rows(runs: list[ClippingRun]) -> list[dict[str, float | int | str]]:
    """One statistics dict per run (final loss, max and mean grad norm, clip rate, skipped steps)."""
    return [run.statistics() for run in runs]


def plot_clipping_study(runs: list[ClippingRun], path: str | Path) -> Path:
    """The 2×2 figure: loss (log), mean gradient norm per epoch (log), clip rate (%), mean final loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    (loss_ax, norm_ax), (rate_ax, bar_ax) = axes
    line_styles = ["-", "--", ":", "-."]  # distinct styles keep overlapping curves (e.g. two 100% clip rates) visible
    for index, (color, run) in enumerate(zip(colors, runs)):
        epochs = np.arange(1, len(run.epoch_losses) + 1)
        style = {"color": color, "label": run.label, "linestyle": line_styles[index % len(line_styles)],
                 "linewidth": 1.8}
        loss_ax.plot(epochs, run.epoch_losses, **style)
        norm_ax.plot(epochs, run.epoch_mean_grad_norms, **style)
        rate_ax.plot(epochs, run.epoch_clip_rates, **style)
    loss_ax.set(yscale="log", xlabel="epoch", ylabel="mean training loss (MSE)", title="Training loss")
    norm_ax.set(yscale="log", xlabel="epoch", ylabel="mean gradient norm (before clipping)",
                title="Gradient norm")
    rate_ax.set(xlabel="epoch", ylabel="steps clipped (%)", title="Clip rate", ylim=(-5, 105))
    for ax in (loss_ax, norm_ax, rate_ax):
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    finals = [run.final_loss for run in runs]
    bars = bar_ax.bar(range(len(runs)), finals, color=colors[: len(runs)])
    bar_ax.bar_label(bars, labels=[f"{value:.3g}" for value in finals], padding=2)
    bar_ax.set_xticks(range(len(runs)), [run.label for run in runs])
    bar_ax.set(yscale="log", ylabel=f"mean loss, last {FINAL_EPOCHS} epochs",
               title=f"Final loss (mean of the last {FINAL_EPOCHS} epochs)")
    bar_ax.margins(y=0.2)
    fig.suptitle("Exploding 3-layer RNN (U(−2, 2) init), SGD lr 0.01: four clipping strategies")
    fig.tight_layout()
    target = atomic_savefig(fig, path)
    plt.close(fig)
    return target


def _json_safe(value: object) -> object:
    """``value`` with NaN/inf floats replaced by ``None`` (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def write_clipping_study(runs: list[ClippingRun], out: str | Path) -> dict[str, Path]:
    """Write ``clipping.png`` and ``clipping.json`` (statistics and per-epoch curves) into ``out``."""
    out = Path(out)
    figure = plot_clipping_study(runs, out / "clipping.png")
    payload = {"statistics": statistics_rows(runs),
               "runs": [{k: v for k, v in asdict(run).items() if k != "step_grad_norms"} for run in runs]}
    results = out / "clipping.json"
    atomic_write_text(results, json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n")
    return {"figure": figure, "results": results}
