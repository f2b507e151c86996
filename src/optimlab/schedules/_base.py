"""Shared machinery for optimlab's learning-rate schedules.

Every schedule subclasses :class:`Schedule`, itself a :class:`torch.optim.lr_scheduler.LRScheduler`, so it
works with any optimizer (optimlab's or torch's) and with code that expects torch's scheduler API
(``step()``, ``get_last_lr()``, ``state_dict()``, ``load_state_dict()``, ``last_epoch``, ``base_lrs``).

A subclass supplies:

* ``lr_at(step)``: the closed form, from ``base_lrs``, where one exists; and
* for the *chainable* schedules (the same ones as in torch: Multiplicative, Step, MultiStep, Constant,
  Linear, Exponential, Polynomial, CosineAnnealing), ``get_lr()``, which updates the optimizer's current
  ``group["lr"]`` so that several schedules can act on one optimizer (:class:`ChainedScheduler`). The
  others step with the closed form.

What the base adds over torch's class:

* every write into a param group goes through :func:`set_group_value`, which updates a tensor ``lr``
  (or tensor ``beta1``) in place with ``fill_``, so a ``torch.compile``'d optimizer step is not recompiled;
* ``load_state_dict`` also puts the restored learning rates (and cycled momentum) back into the optimizer,
  so resuming is exact whatever order the optimizer and the scheduler are rebuilt and loaded in;
* state dicts hold only plain Python values and tensors (no functions, no ``Counter``), so they load with
  ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import EPOCH_DEPRECATION_WARNING, LRScheduler

from optimlab import _compat

__all__ = [
    "Schedule",
    "MomentumCycler",
    "lambdas_per_group",
    "current_values",
    "set_group_value",
    "per_group",
    "check_positive_int",
    "check_non_negative_int",
    "check_factor",
    "check_choice",
    "has_closed_form",
    "warn_if_optimizer_not_stepped",
]


def set_group_value(group: dict[str, Any], key: str, value: float | Tensor) -> None:
    """Set ``group[key] = value`` keeping the entry's type: a tensor entry is updated in place (``fill_``)
    instead of replaced, a float entry stays a float."""
    current = group[key]
    if isinstance(current, Tensor):
        current.fill_(value.item() if isinstance(value, Tensor) else value)
    else:
        group[key] = value.item() if isinstance(value, Tensor) else value


def current_values(optimizer: Optimizer, key: str) -> list[Any]:
    """``[group[key] for each param group]``, with tensors cloned so the result never aliases the optimizer."""
    return [g[key].clone() if isinstance(g[key], Tensor) else g[key] for g in optimizer.param_groups]


def per_group(name: str, optimizer: Optimizer, value: Any) -> list[Any]:
    """Broadcast a scalar to one value per param group, or check that a list/tuple has one per group."""
    groups = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != groups:
            raise ValueError(f"{name} must have one value per param group: got {len(value)}, "
                             f"the optimizer has {groups} param groups")
        values = list(value)
    else:
        values = [value] * groups
    return [v.clone() if isinstance(v, Tensor) else v for v in values]


def check_positive_int(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (accepted: an integer >= 1)")


def check_non_negative_int(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (accepted: an integer >= 0)")


def check_factor(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``low <= value <= high`` (``low < value`` if ``low_open``)."""
    ok = (low < value if low_open else low <= value) and value <= high and math.isfinite(value)
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"Invalid {name}: {value!r} (accepted range: {bracket}{low}, {high}])")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"Unknown {name}: {value!r} (accepted: {', '.join(repr(c) for c in choices)})")


def warn_if_optimizer_not_stepped(optimizer: Optimizer) -> None:
    """torch's warnings at a scheduler's first ``step()``: ``optimizer.step()`` was replaced after the scheduler
    was built, or has not been called yet (torch's ``LRScheduler.__init__`` records the calls; read through
    :func:`optimlab._compat.optimizer_step_called`)."""
    called = _compat.optimizer_step_called(optimizer)
    if called is None:
        warnings.warn("Seems like `optimizer.step()` has been overridden after learning rate scheduler "
                      "initialization. Please, make sure to call `optimizer.step()` before "
                      "`lr_scheduler.step()`. See more details at "
                      "https://pytorch.org/docs/stable/optim.html#how-to-adjust-learning-rate", UserWarning,
                      stacklevel=3)
    elif not called:
        warnings.warn("Detected call of `lr_scheduler.step()` before `optimizer.step()`. In PyTorch 1.1.0 and "
                      "later, you should call them in the opposite order: `optimizer.step()` before "
                      "`lr_scheduler.step()`.  Failure to do this will result in PyTorch skipping the first value "
                      "of the learning rate schedule. See more details at "
                      "https://pytorch.org/docs/stable/optim.html#how-to-adjust-learning-rate", UserWarning,
                      stacklevel=3)


def has_closed_form(scheduler: LRScheduler) -> bool:
    """True when ``scheduler.lr_at(step)`` is available (an optimlab schedule with a closed form)."""
    return isinstance(scheduler, Schedule) and scheduler.closed_form


class Schedule(LRScheduler):
    """Base class of optimlab's schedules: torch's ``LRScheduler`` with in-place tensor updates,
    exact resume, and a closed form ``lr_at(step)``.

    The learning rate at step ``t`` (``t = last_epoch``, 0 right after construction, +1 per ``step()``)
    is ``lr_at(t)[i]`` for param group ``i`` when the schedule has a closed form.
    """

    #: True where torch's class has a closed form (``_get_closed_form_lr``): the deprecated ``step(epoch)`` and
    #: a :class:`SequentialLR` restart at a milestone then use ``lr_at(epoch)``; otherwise ``get_lr()`` at
    #: ``last_epoch = epoch`` (for a chainable schedule: from the optimizer's current rates).
    _torch_closed_form: bool = False
    #: True when ``lr_at`` is implemented.
    closed_form: bool = True
    #: Attributes holding user callables: saved as their ``__dict__`` (callable objects) or not at all.
    _callable_attrs: tuple[str, ...] = ()
    _is_initial: bool = False

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(last_epoch, bool) or not isinstance(last_epoch, int) or last_epoch < -1:
            raise ValueError(f"Invalid last_epoch: {last_epoch!r} (accepted: -1 for a fresh start, or a step >= 0)")
        super().__init__(optimizer, last_epoch)
        if not _compat.scheduler_calls_initial_step():  # torch's constructor did not call our _initial_step
            self._initial_step()

    # ----------------------------------------------------------------------------------------------
    # stepping
    def _initial_step(self) -> None:
        """Set the learning rates for step 0 (called by the constructor)."""
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def step(self, epoch: int | None = None) -> None:  # type: ignore[override]
        """Advance one step: ``last_epoch += 1`` and write ``get_lr()`` into the optimizer (in place for tensors).

        ``epoch`` (deprecated in torch, accepted with torch's warning and semantics): jump to ``last_epoch =
        epoch`` instead, with the closed form where torch's class has one (see ``_torch_closed_form``).
        Like torch, the first call warns when ``optimizer.step()`` has not run yet.
        """
        if self._step_count == 1:
            warn_if_optimizer_not_stepped(self.optimizer)
        self._step_count += 1
        if epoch is None:
            self.last_epoch += 1
            self._write_lrs(self.get_lr())
        else:
            warnings.warn(EPOCH_DEPRECATION_WARNING, UserWarning, stacklevel=2)
            self._jump_to(epoch)

    def _jump_to(self, epoch: int) -> None:
        if self._torch_closed_form:
            self._check_step(epoch)
        self.last_epoch = epoch
        self._write_lrs(self.lr_at(epoch) if self._torch_closed_form else self.get_lr())

    def _restart(self) -> None:
        """Jump to step 0 of this schedule (used by :class:`SequentialLR` at a milestone): ``lr_at(0)`` where
        torch's class has a closed form, else ``get_lr()`` at step 0 (as torch's ``_update_lr(0)``)."""
        self._jump_to(0)

    def _write_lrs(self, values: Sequence[float | Tensor]) -> None:
        groups = self.optimizer.param_groups
        if len(values) != len(groups):
            raise RuntimeError(f"{type(self).__name__} computed {len(values)} learning rates for "
                               f"{len(groups)} param groups (was a param group added after the scheduler?)")
        for group, value in zip(groups, values):
            set_group_value(group, "lr", value)
        self._last_lr = current_values(self.optimizer, "lr")

    def get_lr(self) -> list[float | Tensor]:
        """The learning rates of every param group at ``self.last_epoch``.

        By default the closed form ``lr_at(last_epoch)``; chainable schedules override this with an update of
        the optimizer's current learning rates.
        """
        return list(self.lr_at(self.last_epoch))

    # ----------------------------------------------------------------------------------------------
    # closed form
    def lr_at(self, step: int) -> list[float]:
        """The learning rate of each param group after ``step`` calls to ``step()`` (closed form)."""
        raise NotImplementedError(f"{type(self).__name__} has no closed form: its learning rate depends on "
                                  "the run (use step() and get_last_lr())")

    def _float_base_lrs(self) -> list[float]:
        return [float(b) for b in self.base_lrs]

    @staticmethod
    def _check_step(step: int) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"Invalid step: {step!r} (accepted: an integer >= 0)")

    # ----------------------------------------------------------------------------------------------
    # state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: all attributes except the optimizer; user callables are saved as
        their ``__dict__`` when they are callable objects, and as ``None`` when they are plain functions."""
        state = {k: v for k, v in self.__dict__.items() if k != "optimizer" and k not in self._callable_attrs}
        for attr in self._callable_attrs:
            fns = getattr(self, attr)
            many = isinstance(fns, list)
            saved = [None if isinstance(fn, types.FunctionType) or not hasattr(fn, "__dict__") else dict(fn.__dict__)
                     for fn in (fns if many else [fns])]
            state[attr] = saved if many else saved[0]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` and put its learning rates back into the optimizer."""
        self._load_state(state_dict)
        self._restore_optimizer()

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        state = {k: v for k, v in state_dict.items() if k not in self._callable_attrs}
        self.__dict__.update(state)
        for attr in self._callable_attrs:
            saved = state_dict.get(attr)
            fns = getattr(self, attr)
            many = isinstance(fns, list)
            for fn, fn_state in zip(fns if many else [fns], saved if many else [saved]):
                if fn_state is not None and fn is not None:
                    fn.__dict__.update(fn_state)

    def _restore_optimizer(self) -> None:
        """Write the last computed values back into the optimizer's param groups."""
        for group, value in zip(self.optimizer.param_groups, self._last_lr):
            set_group_value(group, "lr", value)


class MomentumCycler:
    """Momentum (SGD) or beta1 (Adam-like) cycled inversely to the learning rate, shared by CyclicLR and OneCycleLR.

    At construction the optimizer's momentum (or ``betas[0]``) is set to ``max_momentum``; each step writes
    the value the schedule computes. The last written values are kept so a resume can restore them. The bounds
    are not range-checked (torch does not check them either: e.g. a beta1 above 1 is the user's choice).
    """

    def _setup_momentum(self, optimizer: Optimizer, cycle_momentum: bool, base_momentum: Any,
                        max_momentum: Any, fresh: bool) -> None:
        self.cycle_momentum = bool(cycle_momentum)
        self._last_momentum: list[float] | None = None
        if not self.cycle_momentum:
            return
        if "momentum" not in optimizer.defaults and "betas" not in optimizer.defaults:
            raise ValueError(f"cycle_momentum=True needs an optimizer with 'momentum' or 'betas' "
                             f"({type(optimizer).__name__} has neither); pass cycle_momentum=False")
        self.use_beta1 = "betas" in optimizer.defaults
        self.base_momentums = [float(m) for m in per_group("base_momentum", optimizer, base_momentum)]
        self.max_momentums = [float(m) for m in per_group("max_momentum", optimizer, max_momentum)]
        if fresh:
            for group, low, high in zip(optimizer.param_groups, self.base_momentums, self.max_momentums):
                group["max_momentum"], group["base_momentum"] = high, low
            self._write_momentum(self.max_momentums)

    def _write_momentum(self, values: Sequence[float]) -> None:
        for group, value in zip(self.optimizer.param_groups, values):  # type: ignore[attr-defined]
            if self.use_beta1:
                beta1 = group["betas"][0]
                if isinstance(beta1, Tensor):
                    beta1.fill_(value)
                else:
                    group["betas"] = (value, *group["betas"][1:])
            else:
                set_group_value(group, "momentum", value)
        self._last_momentum = [float(v) for v in values]

    def _values_at(self, step: int) -> tuple[list[Any], list[float]]:
        """``(learning rates, momenta)`` of every param group at ``step`` (subclasses implement)."""
        raise NotImplementedError

    def get_lr(self) -> list[float | Tensor]:
        """The rates at ``last_epoch``; with ``cycle_momentum`` also writes the momenta into the optimizer."""
        lrs, momenta = self._values_at(self.last_epoch)  # type: ignore[attr-defined]
        if self.cycle_momentum:
            self._write_momentum(momenta)
        return list(lrs)

    def lr_at(self, step: int) -> list[float]:
        """The learning rate of each param group at ``step`` (the class docstring gives the formula)."""
        Schedule._check_step(step)
        return [float(v) for v in self._values_at(step)[0]]

    def momentum_at(self, step: int) -> list[float]:
        """The cycled momentum (or beta1) of each param group at ``step`` (needs ``cycle_momentum=True``)."""
        Schedule._check_step(step)
        if not self.cycle_momentum:
            raise ValueError("momentum_at needs cycle_momentum=True")
        return self._values_at(step)[1]

    def _restore_optimizer(self) -> None:
        super()._restore_optimizer()  # type: ignore[misc]
        if self.cycle_momentum and self._last_momentum is not None:
            self._write_momentum(self._last_momentum)


def lambdas_per_group(optimizer: Optimizer, lr_lambda: Callable[[int], float] | Sequence[Callable[[int], float]]
                      ) -> list[Callable[[int], float]]:
    """One callable per param group (a single one is shared); each must be callable."""
    fns = per_group("lr_lambda", optimizer, list(lr_lambda) if isinstance(lr_lambda, tuple) else lr_lambda)
    for fn in fns:
        if not callable(fn):
            raise TypeError(f"lr_lambda must be callable, got {type(fn).__name__}")
    return fns

