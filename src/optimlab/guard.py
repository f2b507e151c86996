r"""Training-stability guards: skip optimizer steps on non-finite gradients, flag exploding gradient norms.

* :class:`NonFiniteGuard` wraps an optimizer's ``step``: when any gradient holds NaN or :math:`\pm\infty`
  the step is skipped (parameters and optimizer state stay bit-for-bit unchanged), counted, logged,
  and ``last_step_skipped`` says so — the question ``torch.amp.GradScaler`` leaves open (pytorch
  issues 44511 and 67590), answered for both plain and GradScaler training::

      guard = NonFiniteGuard(optimizer, scaler=scaler)   # scaler optional
      scaler.scale(loss).backward()
      guard.step()                                        # instead of scaler.step(optimizer)
      scaler.update()
      if not guard.last_step_skipped:
          scheduler.step()

  ``NonFiniteGuard(optimizer, check_update=True)`` also rolls back (bit for bit) and skips a step whose
  *update* made a parameter or optimizer state non-finite, although the gradients were finite.

* :func:`replay_first` wraps a closure so that its first call returns a loss already computed (the guard's
  own evaluation, or a training loop's) and only later calls evaluate it: SAM and L-BFGS step with it.

* :class:`ExplosionDetector` flags a step whose total gradient norm exceeds a fixed threshold or lies
  ``k`` standard deviations above its recent history, returning an :class:`ExplosionEvent`.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from optimlab.optim._dtensor import any_rank, local

__all__ = ["ExplosionDetector", "ExplosionEvent", "NonFiniteGradientError", "NonFiniteGuard", "nonfinite_grads",
           "nonfinite_update", "replay_first"]

logger = logging.getLogger(__name__)


class NonFiniteGradientError(RuntimeError):
    """Raised by :class:`NonFiniteGuard` when more than ``max_consecutive_skips`` steps in a row were skipped."""


def _grads(optimizer: torch.optim.Optimizer) -> list[tuple[int, int, Tensor]]:
    """``(group index, param index, gradient values)`` for every parameter of ``optimizer`` with a non-empty
    gradient (the stored values of a sparse gradient)."""
    located = []
    for group_index, group in enumerate(optimizer.param_groups):
        for param_index, param in enumerate(group["params"]):
            grad = param.grad
            if grad is None:
                continue
            values = grad.coalesce().values() if grad.is_sparse else grad
            if values.numel() > 0:
                located.append((group_index, param_index, values))
    return located


def _finite_flags(tensors: list[Tensor]) -> list[bool] | None:
    """``None`` when every tensor is finite, else one flag per tensor: one multi-tensor max-abs pass and a
    single device sync in the common all-finite case."""
    if not tensors:
        return None
    max_abs = torch._foreach_norm(tensors, math.inf) if all(t.device.type in ("cpu", "cuda") for t in tensors) else [
        torch.linalg.vector_norm(t, math.inf) for t in tensors]
    finite = torch.stack([m.to(tensors[0].device, torch.float32) for m in max_abs]).isfinite()
    return None if bool(finite.all()) else finite.tolist()


@torch.no_grad()
def nonfinite_grads(optimizer: torch.optim.Optimizer) -> list[tuple[int, int]]:
    """The ``(param group, index in group)`` of every gradient of ``optimizer`` holding a NaN or an infinity (of a
    sharded (DTensor) gradient, in this rank's shard)."""
    located = _grads(optimizer)
    flags = _finite_flags([local(grad) for _, _, grad in located])
    if flags is None:
        return []
    return [(group_index, param_index) for (group_index, param_index, _), ok in zip(located, flags) if not ok]


def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _floating(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point() and not value.is_sparse and value.numel() > 0


def _clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, Tensor) else copy.deepcopy(value)


class _Snapshot:
    """A bitwise copy of an optimizer's parameters, per-parameter state and param-group settings, restored in
    place (the same tensor objects: views, flat buffers and compiled graphs that hold them stay valid)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.params = [p.detach().clone() for p in _params(optimizer)]
        self.state = {p: {key: _clone(value) for key, value in optimizer.state[p].items()}
                      for p in _params(optimizer) if p in optimizer.state}
        self.groups = [{key: _clone(value) for key, value in group.items() if key != "params"}
                       for group in optimizer.param_groups]

    @torch.no_grad()
    def restore(self) -> None:
        for param, saved in zip(_params(self.optimizer), self.params):
            param.copy_(saved)
        for param in _params(self.optimizer):
            saved_state = self.state.get(param)
            if saved_state is None:
                self.optimizer.state.pop(param, None)  # the step created this state: forget it
                continue
            current = self.optimizer.state[param]
            for key in [k for k in current if k not in saved_state]:
                del current[key]
            for key, value in saved_state.items():
                _put(current, key, value)
        for group, saved_group in zip(self.optimizer.param_groups, self.groups):
            for key, value in saved_group.items():
                _put(group, key, value)


def _put(container: dict[str, Any], key: str, value: Any) -> None:
    """``container[key] = value``, copying into the existing tensor when shapes and dtypes agree."""
    current = container.get(key)
    if (isinstance(current, Tensor) and isinstance(value, Tensor) and current.shape == value.shape
            and current.dtype == value.dtype):
        current.copy_(value)
    else:
        container[key] = value


@torch.no_grad()
def nonfinite_update(optimizer: torch.optim.Optimizer) -> list[tuple[int, int, str]]:
    """``(param group, index in group, "param" or the state key)`` of every parameter and floating-point state
    tensor of ``optimizer`` holding a NaN or an infinity (what an optimizer step may have produced; of a sharded
    (DTensor) tensor, in this rank's shard)."""
    located = []
    for group_index, group in enumerate(optimizer.param_groups):
        for param_index, param in enumerate(group["params"]):
            located.append((group_index, param_index, "param", param))
            state = optimizer.state.get(param, {})
            located.extend((group_index, param_index, key, value) for key, value in state.items() if _floating(value))
    flags = _finite_flags([local(t.detach()) for *_, t in located])
    if flags is None:
        return []
    return [(g, i, key) for (g, i, key, _), ok in zip(located, flags) if not ok]


class NonFiniteGuard:
    r"""Skip the optimizer step whenever a gradient is non-finite; count, log and report the skips.

    ``step(closure)`` evaluates the closure (if any), then

    * if some gradient holds NaN/inf: does **not** call ``optimizer.step`` — parameters and every state
      tensor are untouched, bit for bit — increments ``skipped_steps`` and ``consecutive_skips``, sets
      ``last_step_skipped`` and logs a warning naming the parameters; after more than
      ``max_consecutive_skips`` skips in a row it raises :class:`NonFiniteGradientError`;
    * otherwise calls ``optimizer.step`` and resets ``consecutive_skips``.

    With a ``torch.amp.GradScaler`` the guard calls ``scaler.step(optimizer)`` (which unscales, and
    skips on inf/NaN itself) and learns whether the optimizer really stepped from a step post-hook,
    so ``last_step_skipped`` is exact there too; call ``scaler.update()`` afterwards as usual. A disabled
    scaler (``enabled=False``, e.g. bf16 or fp32 runs) is ignored and the guard checks the gradients itself.
    ``state_dict()`` holds the guard's counters only (save the optimizer's own state separately).

    ``check_update=True`` also catches finite gradients that overflow *inside* the update (Adafactor with a
    gradient of 1e20, SGD at lr 10 with a gradient of 1e38, Adam on fp16 parameters whose ``exp_avg_sq``
    overflows): before each step the parameters, the per-parameter state and the param-group settings are
    copied; after the step every parameter and floating-point state tensor is checked, and if one holds
    NaN/inf they are all restored bit for bit (in place) and the step counts as skipped like a non-finite
    gradient. Cost: one copy of parameters and state per step (memory and time; measured by
    ``benchmarks/guard_overhead.py``). Not covered: state the optimizer keeps outside ``optimizer.state``
    and the param groups (e.g. a wrapped inner optimizer's own state), non-float state, and values that are
    finite but wrong; a ``ZeroRedundancyOptimizer`` is checked on this rank's shard only.

    Sharded parameters (DTensors, e.g. under FSDP2's ``fully_shard``): each rank checks its shards, and the
    decision to skip (or roll back) is or-ed across the ranks (one all-reduce of a flag per step), so an inf in
    one rank's shard skips the step on every rank; every rank must call ``step``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_consecutive_skips: int | None = 10,
                 scaler: torch.amp.GradScaler | None = None, log: bool = True, check_update: bool = False) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if max_consecutive_skips is not None and (
                not isinstance(max_consecutive_skips, int) or max_consecutive_skips < 0):
            raise ValueError(f"Invalid max_consecutive_skips: {max_consecutive_skips} "
                             "(accepted range: an int >= 0, or None for no limit)")
        self.optimizer = optimizer
        self.max_consecutive_skips = max_consecutive_skips
        self.scaler = scaler
        self.log = log
        self.check_update = bool(check_update)
        self.steps = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.last_step_skipped = False
        self._optimizer_stepped = False
        self._hook = optimizer.register_step_post_hook(self._mark_stepped)

    def _mark_stepped(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._optimizer_stepped = True

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One guarded optimizer step; returns the closure's loss (or ``None``)."""
        self._optimizer_stepped = False
        loss = None
        bad: list[tuple[int, int]] = []
        where = ""
        snapshot = _Snapshot(self.optimizer) if self.check_update else None
        if self.scaler is not None and self.scaler.is_enabled():
            if closure is not None:
                raise ValueError("closure is not supported together with a GradScaler (torch's GradScaler refuses it)")
            self.scaler.step(self.optimizer)
        else:
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            bad = nonfinite_grads(self.optimizer)
            if not any_rank(bool(bad), _params(self.optimizer)):
                self.optimizer.step(None if closure is None else replay_first(closure, loss))
            elif not bad:
                where = "non-finite gradient in another rank's shard"
        if snapshot is not None and self._optimizer_stepped:
            overflowed = nonfinite_update(self.optimizer)
            if any_rank(bool(overflowed), _params(self.optimizer)):
                snapshot.restore()
                self._optimizer_stepped = False
                where = "non-finite update: " + (", ".join(f"group {g} param {i} {key}" for g, i, key in overflowed[:4])
                                                 or "in another rank's shard")
        self.steps += 1
        self._record(skipped=not self._optimizer_stepped, bad=bad, where=where)
        return loss

    def _record(self, skipped: bool, bad: list[tuple[int, int]], where: str = "") -> None:
        self.last_step_skipped = skipped
        if not skipped:
            self.consecutive_skips = 0
            return
        self.skipped_steps += 1
        self.consecutive_skips += 1
        where = where or (", ".join(f"group {g} param {i}" for g, i in bad) if bad else "found by the GradScaler")
        if self.log:
            logger.warning("non-finite gradient or update at step %d (%s): step skipped (%d skipped so far)",
                           self.steps, where, self.skipped_steps)
        if self.max_consecutive_skips is not None and self.consecutive_skips > self.max_consecutive_skips:
            raise NonFiniteGradientError(
                f"{self.consecutive_skips} optimizer steps in a row had non-finite gradients or updates "
                f"(last: {where}); "
                f"max_consecutive_skips={self.max_consecutive_skips}. The model or the learning rate is likely "
                "diverging: lower the LR, clip gradients, or check the data.")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``optimizer.zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's param groups."""
        return self.optimizer.param_groups

    def state_dict(self) -> dict[str, Any]:
        """The guard's counters (not the optimizer's state)."""
        return {"steps": self.steps, "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                "last_step_skipped": self.last_step_skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the counters saved by :meth:`state_dict`."""
        self.steps = int(state_dict["steps"])
        self.skipped_steps = int(state_dict["skipped_steps"])
        self.consecutive_skips = int(state_dict["consecutive_skips"])
        self.last_step_skipped = bool(state_dict["last_step_skipped"])

    def remove(self) -> None:
        """Detach the guard's hook from the optimizer."""
        self._hook.remove()

    def __repr__(self) -> str:
        return (f"NonFiniteGuard({type(self.optimizer).__name__}, steps={self.steps}, "
                f"skipped_steps={self.skipped_steps}, max_consecutive_skips={self.max_consecutive_skips})")


def replay_first(closure: Callable[[], Any], first_loss: Any) -> Callable[[], Any]:
    """A closure whose first call returns ``first_loss`` without evaluating anything, and whose later calls
    evaluate ``closure``.

    For a caller that has already run the forward and backward pass once before stepping: the guard (to
    check the gradients for NaN/inf before it lets the optimizer step) and the trainer's step policy (which
    accumulates, unscales and clips before the step). An optimizer stepped with a closure (SAM, L-BFGS) calls
    it first for the loss and gradients at the current weights: those are already in place, so the first
    call hands back ``first_loss`` instead of a second forward and backward (which would cost a pass and, for
    a stateful clipper or dropout, change the result); SAM's second call (at the perturbed weights) and
    L-BFGS's further evaluations run ``closure``. Each returned closure counts its own calls.

    Args:
        closure: evaluates the loss again (zeroes the gradients, forward, backward; returns the loss).
        first_loss: the loss of the evaluation already done, returned by the first call.
    """
    calls = 0

    def replay() -> Any:
        nonlocal calls
        calls += 1
        return first_loss if calls == 1 else closure()

    return replay


@dataclass(frozen=True)
class ExplosionEvent:
    """One flagged step: ``reason`` is ``"non-finite"``, ``"threshold"`` or ``"sigma"``; ``mean``/``std``
    describe the history the norm was compared with (``None`` before ``min_history`` norms); ``z_score`` is
    :math:`(n - \\mu)/\\sigma` when defined."""

    step: int
    norm: float
    reason: str
    threshold: float | None
    mean: float | None
    std: float | None
    z_score: float | None

    def as_dict(self) -> dict[str, Any]:
        """The event as a plain dict (for JSON logs)."""
        return asdict(self)


class ExplosionDetector:
    r"""Flag gradient-norm explosions: a fixed ceiling and/or a k-sigma rule over a window of recent norms.

    For each observed total gradient norm :math:`n_t` (``update(norm)``), with :math:`\mu, \sigma` the
    mean and (population) standard deviation of the last ``window`` *unflagged* finite norms:

    .. math:: \text{flag}_t = \lnot\operatorname{finite}(n_t) \;\lor\; n_t > \text{threshold}
        \;\lor\; \big(|\mathcal H| \ge \text{min\_history} \land n_t > \mu + k\sigma\big)

    Flagged norms are kept out of the history, so a sustained explosion keeps being reported instead
    of becoming the new normal. Returns an :class:`ExplosionEvent` (also logged as a warning when
    ``log``) or ``None``. Generalises the classic fixed-threshold check (e.g. Pascanu et al. 2013's
    observation that gradient norms spike at cliffs of the loss surface).
    """

    def __init__(self, threshold: float | None = None, k_sigma: float | None = 6.0, window: int = 100,
                 min_history: int = 10, log: bool = True) -> None:
        if threshold is None and k_sigma is None:
            raise ValueError("Invalid ExplosionDetector: give a threshold, a k_sigma, or both")
        if threshold is not None and not (float(threshold) > 0.0):
            raise ValueError(f"Invalid threshold: {threshold} (accepted range: > 0, or None)")
        if k_sigma is not None and not (float(k_sigma) > 0.0):
            raise ValueError(f"Invalid k_sigma: {k_sigma} (accepted range: > 0, or None)")
        if not isinstance(window, int) or window < 2:
            raise ValueError(f"Invalid window: {window} (accepted range: an int >= 2)")
        if not isinstance(min_history, int) or not (2 <= min_history <= window):
            raise ValueError(f"Invalid min_history: {min_history} (accepted range: an int in [2, window={window}])")
        self.threshold = None if threshold is None else float(threshold)
        self.k_sigma = None if k_sigma is None else float(k_sigma)
        self.window = window
        self.min_history = min_history
        self.log = log
        self.steps = 0
        self.history: deque[float] = deque(maxlen=window)
        self.events: list[ExplosionEvent] = []

    def update(self, norm: float | Tensor) -> ExplosionEvent | None:
        """Observe one step's total gradient norm; return an event if it is flagged."""
        norm = float(norm)
        self.steps += 1
        mean = std = z_score = None
        if len(self.history) >= self.min_history:
            values = np.asarray(self.history, dtype=np.float64)
            mean, std = float(values.mean()), float(values.std())
            z_score = (norm - mean) / std if std > 0 and math.isfinite(norm) else None
        reason = None
        if not math.isfinite(norm):
            reason = "non-finite"
        elif self.threshold is not None and norm > self.threshold:
            reason = "threshold"
        elif self.k_sigma is not None and mean is not None and norm > mean + self.k_sigma * std:
            reason = "sigma"
        if reason is None:
            self.history.append(norm)
            return None
        event = ExplosionEvent(self.steps, norm, reason, self.threshold, mean, std, z_score)
        self.events.append(event)
        if self.log:
            logger.warning("gradient explosion at step %d: norm %.4g (%s; mean %s, std %s)", event.step, norm, reason,
                           "n/a" if mean is None else f"{mean:.4g}", "n/a" if std is None else f"{std:.4g}")
        return event

    def check_parameters(self, parameters: Iterable[Tensor]) -> ExplosionEvent | None:
        """:meth:`update` with the total L2 norm of the gradients of ``parameters`` (e.g. ``model.parameters()``)."""
        from optimlab.clip import total_grad_norm

        return self.update(total_grad_norm([p.grad for p in parameters if p.grad is not None]))

    def state_dict(self) -> dict[str, Any]:
        """Settings, step count, the history window and the events so far (plain Python values)."""
        return {"threshold": self.threshold, "k_sigma": self.k_sigma, "window": self.window,
                "min_history": self.min_history, "steps": self.steps, "history": list(self.history),
                "events": [event.as_dict() for event in self.events]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.threshold = state_dict["threshold"]
        self.k_sigma = state_dict["k_sigma"]
        self.window = int(state_dict["window"])
        self.min_history = int(state_dict["min_history"])
        self.steps = int(state_dict["steps"])
        self.history = deque((float(n) for n in state_dict["history"]), maxlen=self.window)
        self.events = [ExplosionEvent(**event) for event in state_dict["events"]]
