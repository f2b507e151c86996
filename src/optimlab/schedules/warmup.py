"""Schedules with a built-in linear warmup: warmup + cosine (the seed MiniGPT's schedule; Loshchilov & Hutter
2017 with the warmup of Goyal et al. 2017) and warmup-stable-decay (WSD: Hu et al., "MiniCPM", 2024,
arXiv:2404.06395; the 1-sqrt decay of Hägele et al., "Scaling Laws and Compute-Optimal Training Beyond Fixed
Training Durations", 2024, arXiv:2405.18392)."""

from __future__ import annotations

import math

from torch.optim import Optimizer

from optimlab.schedules._base import (
    Schedule,
    check_choice,
    check_factor,
    check_non_negative_int,
    check_positive_int,
    per_group,
)
from optimlab.schedules.cosine import cosine_between

__all__ = ["WarmupCosineLR", "WarmupStableDecayLR", "DECAY_SHAPES"]

#: Decay shapes of :class:`WarmupStableDecayLR`: the fraction of the way down after progress ``p ∈ [0, 1]``.
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


class _WarmupSchedule(Schedule):
    """Shared part: ``W`` warmup steps from ``start_factor · η₀`` linearly towards ``η₀``, a shape defined by
    the subclass until ``total_steps``, ``eta_min`` (per group) afterwards."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int, start_factor: float,
                 eta_min: float | list[float], last_epoch: int) -> None:
        check_non_negative_int("warmup_steps", warmup_steps)
        check_positive_int("total_steps", total_steps)
        check_factor("start_factor", start_factor, 0.0, 1.0)
        self.eta_mins = [float(v) for v in per_group("eta_min", optimizer, eta_min)]
        if any(not (v >= 0.0 and math.isfinite(v)) for v in self.eta_mins):
            raise ValueError(f"Invalid eta_min: {eta_min!r} (accepted: finite values >= 0)")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.start_factor = start_factor
        super().__init__(optimizer, last_epoch)

    def _main(self, base: float, eta_min: float, step: int) -> float:
        """The rate at ``warmup_steps <= step <= total_steps``."""
        raise NotImplementedError

    def lr_at(self, step: int) -> list[float]:
        """Warmup ``η₀(s + (1 − s) t/W)`` for ``t < W``, the class's shape up to ``total_steps``, then ``eta_min``."""
        self._check_step(step)
        out = []
        for base, eta_min in zip(self._float_base_lrs(), self.eta_mins):
            if step < self.warmup_steps:
                out.append(base * (self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps))
            elif step <= self.total_steps:
                out.append(self._main(base, eta_min, step))
            else:
                out.append(eta_min)
        return out


class WarmupCosineLR(_WarmupSchedule):
    r"""Linear warmup then cosine decay (the seed MiniGPT's schedule):

    ``η_t = η₀ (s + (1 − s) t/W)`` for ``t < W``;
    ``η_t = η_min + (η₀ − η_min)(1 + cos(π (t − W)/(T − W)))/2`` for ``W ≤ t ≤ T``; ``η_min`` after ``T``.

    ``s = start_factor``, ``W = warmup_steps``, ``T = total_steps``, ``η_min = eta_min`` (one value, or one per
    param group). Requires ``W < T``.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int, start_factor: float = 0.01,
                 eta_min: float | list[float] = 0.0, last_epoch: int = -1) -> None:
        if isinstance(warmup_steps, int) and isinstance(total_steps, int) and warmup_steps >= total_steps:
            raise ValueError(f"warmup_steps ({warmup_steps}) must be shorter than total_steps ({total_steps})")
        super().__init__(optimizer, warmup_steps, total_steps, start_factor, eta_min, last_epoch)

    def _main(self, base: float, eta_min: float, step: int) -> float:
        return cosine_between(base, eta_min, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))


class WarmupStableDecayLR(_WarmupSchedule):
    r"""Warmup-stable-decay (WSD; Hu et al. 2024): linear warmup, a constant plateau at ``η₀``, then a decay
    over the last ``D = decay_steps`` steps to ``η_min``:

    ``η_t = η₀ (s + (1 − s) t/W)`` for ``t < W``;  ``η₀`` for ``W ≤ t < T − D``;
    ``η_t = η_min + (η₀ − η_min) · (1 − f(p))`` for ``T − D ≤ t ≤ T`` with ``p = (t − T + D)/D`` and
    ``f(p) = p`` (``linear``), ``(1 − cos(π p))/2`` (``cosine``) or ``√p`` (``1-sqrt``, Hägele et al. 2024);
    ``η_min`` after ``T``. Requires ``W + D ≤ T``.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int, decay_steps: int, total_steps: int,
                 start_factor: float = 0.01, eta_min: float | list[float] = 0.0, decay_shape: str = "1-sqrt",
                 last_epoch: int = -1) -> None:
        check_positive_int("decay_steps", decay_steps)
        check_choice("decay_shape", decay_shape, DECAY_SHAPES)
        if isinstance(warmup_steps, int) and isinstance(total_steps, int) and warmup_steps + decay_steps > total_steps:
            raise ValueError(f"warmup_steps + decay_steps ({warmup_steps} + {decay_steps}) must not exceed "
                             f"total_steps ({total_steps})")
        self.decay_steps = decay_steps
        self.decay_shape = decay_shape
        super().__init__(optimizer, warmup_steps, total_steps, start_factor, eta_min, last_epoch)

    def _main(self, base: float, eta_min: float, step: int) -> float:
        decay_start = self.total_steps - self.decay_steps
        if step < decay_start:
            return base
        progress = (step - decay_start) / self.decay_steps
        if self.decay_shape == "cosine":
            return cosine_between(base, eta_min, progress)
        done = progress if self.decay_shape == "linear" else math.sqrt(progress)
        return eta_min + (base - eta_min) * (1.0 - done)
