r"""Shared skeleton of the learning-rate-free optimizers (D-Adaptation, Prodigy).

Their step size :math:`d` is one estimate of the distance to the solution, shared by every param
group: a first pass over all groups accumulates the statistics of the estimate (inner products and
norms reduced to two scalars), :math:`d` is updated from them, and a second pass applies the update
with it. :class:`LRFreeOptimizer` runs the closure and hands both passes every group that has
gradients at once (``_global_update``); the estimate and its statistics live in
the param groups (as in the authors' packages), so ``state_dict`` carries them and
``optimizer.d`` reports the :math:`d` found (:func:`step_size_estimate` also through a wrapper).

The bench (:mod:`optimlab.bench.tuning`) keeps their lr at the default 1.0 instead of searching it
(:func:`is_learning_rate_free`), unless asked to (``--tune-lr-free``), and stores the :math:`d` each
trial ends with.

The learning rate is a multiplier of :math:`d` (leave it at 1.0, the authors' advice). As in the
authors' code, every param group must have the same ``lr`` or ``lr=0`` (a frozen group; no
statistics are gathered from it). Unlike the authors' code, a frozen group is not updated at all:
``prodigyopt`` and ``dadaptation`` still apply the decoupled weight decay to it, and ``prodigyopt``
with :math:`\beta_1 = 0` divides its gradient by a second moment that was never accumulated
(:math:`d\,\epsilon`), which moves the frozen parameters by :math:`O(1/\epsilon)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from optimlab.optim._base import as_float

__all__ = ["LRFreeOptimizer", "GroupBatch", "LR_FREE_BOUNDS", "is_learning_rate_free", "step_size_estimate"]

LR_FREE_BOUNDS = (0.01, 10.0)
"""The lab's search range for the lr of a learning-rate-free optimizer: a multiplier of the estimated
step around the authors' 1.0 (the default lr), not a learning rate. Reaches down to 0.01: on the bench's
digits MLP both optimizers tuned it to 0.15, at the low end of the first range [0.1, 10] (their estimate
overshoots there at 1.0; docs/frontier_optimizers.md)."""

GroupBatch = tuple[dict[str, Any], list[Tensor], list[Tensor], list[dict[str, Any]]]
"""One param group in a step: (group, params with a gradient, their gradients, their states)."""


class LRFreeOptimizer:
    """Mixin placed before :class:`optimlab.optim._base.OptimlabOptimizer` in the bases of a learning-rate-free
    optimizer: the two-pass step over all param groups at once (module docstring). Not an optimizer itself
    (so not registered); the subclass supplies ``_init_group`` (as any optimlab optimizer) and
    ``_global_update``."""

    param_groups: list[dict[str, Any]]
    state: dict[Tensor, dict[str, Any]]

    #: one parameter's update depends on every parameter's gradient (through d): param groups are not
    #: separate optimizers (read by the generated test matrix, tests/optim/cases.py)
    per_parameter_update = False
    #: d's global sums over all parameters do not run on sharded (FSDP2) parameters yet: refused by name
    supports_dtensor = False
    #: the step size is estimated (d); lr is a multiplier of it that the bench leaves at 1.0 by default
    learning_rate_free = True

    @property
    def d(self) -> float:
        """The current step-size estimate :math:`d` (shared by all groups)."""
        return float(self.param_groups[0]["d"])

    def _shared_lr(self) -> float:
        """The largest group lr; raises ``RuntimeError`` when a group has another non-zero lr."""
        lrs = [as_float(group["lr"]) for group in self.param_groups]
        lr = max(lrs)
        if any(value not in (lr, 0.0) for value in lrs):
            raise RuntimeError(f"{type(self).__name__}: every param group needs the same lr or lr=0 "
                               f"(got {sorted(set(lrs))}); scale d per group with lr=0 groups frozen")
        return lr

    def _global_update(self, batches: list[GroupBatch]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step; returns the closure's loss when a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.supports_complex:  # type: ignore[attr-defined]
            self._reject_complex()  # type: ignore[attr-defined]
        batches: list[GroupBatch] = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            self._init_group(group, params)  # type: ignore[attr-defined]
            batches.append((group, params, [p.grad for p in params], [self.state[p] for p in params]))
        self._global_update(batches)
        return loss


def is_learning_rate_free(cls: type) -> bool:
    """Whether optimizer class ``cls`` estimates its own step size (its ``learning_rate_free`` flag), so its
    ``lr`` is a multiplier of that estimate rather than a learning rate."""
    return bool(getattr(cls, "learning_rate_free", False))


def step_size_estimate(optimizer: torch.optim.Optimizer) -> float | None:
    """The :math:`d` a learning-rate-free optimizer has found (``LRFreeOptimizer.d``), also through a wrapper
    that keeps it as ``base_optimizer`` (SAM); ``None`` for any other optimizer."""
    while not is_learning_rate_free(type(optimizer)):
        base = getattr(optimizer, "base_optimizer", None)
        if not isinstance(base, torch.optim.Optimizer):
            return None
        optimizer = base
    return optimizer.d  # type: ignore[attr-defined]
