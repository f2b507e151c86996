"""The 1cycle policy (Smith & Topin, "Super-Convergence: Very Fast Training of Neural Networks Using Large
Learning Rates", 2017, arXiv:1708.07120), as in torch and fastai."""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer

from optimlab.schedules._base import MomentumCycler, Schedule, check_choice, check_positive_int, per_group
from optimlab.schedules.cosine import cosine_between

__all__ = ["OneCycleLR"]


def _linear_between(start: float, end: float, progress: float) -> float:
    return (end - start) * progress + start


class OneCycleLR(MomentumCycler, Schedule):
    r"""1cycle: warm up from ``max_lr / div_factor`` to ``max_lr``, then anneal to
    ``max_lr / (div_factor · final_div_factor)`` (Smith & Topin 2017).

    With ``T = total_steps`` and ``p = pct_start``, the phases end at steps ``pT − 1`` and ``T − 1``
    (two-phase, fastai's default), or ``pT − 1``, ``2pT − 2`` and ``T − 1`` (``three_phase=True``: up,
    back down to the initial rate, then annihilation). Within a phase running from step ``a`` to ``b`` from
    value ``u`` to ``v``, with progress ``q = (t − a)/(b − a)``:

    ``cos``: ``η_t = v + (u − v)(1 + cos(π q))/2``;   ``linear``: ``η_t = u + (v − u) q``.

    Momentum (or beta1) moves the opposite way between ``max_momentum`` and ``base_momentum``. Stepping past
    ``total_steps`` raises ``ValueError``, as in torch.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        max_lr: float | list[float],
        total_steps: int | None = None,
        epochs: int | None = None,
        steps_per_epoch: int | None = None,
        pct_start: float = 0.3,
        anneal_strategy: str = "cos",
        cycle_momentum: bool = True,
        base_momentum: float | list[float] = 0.85,
        max_momentum: float | list[float] = 0.95,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        if total_steps is not None:
            check_positive_int("total_steps", total_steps)
        elif epochs is not None and steps_per_epoch is not None:
            check_positive_int("epochs", epochs)
            check_positive_int("steps_per_epoch", steps_per_epoch)
            total_steps = epochs * steps_per_epoch
        else:
            raise ValueError("OneCycleLR needs total_steps, or both epochs and steps_per_epoch")
        self.total_steps = total_steps
        if not (0.0 <= pct_start <= 1.0):
            raise ValueError(f"Invalid pct_start: {pct_start!r} (accepted range: [0, 1])")
        check_choice("anneal_strategy", anneal_strategy, ("cos", "linear"))
        for name, value in (("div_factor", div_factor), ("final_div_factor", final_div_factor)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"Invalid {name}: {value!r} (accepted range: a finite value > 0)")
        self.anneal_strategy = anneal_strategy
        self.three_phase = bool(three_phase)
        up_end = float(pct_start * total_steps) - 1
        if self.three_phase:
            # (end step, lr from, lr to, momentum from, momentum to); "initial", "max", "min" name the rates.
            self._phases = [(up_end, "initial", "max", "max", "base"),
                            (float(2 * pct_start * total_steps) - 2, "max", "initial", "base", "max"),
                            (float(total_steps - 1), "initial", "min", "max", "max")]
        else:
            self._phases = [(up_end, "initial", "max", "max", "base"),
                            (float(total_steps - 1), "max", "min", "base", "max")]
        start = 0.0
        for index, (end, *_rest) in enumerate(self._phases):
            if not end > start:
                raise ValueError(f"OneCycleLR phase {index + 1} would be empty (steps {start:g} to {end:g}) with "
                                 f"total_steps={total_steps}, pct_start={pct_start}, three_phase={three_phase}: "
                                 "use more steps or a pct_start that gives every phase at least one step")
            start = end
        self.max_lrs = [float(v) for v in per_group("max_lr", optimizer, max_lr)]
        initial_lrs = [high / div_factor for high in self.max_lrs]
        self.min_lrs = [low / final_div_factor for low in initial_lrs]
        fresh = last_epoch == -1
        if fresh:
            for group, low, high, end in zip(optimizer.param_groups, initial_lrs, self.max_lrs, self.min_lrs):
                group["initial_lr"], group["max_lr"], group["min_lr"] = low, high, end
        self._setup_momentum(optimizer, cycle_momentum, base_momentum, max_momentum, fresh)
        super().__init__(optimizer, last_epoch)

    def _phase_at(self, step: int) -> tuple[float, tuple[Any, ...]]:
        if step > self.total_steps:
            raise ValueError(f"OneCycleLR stepped to step {step}, past total_steps={self.total_steps}: the "
                             "schedule is defined for steps 0..total_steps; build it with a larger total_steps "
                             "(or epochs * steps_per_epoch) covering the whole run")
        start = 0.0
        for index, phase in enumerate(self._phases):
            end = phase[0]
            if step <= end or index == len(self._phases) - 1:
                return (step - start) / (end - start), phase
            start = end
        raise AssertionError("unreachable: the last phase always matches")

    def _anneal(self, start: float, end: float, progress: float) -> float:
        if self.anneal_strategy == "cos":
            return cosine_between(start, end, progress)
        return _linear_between(start, end, progress)

    def _values_at(self, step: int) -> tuple[list[float], list[float]]:
        progress, (_end, lr_from, lr_to, mom_from, mom_to) = self._phase_at(step)
        rates = {"initial": self._float_base_lrs(), "max": self.max_lrs, "min": self.min_lrs}
        lrs = [self._anneal(u, v, progress) for u, v in zip(rates[lr_from], rates[lr_to])]
        momenta: list[float] = []
        if self.cycle_momentum:
            bounds = {"max": self.max_momentums, "base": self.base_momentums}
            momenta = [self._anneal(u, v, progress) for u, v in zip(bounds[mom_from], bounds[mom_to])]
        return lrs, momenta
