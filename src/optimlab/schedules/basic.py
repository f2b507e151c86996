"""The basic schedules: Lambda, Multiplicative, Step, MultiStep, Constant, Linear, Exponential, Polynomial.

Same constructor arguments and learning-rate sequences as ``torch.optim.lr_scheduler`` (2.13). All but
:class:`LambdaLR` are *chainable*: ``step()`` updates the optimizer's current learning rate (so several of
them can act on one optimizer through :class:`~optimlab.schedules.ChainedScheduler`), while ``lr_at(t)`` is
the closed form from ``base_lrs``. Notation: ``t = last_epoch`` (0 after construction), ``η₀`` the param
group's base (initial) learning rate.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence

from torch import Tensor
from torch.optim import Optimizer

from optimlab.schedules._base import (
    Schedule,
    check_factor,
    check_non_negative_int,
    check_positive_int,
    current_values,
    lambdas_per_group,
)

__all__ = ["LambdaLR", "MultiplicativeLR", "StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR",
           "PolynomialLR"]

LrLambda = Callable[[int], float] | Sequence[Callable[[int], float]]


def _check_gamma(gamma: float) -> None:
    if not (gamma > 0.0 and math.isfinite(gamma)):
        raise ValueError(f"Invalid gamma: {gamma!r} (accepted range: a finite value > 0)")


class _ScaledBase(Schedule):
    """A schedule whose closed form is ``η₀ · factor(t)`` for every group."""

    def _factor(self, step: int) -> float:
        raise NotImplementedError

    def lr_at(self, step: int) -> list[float]:
        """``η₀ · factor(step)`` for each param group (see the class docstring for ``factor``)."""
        self._check_step(step)
        factor = self._factor(step)
        return [base * factor for base in self._float_base_lrs()]


class LambdaLR(Schedule):
    r"""Learning rate ``η_t = η₀ · λ(t)`` for a user function ``λ`` (one per param group, or one shared).

    Not chainable: it sets the rate from ``base_lrs``. ``λ`` is saved in ``state_dict`` only when it is a
    callable object (its ``__dict__``), as in torch.
    """

    _callable_attrs = ("lr_lambdas",)

    def __init__(self, optimizer: Optimizer, lr_lambda: LrLambda, last_epoch: int = -1) -> None:
        self.lr_lambdas = lambdas_per_group(optimizer, lr_lambda)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, step: int) -> list[float]:
        """``η₀ · λ_i(step)`` per param group ``i``."""
        self._check_step(step)
        return [base * fn(step) for fn, base in zip(self.lr_lambdas, self._float_base_lrs())]


class MultiplicativeLR(Schedule):
    r"""Each step multiplies the current learning rate: ``η_t = η_{t-1} · λ(t)``, so
    ``η_t = η₀ · ∏_{s=1}^{t} λ(s)`` (``lr_at`` evaluates that product, O(t)).
    """

    _callable_attrs = ("lr_lambdas",)

    def __init__(self, optimizer: Optimizer, lr_lambda: LrLambda, last_epoch: int = -1) -> None:
        self.lr_lambdas = lambdas_per_group(optimizer, lr_lambda)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float | Tensor]:
        """``group["lr"] · λ(t)`` (the current rates unchanged at construction)."""
        if self._is_initial:
            return current_values(self.optimizer, "lr")
        return [group["lr"] * fn(self.last_epoch) for fn, group in zip(self.lr_lambdas, self.optimizer.param_groups)]

    def lr_at(self, step: int) -> list[float]:
        """``η₀ · ∏_{s=1}^{step} λ(s)`` per param group."""
        self._check_step(step)
        out = []
        for fn, base in zip(self.lr_lambdas, self._float_base_lrs()):
            for s in range(1, step + 1):
                base = base * fn(s)
            out.append(base)
        return out


class StepLR(_ScaledBase):
    r"""Decay by ``gamma`` every ``step_size`` steps: ``η_t = η₀ · γ^{⌊t / step_size⌋}``."""

    _torch_closed_form = True

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1, last_epoch: int = -1) -> None:
        check_positive_int("step_size", step_size)
        _check_gamma(gamma)
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float | Tensor]:
        """``group["lr"] · γ`` when ``t`` is a positive multiple of ``step_size``, else unchanged."""
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return current_values(self.optimizer, "lr")
        return [group["lr"] * self.gamma for group in self.optimizer.param_groups]

    def _factor(self, step: int) -> float:
        return self.gamma ** (step // self.step_size)


class MultiStepLR(_ScaledBase):
    r"""Decay by ``gamma`` at each milestone: ``η_t = η₀ · γ^{#\{m ∈ milestones : m ≤ t\}}`` (a milestone
    listed twice decays twice)."""

    _torch_closed_form = True

    def __init__(self, optimizer: Optimizer, milestones: Iterable[int], gamma: float = 0.1,
                 last_epoch: int = -1) -> None:
        milestones = list(milestones)
        for m in milestones:
            check_non_negative_int("milestone", m)
        _check_gamma(gamma)
        self.milestones = sorted(milestones)
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float | Tensor]:
        """``group["lr"] · γ^k`` when ``t`` appears ``k > 0`` times in ``milestones``, else unchanged."""
        hits = self.milestones.count(self.last_epoch)
        if hits == 0:
            return current_values(self.optimizer, "lr")
        return [group["lr"] * self.gamma**hits for group in self.optimizer.param_groups]

    def _factor(self, step: int) -> float:
        return self.gamma ** bisect_right(self.milestones, step)


class ConstantLR(_ScaledBase):
    r"""Scale by ``factor`` for the first ``total_iters`` steps: ``η_t = η₀ · factor`` for ``t < total_iters``,
    ``η₀`` afterwards."""

    _torch_closed_form = True

    def __init__(self, optimizer: Optimizer, factor: float = 1.0 / 3, total_iters: int = 5,
                 last_epoch: int = -1) -> None:
        check_factor("factor", factor, 0.0, 1.0, low_open=True)
        check_positive_int("total_iters", total_iters)
        self.factor = factor
        self.total_iters = total_iters
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float | Tensor]:
        """``group["lr"] · factor`` at ``t = 0``, ``group["lr"] / factor`` at ``t = total_iters``, else unchanged."""
        if self.last_epoch == 0:
            return [group["lr"] * self.factor for group in self.optimizer.param_groups]
        if self.last_epoch != self.total_iters:
            return current_values(self.optimizer, "lr")
        return [group["lr"] * (1.0 / self.factor) for group in self.optimizer.param_groups]

    def _factor(self, step: int) -> float:
        return 1.0 if step >= self.total_iters else self.factor


class LinearLR(_ScaledBase):
    r"""Linear change of the multiplier from ``start_factor`` to ``end_factor`` over ``total_iters`` steps:
    ``η_t = η₀ · (s + (e − s) · min(t, T) / T)``.

    Chainable form: ``η_t = η_{t-1} · (1 + (e − s) / (T·s + (t − 1)(e − s)))`` for ``1 ≤ t ≤ T``.
    """

    _torch_closed_form = True

    def __init__(self, optimizer: Optimizer, start_factor: float = 1.0 / 3, end_factor: float = 1.0,
                 total_iters: int = 5, last_epoch: int = -1) -> None:
        check_factor("start_factor", start_factor, 0.0, 1.0, low_open=True)
        check_factor("end_factor", end_factor, 0.0, 1.0)
        check_positive_int("total_iters", total_iters)
        self.start_factor = start_factor
        self.end_factor = end_factor
        self.total_iters = total_iters
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float | Tensor]:
        """The chainable form above (``group["lr"] · s`` at ``t = 0``; unchanged after ``T``)."""
        t = self.last_epoch
        if t == 0:
            return [group["lr"] * self.start_factor for group in self.optimizer.param_groups]
        if self._is_initial or t > self.total_iters:
            return current_values(self.optimizer, "lr")
        delta = self.end_factor - self.start_factor
        ratio = 1.0 + delta / (self.total_iters * self.start_factor + (t - 1) * delta)
        return [group["lr"] * ratio for group in self.optimizer.param_groups]

    def _factor(self, step: int) -> float:
        delta = self.end_factor - self.start_factor
        return self.start_factor + delta * min(self.total_iters, step) / self.total_iters


class ExponentialLR(_ScaledBase):
    r"""Decay by ``gamma`` every step: ``η_t = η₀ · γ^t``."""

    _torch_closed_form = True

    def __init__(self, optimizer: Optimizer, gamma: float, last_epoch: int = -1) -> None:
        _check_gamma(gamma)
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float | Tensor]:
        """``group["lr"] · γ`` (unchanged at construction)."""
        if self._is_initial:
            return current_values(self.optimizer, "lr")
        return [group["lr"] * self.gamma for group in self.optimizer.param_groups]

    def _factor(self, step: int) -> float:
        return self.gamma**step


class PolynomialLR(_ScaledBase):
    r"""Polynomial decay to zero over ``total_iters`` steps: ``η_t = η₀ · (1 − min(t, T)/T)^p``.

    Chainable form: ``η_t = η_{t-1} · ((1 − t/T) / (1 − (t−1)/T))^p`` for ``1 ≤ t ≤ T``.
    """

    _torch_closed_form = True

    def __init__(self, optimizer: Optimizer, total_iters: int = 5, power: float = 1.0, last_epoch: int = -1) -> None:
        check_positive_int("total_iters", total_iters)
        if not (power >= 0.0 and math.isfinite(power)):
            raise ValueError(f"Invalid power: {power!r} (accepted range: a finite value >= 0)")
        self.total_iters = total_iters
        self.power = power
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float | Tensor]:
        """The chainable form above (unchanged at construction and after ``T``)."""
        t, total = self.last_epoch, self.total_iters
        if self._is_initial or t > total:
            return current_values(self.optimizer, "lr")
        ratio = ((1.0 - t / total) / (1.0 - (t - 1) / total)) ** self.power
        return [group["lr"] * ratio for group in self.optimizer.param_groups]

    def _factor(self, step: int) -> float:
        return (1.0 - min(self.total_iters, step) / self.total_iters) ** self.power
