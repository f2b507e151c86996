"""Cosine annealing, with and without warm restarts (SGDR: Loshchilov & Hutter, ICLR 2017, arXiv:1608.03983)."""

from __future__ import annotations

import math

from torch import Tensor
from torch.optim import Optimizer

from optimlab.schedules._base import Schedule, check_positive_int, current_values

__all__ = ["CosineAnnealingLR", "CosineAnnealingWarmRestarts", "cosine_between"]


def cosine_between(high: float, low: float, progress: float) -> float:
    r"""Half-cosine from ``high`` (progress 0) to ``low`` (progress 1): ``low + (high − low)(1 + cos(π p))/2``."""
    return low + (high - low) * (1.0 + math.cos(math.pi * progress)) / 2.0


def _check_eta_min(eta_min: float) -> None:
    if isinstance(eta_min, bool) or not isinstance(eta_min, (int, float)) or not (eta_min >= 0.0):
        raise ValueError(f"Invalid eta_min: {eta_min!r} (accepted: a number >= 0)")


class CosineAnnealingLR(Schedule):
    r"""Cosine annealing from ``η₀`` to ``eta_min`` over ``T_max`` steps (Loshchilov & Hutter 2017):

    ``η_t = η_min + (η₀ − η_min) · (1 + cos(π t / T_max)) / 2``  (``lr_at``; periodic past ``T_max``, as torch).

    ``step()`` uses torch's chainable recurrence
    ``η_t = η_min + (η_{t-1} − η_min) · (1 + cos(π t/T_max)) / (1 + cos(π (t−1)/T_max))``,
    with ``η_t = η_{t-1} + (η₀ − η_min)(1 − cos(π/T_max))/2`` where the denominator vanishes
    (``t − 1 ≡ T_max  mod 2·T_max``).
    """

    _torch_closed_form = True

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0, last_epoch: int = -1) -> None:
        check_positive_int("T_max", T_max)
        _check_eta_min(eta_min)
        self.T_max = T_max
        self.eta_min = eta_min
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float | Tensor]:
        """The chainable recurrence above (the current rates unchanged at construction)."""
        t, period, low = self.last_epoch, self.T_max, self.eta_min
        if self._is_initial:
            return current_values(self.optimizer, "lr")
        groups = self.optimizer.param_groups
        if (t - 1 - period) % (2 * period) == 0:
            rise = (1.0 - math.cos(math.pi / period)) / 2.0
            return [group["lr"] + (base - low) * rise for base, group in zip(self.base_lrs, groups)]
        ratio = (1.0 + math.cos(math.pi * t / period)) / (1.0 + math.cos(math.pi * (t - 1) / period))
        return [ratio * (group["lr"] - low) + low for group in groups]

    def lr_at(self, step: int) -> list[float]:
        """``η_min + (η₀ − η_min)(1 + cos(π step / T_max))/2`` per param group."""
        self._check_step(step)
        return [cosine_between(base, self.eta_min, step / self.T_max) for base in self._float_base_lrs()]


class CosineAnnealingWarmRestarts(Schedule):
    r"""SGDR: cosine annealing restarted every ``T_i`` steps, with ``T_0`` the first period and
    ``T_{i+1} = T_mult · T_i`` (Loshchilov & Hutter 2017):

    ``η_t = η_min + (η₀ − η_min) · (1 + cos(π T_cur / T_i)) / 2``,

    where ``T_cur`` counts the steps since the last restart. ``step(epoch)`` also accepts a fractional epoch
    (e.g. ``epoch + i / iters_per_epoch``), as in torch.
    """

    def __init__(self, optimizer: Optimizer, T_0: int, T_mult: int = 1, eta_min: float = 0.0,
                 last_epoch: int = -1) -> None:
        check_positive_int("T_0", T_0)
        check_positive_int("T_mult", T_mult)
        _check_eta_min(eta_min)
        self.T_0 = T_0
        self.T_i = T_0
        self.T_mult = T_mult
        self.eta_min = eta_min
        self.T_cur: float = last_epoch
        super().__init__(optimizer, last_epoch)

    def _cycle_position(self, epoch: float) -> tuple[float, int]:
        """``(T_cur, T_i)`` at ``epoch`` (exact: subtracts whole periods instead of taking a logarithm)."""
        if self.T_mult == 1:
            return epoch % self.T_0, self.T_0
        t_cur, period = epoch, self.T_0
        while t_cur >= period:
            t_cur -= period
            period *= self.T_mult
        return t_cur, period

    def get_lr(self) -> list[float | Tensor]:
        """``η_min + (η₀ − η_min)(1 + cos(π T_cur/T_i))/2`` from the current ``T_cur``, ``T_i``."""
        return [cosine_between(base, self.eta_min, self.T_cur / self.T_i) for base in self.base_lrs]

    def step(self, epoch: float | None = None) -> None:  # type: ignore[override]
        """Advance one step, or jump to ``epoch`` (a float >= 0 is allowed)."""
        self._step_count += 1
        if epoch is None and self.last_epoch < 0:
            epoch = 0
        if epoch is None:
            epoch = self.last_epoch + 1
            self.T_cur = self.T_cur + 1
            if self.T_cur >= self.T_i:  # a modulo, as torch: a user-set T_cur past the period wraps fully
                self.T_cur %= self.T_i
                self.T_i *= self.T_mult
        else:
            if not (epoch >= 0):
                raise ValueError(f"Invalid epoch: {epoch!r} (accepted: a number >= 0)")
            self.T_cur, self.T_i = self._cycle_position(epoch)
        self.last_epoch = math.floor(epoch)
        self._write_lrs(self.get_lr())

    def _restart(self) -> None:
        self.T_cur, self.T_i = 0, self.T_0
        super()._restart()

    def lr_at(self, step: int) -> list[float]:
        """The formula above with ``(T_cur, T_i)`` found from ``step`` by subtracting whole periods."""
        self._check_step(step)
        t_cur, period = self._cycle_position(step)
        return [cosine_between(base, self.eta_min, t_cur / period) for base in self._float_base_lrs()]
