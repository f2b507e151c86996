"""The trainer's per-step policy, on its own: accumulate, unscale, clip, guard, step, schedule.

One optimizer step of :class:`StepPolicy` over ``accum`` micro-batches does, in this order:

1. **accumulate**: for each micro-batch, loss_i = forward(batch_i) and backward of loss_i / accum (scaled by
   the GradScaler under fp16), so the gradient is that of the mean loss over the k micro-batches — the
   gradient of one batch k times larger (micro-batches of equal size, a mean-reduced loss). Under DDP the
   non-final backward passes run inside ``no_sync`` (one all-reduce per optimizer step);
2. **unscale** the gradients (GradScaler only), so clipping sees true gradient norms;
3. **clip** (:func:`optimlab.clip.make_clipper`);
4. **guard**: :class:`optimlab.guard.NonFiniteGuard` steps the optimizer unless a gradient is non-finite
   (through the GradScaler under fp16); without a guard the optimizer (or the scaler) steps directly;
5. **schedule**: the LR schedule advances only when the optimizer really stepped — a skipped step leaves the
   learning rate where it was, so a run with skips follows the same schedule in optimizer steps;
6. zero the gradients and return the loss (averaged over micro-batches, and over ranks by ``reduce_mean``).

An optimizer the registry marks ``needs_closure`` (SAM, L-BFGS) gets ``step(closure)``: the closure's first call
returns the loss of steps 1–3 (their gradients are in place; :func:`optimlab.guard.replay_first`), each later
call zeroes the gradients and repeats steps 1 and 3 on the same micro-batches (SAM's second gradient, at the
perturbed weights; L-BFGS's further evaluations). The closure's loss is averaged over ranks (``reduce_mean``),
like the gradients, so an optimizer that reads it (L-BFGS's stopping tests and line search) takes the same
decisions, and runs as many evaluations (each with its all-reduce), on every rank.

Kept apart from the trainer so each rule can be tested on a small model (``tests/train/test_step.py``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from optimlab.guard import NonFiniteGuard, replay_first
from optimlab.optim.registry import needs_closure
from optimlab.schedules import step_scheduler

__all__ = ["StepPolicy", "StepOutcome"]


@dataclass(frozen=True)
class StepOutcome:
    """What one optimizer step did: the mean loss, the gradient norm before clipping, whether it was clipped,
    and whether the step was skipped (non-finite gradients)."""

    loss: float
    grad_norm: float
    clipped: bool
    skipped: bool


class StepPolicy:
    """One optimizer step over ``accum`` micro-batches (see the module docstring for the order of the rules).

    Args:
        optimizer: the optimizer (possibly a ``ZeroRedundancyOptimizer``).
        clipper: a clipper of :func:`optimlab.clip.make_clipper` over the model's parameters.
        accum: micro-batches per optimizer step (>= 1).
        guard: a :class:`NonFiniteGuard` of ``optimizer`` (or ``None``: every step is taken).
        scaler: an enabled ``torch.amp.GradScaler`` for fp16 (or ``None``).
        scheduler: the LR schedule, stepped once per optimizer step that was taken (or ``None``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, clipper: Any, *, accum: int = 1,
                 guard: NonFiniteGuard | None = None, scaler: torch.amp.GradScaler | None = None,
                 scheduler: Any = None) -> None:
        if not isinstance(accum, int) or accum < 1:
            raise ValueError(f"Invalid accum: {accum!r} (accepted range: an integer >= 1)")
        self.optimizer = optimizer
        self.clipper = clipper
        self.accum = accum
        self.guard = guard
        self.scaler = scaler
        self.scheduler = scheduler
        self.needs_closure = needs_closure(optimizer)
        if self.needs_closure and scaler is not None:
            raise ValueError(f"Invalid optimizer for fp16: {type(optimizer).__name__} steps with a closure, which "
                             "torch's GradScaler refuses (accepted: bf16 or fp32 with it)")

    def step(self, batches: Iterable[Any], loss_of: Callable[[Any], torch.Tensor], *,
             no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
             reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None) -> StepOutcome:
        """Run one optimizer step over ``batches`` (exactly ``accum`` of them).

        ``loss_of(batch)`` returns the micro-batch's mean loss (a scalar with a graph); ``no_sync()`` (DDP)
        wraps the non-final backward passes; ``reduce_mean`` averages the loss over ranks (the logged loss and
        the closure's).
        """
        batches = list(batches) if self.needs_closure else batches  # evaluated again at SAM's second pass
        mean = self._mean(self._accumulate(batches, loss_of, no_sync), reduce_mean)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.clipper.step()
        closure = None
        if self.needs_closure:  # first call: the loss and gradients above; later calls: zero, accumulate, clip again
            closure = replay_first(functools.partial(self._again, batches, loss_of, no_sync, reduce_mean), mean)
        if self.guard is not None:
            self.guard.step(closure)  # skips the step on inf/NaN gradients (through the GradScaler under fp16)
        elif self.scaler is not None:
            self.scaler.step(self.optimizer)
        else:
            self.optimizer.step(closure)
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        mean_loss = float(mean)
        skipped = self.guard is not None and self.guard.last_step_skipped
        if self.scheduler is not None and not skipped:
            step_scheduler(self.scheduler, metric=mean_loss)  # the loss is the metric of "plateau"
        return StepOutcome(loss=mean_loss, grad_norm=clip.norm, clipped=clip.clipped, skipped=skipped)

    def _accumulate(self, batches: Iterable[Any], loss_of: Callable[[Any], torch.Tensor],
                    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None) -> torch.Tensor:
        """Backward of loss_i / accum over the micro-batches (rule 1); returns the sum of their losses."""
        loss_sum: torch.Tensor | None = None
        count = 0
        for batch in batches:
            count += 1
            final = count == self.accum
            with contextlib.nullcontext() if final or no_sync is None else no_sync():
                loss = loss_of(batch)
                scaled = loss / self.accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            detached = loss.detach().float()
            loss_sum = detached if loss_sum is None else loss_sum + detached
        if count != self.accum or loss_sum is None:
            raise ValueError(f"Invalid batches: got {count} micro-batches for accum={self.accum}")
        return loss_sum

    def _again(self, batches: list[Any], loss_of: Callable[[Any], torch.Tensor],
               no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None,
               reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        """A closure's later evaluation: zero the gradients, accumulate and clip again; the mean loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = self._accumulate(batches, loss_of, no_sync)
        self.clipper.step()
        return self._mean(loss_sum, reduce_mean)

    def _mean(self, loss_sum: torch.Tensor, reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        """The mean loss over the micro-batches, and over the ranks when ``reduce_mean`` is given."""
        mean = loss_sum / self.accum
        return reduce_mean(mean) if reduce_mean is not None else mean
