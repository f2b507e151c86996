"""Cyclical learning rates (Smith, "Cyclical Learning Rates for Training Neural Networks", WACV 2017,
arXiv:1506.01186), with momentum cycled inversely."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

from optimlab.schedules._base import MomentumCycler, Schedule, check_choice, per_group, set_group_value

__all__ = ["CyclicLR"]

_MODES = ("triangular", "triangular2", "exp_range")


class CyclicLR(MomentumCycler, Schedule):
    r"""Cyclical learning rate between ``base_lr`` and ``max_lr`` (Smith 2017).

    With ``C = step_size_up + step_size_down``, ``r = step_size_up / C``, cycle ``c = ⌊1 + t/C⌋`` and
    position ``x = 1 + t/C − c ∈ [0, 1)``, the triangle height is ``h = x/r`` for ``x ≤ r`` and
    ``(x − 1)/(r − 1)`` otherwise, and

    ``η_t = base_lr + (max_lr − base_lr) · h · scale``,
    ``momentum_t = max_momentum − (max_momentum − base_momentum) · h · scale``,

    where ``scale`` is 1 (``triangular``), ``1/2^{c−1}`` (``triangular2``), ``γ^t`` (``exp_range``), or a user
    ``scale_fn`` of ``c`` (``scale_mode="cycle"``) or ``t`` (``"iterations"``). With ``cycle_momentum`` the
    optimizer's ``momentum`` (or ``betas[0]``) follows ``momentum_t``.
    """

    _callable_attrs = ("scale_fn",)

    def __init__(
        self,
        optimizer: Optimizer,
        base_lr: float | list[float],
        max_lr: float | list[float],
        step_size_up: int = 2000,
        step_size_down: int | None = None,
        mode: str = "triangular",
        gamma: float = 1.0,
        scale_fn: Callable[[float], float] | None = None,
        scale_mode: str = "cycle",
        cycle_momentum: bool = True,
        base_momentum: float | list[float] = 0.8,
        max_momentum: float | list[float] = 0.9,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        base_lrs = per_group("base_lr", optimizer, base_lr)
        self.max_lrs = per_group("max_lr", optimizer, max_lr)
        for low, high in zip(base_lrs, self.max_lrs):
            if not (0.0 <= float(low) <= float(high)):
                raise ValueError(f"CyclicLR needs 0 <= base_lr <= max_lr, got base_lr={float(low)}, "
                                 f"max_lr={float(high)}")
        for name, size in (("step_size_up", step_size_up), ("step_size_down", step_size_down)):
            if size is not None and not (float(size) > 0):
                raise ValueError(f"Invalid {name}: {size!r} (accepted: a number of steps > 0)")
        if scale_fn is None:
            check_choice("mode", mode, _MODES)
        else:
            check_choice("scale_mode", scale_mode, ("cycle", "iterations"))
        if not (gamma > 0.0):
            raise ValueError(f"Invalid gamma: {gamma!r} (accepted range: > 0)")
        up = float(step_size_up)
        down = float(step_size_down) if step_size_down is not None else up
        self.total_size = up + down
        self.step_ratio = up / self.total_size
        self.mode = mode
        self.gamma = gamma
        self.scale_fn = scale_fn
        # torch ties the built-in modes to a scale mode: triangular* scale per cycle, exp_range per iteration.
        self.scale_mode = scale_mode if scale_fn is not None else ("iterations" if mode == "exp_range" else "cycle")
        fresh = last_epoch == -1
        if fresh:
            for group, low in zip(optimizer.param_groups, base_lrs):
                set_group_value(group, "lr", low)
        self._setup_momentum(optimizer, cycle_momentum, base_momentum, max_momentum, fresh)
        self.base_lrs = base_lrs
        super().__init__(optimizer, last_epoch)
        if [float(b) for b in self.base_lrs] != [float(b) for b in base_lrs]:
            # a param group already had an 'initial_lr' (from another scheduler): cycle from base_lr anyway
            self.base_lrs = base_lrs
            self._write_lrs(self.get_lr())

    def _scale(self, cycle: int, step: int) -> float:
        x = cycle if self.scale_mode == "cycle" else step
        if self.scale_fn is not None:
            return self.scale_fn(x)
        if self.mode == "triangular":
            return 1.0
        if self.mode == "triangular2":
            return 1 / (2.0 ** (x - 1))
        return self.gamma**x

    def _height_and_scale(self, step: int) -> tuple[float, float]:
        cycle = math.floor(1 + step / self.total_size)
        x = 1.0 + step / self.total_size - cycle
        height = x / self.step_ratio if x <= self.step_ratio else (x - 1) / (self.step_ratio - 1)
        return height, self._scale(cycle, step)

    def _values_at(self, step: int) -> tuple[list[Any], list[float]]:
        height, scale = self._height_and_scale(step)
        lrs = [low + (high - low) * height * scale for low, high in zip(self.base_lrs, self.max_lrs)]
        momenta = ([high - (high - low) * height * scale for low, high in zip(self.base_momentums, self.max_momentums)]
                   if self.cycle_momentum else [])
        return lrs, momenta
