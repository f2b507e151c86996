"""The SWA learning-rate schedule: anneal each group's rate to a constant ``swa_lr`` (Izmailov et al.,
"Averaging Weights Leads to Wider Optima and Better Generalization", UAI 2018), as torch's ``SWALR``."""

from __future__ import annotations

import math
from torch import Tensor
from torch.optim import Optimizer

from optimlab.schedules._base import Schedule, check_choice, per_group

__all__ = ["SWALR"]


def _anneal(strategy: str, progress: float) -> float:
    """The share of ``swa_lr`` at ``progress`` in [0, 1]: ``(1 − cos(πp))/2`` (``cos``) or ``p`` (``linear``)."""
    return (1 - math.cos(math.pi * progress)) / 2 if strategy == "cos" else progress


class SWALR(Schedule):
    r"""Anneal the learning rate from its value at construction :math:`\eta_0` to ``swa_lr`` over
    ``anneal_epochs`` steps, then hold it:

    ``η_t = α_t · swa_lr + (1 − α_t) · η₀``,  ``α_t = a(min(1, t / max(1, anneal_epochs)))``,

    with ``a(p) = (1 − cos πp)/2`` (``cos``) or ``p`` (``linear``); ``anneal_epochs = 0`` jumps to ``swa_lr`` at
    construction. ``step()`` follows torch's recurrence (it recovers :math:`\eta_0` from the current rate, so
    a rate changed by hand is annealed from), ``lr_at(t)`` is the closed form above. Same arguments and
    sequence as ``torch.optim.swa_utils.SWALR``; sets ``group["swa_lr"]``.
    """

    def __init__(self, optimizer: Optimizer, swa_lr: float | list[float], anneal_epochs: int = 10,
                 anneal_strategy: str = "cos", last_epoch: int = -1) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        for group, value in zip(optimizer.param_groups, per_group("swa_lr", optimizer, swa_lr)):
            group["swa_lr"] = value
        check_choice("anneal_strategy", anneal_strategy, ("cos", "linear"))
        if isinstance(anneal_epochs, bool) or not isinstance(anneal_epochs, int) or anneal_epochs < 0:
            raise ValueError(f"anneal_epochs must be equal or greater than 0, got {anneal_epochs!r} "
                             "(accepted: an integer >= 0)")
        self.anneal_epochs = anneal_epochs
        self._anneal_strategy = anneal_strategy
        super().__init__(optimizer, last_epoch)

    def _alpha(self, step: int) -> float:
        return _anneal(self._anneal_strategy, max(0, min(1, step / max(1, self.anneal_epochs))))

    def get_lr(self) -> list[float | Tensor]:
        """torch's recurrence: undo the previous step's blend to recover η₀, then blend for this step."""
        step = self._step_count - 1
        if self.anneal_epochs == 0:
            step = max(1, step)
        previous, now = self._alpha(step - 1), self._alpha(step)
        rates = []
        for group in self.optimizer.param_groups:
            start = group["swa_lr"] if previous == 1 else (group["lr"] - previous * group["swa_lr"]) / (1 - previous)
            rates.append(group["swa_lr"] * now + start * (1 - now))
        return rates

    def lr_at(self, step: int) -> list[float]:
        """``α_t · swa_lr + (1 − α_t) · η₀`` per param group."""
        self._check_step(step)
        alpha = self._alpha(max(1, step) if self.anneal_epochs == 0 else step)
        return [float(group["swa_lr"]) * alpha + base * (1 - alpha)
                for group, base in zip(self.optimizer.param_groups, self._float_base_lrs())]
