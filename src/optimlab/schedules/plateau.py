"""Reduce the learning rate when a monitored metric stops improving (same interface as torch's)."""

from __future__ import annotations

import math
import warnings
from typing import SupportsFloat

from torch.optim import Optimizer
from torch.optim.lr_scheduler import EPOCH_DEPRECATION_WARNING

from optimlab.schedules._base import (
    Schedule,
    check_choice,
    check_non_negative_int,
    current_values,
    per_group,
    set_group_value,
)

__all__ = ["ReduceLROnPlateau"]


class ReduceLROnPlateau(Schedule):
    r"""Multiply the learning rate by ``factor`` when the metric passed to ``step(metric)`` has not improved
    for more than ``patience`` steps.

    A metric ``m`` improves on the best ``b`` when, for ``mode="min"``: ``m < b(1 − threshold)`` (``rel``) or
    ``m < b − threshold`` (``abs``); for ``mode="max"``: ``m > b(1 + threshold)`` or ``m > b + threshold``.
    On a reduction ``η ← max(η · factor, min_lr)`` per group, skipped when the change is at most ``eps``;
    then ``cooldown`` steps follow during which bad steps are not counted. No closed form: the rate depends
    on the metrics. A scalar ``min_lr`` also applies to param groups added later (``add_param_group``); a
    list must then be extended by the user (``scheduler.min_lrs``), as in torch.
    """

    closed_form = False

    def __init__(
        self,
        optimizer: Optimizer,
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_lr: float | list[float] = 0,
        eps: float = 1e-8,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        check_choice("mode", mode, ("min", "max"))
        check_choice("threshold_mode", threshold_mode, ("rel", "abs"))
        if not (0.0 <= factor < 1.0):
            raise ValueError(f"Invalid factor: {factor!r} (accepted range: [0, 1); new_lr = lr * factor)")
        check_non_negative_int("patience", patience)
        check_non_negative_int("cooldown", cooldown)
        for name, value in (("threshold", threshold), ("eps", eps)):
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"Invalid {name}: {value!r} (accepted range: a finite value >= 0)")
        self.default_min_lr = None if isinstance(min_lr, (list, tuple)) else float(min_lr)
        self.min_lrs = [float(v) for v in per_group("min_lr", optimizer, min_lr)]
        if any(not (v >= 0.0) for v in self.min_lrs):
            raise ValueError(f"Invalid min_lr: {min_lr!r} (accepted: values >= 0)")
        self.optimizer = optimizer
        self.mode = mode
        self.factor = factor
        self.patience = patience
        self.threshold = threshold
        self.threshold_mode = threshold_mode
        self.cooldown = cooldown
        self.eps = eps
        self.last_epoch = 0
        self._step_count = 0
        self.base_lrs = current_values(optimizer, "lr")
        self._last_lr = current_values(optimizer, "lr")
        self.mode_worse = math.inf if mode == "min" else -math.inf
        self._reset()

    def _reset(self) -> None:
        """Forget the best metric, the bad-step count and the cooldown."""
        self.best = self.mode_worse
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    @property
    def in_cooldown(self) -> bool:
        """True while bad steps are not counted after a reduction."""
        return self.cooldown_counter > 0

    def is_better(self, metric: float, best: float) -> bool:
        """Whether ``metric`` improves on ``best`` by more than the threshold (see the class docstring)."""
        if self.mode == "min":
            return metric < (best * (1.0 - self.threshold) if self.threshold_mode == "rel" else best - self.threshold)
        return metric > (best * (self.threshold + 1.0) if self.threshold_mode == "rel" else best + self.threshold)

    def step(self, metrics: SupportsFloat, epoch: int | None = None) -> None:  # type: ignore[override]
        """Record one value of the monitored metric and reduce the learning rates if it has plateaued.

        ``epoch`` (deprecated in torch, accepted with its warning) sets ``last_epoch`` instead of counting.
        """
        current = float(metrics)
        self._step_count += 1
        if epoch is None:
            self.last_epoch += 1
        else:
            warnings.warn(EPOCH_DEPRECATION_WARNING, UserWarning, stacklevel=2)
            self.last_epoch = epoch
        if self.is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.in_cooldown:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            self._reduce_lrs()
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = current_values(self.optimizer, "lr")

    def _reduce_lrs(self) -> None:
        groups = self.optimizer.param_groups
        if len(groups) != len(self.min_lrs) and self.default_min_lr is not None:
            self.min_lrs = [self.default_min_lr] * len(groups)
        if len(groups) != len(self.min_lrs):
            raise RuntimeError(f"ReduceLROnPlateau has {len(self.min_lrs)} min_lrs but the optimizer now has "
                               f"{len(groups)} param groups (set scheduler.min_lrs to one value per group)")
        for group, floor in zip(groups, self.min_lrs):
            old = float(group["lr"])
            new = max(old * self.factor, floor)
            if old - new > self.eps:
                set_group_value(group, "lr", new)
