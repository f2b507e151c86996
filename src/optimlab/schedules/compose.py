"""Composing schedules: one after another (:class:`SequentialLR`), all at once (:class:`ChainedScheduler`),
and a linear warmup in front of any schedule (:func:`with_warmup`)."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from optimlab.schedules._base import Schedule, check_positive_int, current_values, set_group_value
from optimlab.schedules.basic import LinearLR
from optimlab.schedules.plateau import ReduceLROnPlateau

__all__ = ["SequentialLR", "ChainedScheduler", "with_warmup"]


def _check_children(kind: str, optimizer: Optimizer, schedulers: Sequence[Any]) -> None:
    if len(schedulers) < 1:
        raise ValueError(f"{kind} needs at least one scheduler, got none")
    for index, scheduler in enumerate(schedulers):
        if not isinstance(scheduler, LRScheduler):
            raise TypeError(f"{kind}: schedulers[{index}] is a {type(scheduler).__name__}, not an LRScheduler")
        if isinstance(scheduler, ReduceLROnPlateau) or type(scheduler).__name__ == "ReduceLROnPlateau":
            raise ValueError(f"{kind} cannot contain ReduceLROnPlateau (schedulers[{index}]): it steps on a "
                             "metric, not on a count; step it separately")
        if scheduler.optimizer is not optimizer:
            raise ValueError(f"{kind}: schedulers[{index}] ({type(scheduler).__name__}) belongs to another "
                             "optimizer; all schedulers must share one optimizer")


def _load_child(scheduler: LRScheduler, state: dict[str, Any]) -> None:
    """Load a child's state without letting it write into the optimizer (the parent decides what to restore)."""
    if isinstance(scheduler, Schedule):
        scheduler._load_state(state)
    else:
        scheduler.load_state_dict(state)


class _ParentSchedule(Schedule):
    """A schedule that drives child schedulers (``self._schedulers``); its state nests theirs."""

    _schedulers: list[LRScheduler]

    def state_dict(self) -> dict[str, Any]:
        """This schedule's counters plus each child's ``state_dict()`` under ``"_schedulers"``."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_schedulers")}
        state["_schedulers"] = [s.state_dict() for s in self._schedulers]
        return state

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update({k: v for k, v in state_dict.items() if k != "_schedulers"})
        for scheduler, state in zip(self._schedulers, state_dict["_schedulers"]):
            _load_child(scheduler, state)


def _undo_initial_step(scheduler: LRScheduler) -> None:
    """``last_epoch -= 1`` on ``scheduler`` and, for a composite one, recursively on its children."""
    scheduler.last_epoch -= 1
    for child in getattr(scheduler, "_schedulers", ()):
        _undo_initial_step(child)


class SequentialLR(_ParentSchedule):
    r"""Run ``schedulers[0]`` until ``milestones[0]``, then ``schedulers[1]`` restarted from its step 0, ...:

    ``η_t = S_k.lr_at(t − m_{k−1})`` where ``k = #\{m_j ≤ t\}`` (``m_{−1} = 0``).

    Same construction and sequence as torch's (the later schedulers' own initial steps are undone; at a
    milestone the next one restarts at its step 0). Children must be optimlab schedules; a composite one
    (ChainedScheduler, SequentialLR) only as the first stage, since it cannot restart. ``lr_at`` exists when
    every child has a closed form.
    """

    def __init__(self, optimizer: Optimizer, schedulers: Sequence[Schedule], milestones: Sequence[int],
                 last_epoch: int = -1) -> None:
        _check_children("SequentialLR", optimizer, schedulers)
        for index, scheduler in enumerate(schedulers):
            if not isinstance(scheduler, Schedule):
                raise TypeError(f"SequentialLR: schedulers[{index}] is {type(scheduler).__name__}; use the "
                                "optimlab.schedules class of the same name")
            if index > 0 and isinstance(scheduler, _ParentSchedule):
                raise ValueError(f"SequentialLR: schedulers[{index}] is a {type(scheduler).__name__}, which cannot "
                                 "be restarted at a milestone (torch fails there with NotImplementedError): it is "
                                 "accepted only as the first stage; flatten it into this SequentialLR's stages")
        milestones = list(milestones)
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(f"SequentialLR needs one milestone fewer than schedulers: got {len(schedulers)} "
                             f"schedulers and {len(milestones)} milestones")
        for m in milestones:
            check_positive_int("milestone", m)
        if any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise ValueError(f"SequentialLR milestones must be strictly increasing, got {milestones}")
        self.optimizer = optimizer
        self._schedulers = list(schedulers)
        self._milestones = milestones
        self.last_epoch = last_epoch + 1
        self._step_count = 0
        for group in optimizer.param_groups:
            set_group_value(group, "lr", group["initial_lr"])
        self.base_lrs = current_values(optimizer, "initial_lr")
        for scheduler in self._schedulers:  # undo each child's own initial step (a parent's too, and its children's)
            _undo_initial_step(scheduler)
        first = self._schedulers[bisect_right(milestones, 0)]
        first._initial_step()
        self._last_lr = first.get_last_lr()
        self.closed_form = all(s.closed_form for s in self._schedulers)

    def _active(self, step: int) -> tuple[Schedule, int]:
        index = bisect_right(self._milestones, step)
        return self._schedulers[index], step - (self._milestones[index - 1] if index > 0 else 0)

    def step(self) -> None:  # type: ignore[override]
        """Step the active scheduler, or restart the next one at its milestone."""
        self._step_count += 1
        self.last_epoch += 1
        scheduler, local_step = self._active(self.last_epoch)
        if local_step == 0 and self.last_epoch > 0:
            scheduler._restart()
        else:
            scheduler.step()
        self._last_lr = scheduler.get_last_lr()

    def lr_at(self, step: int) -> list[float]:
        """The active child's closed form at the step counted from its milestone."""
        self._check_step(step)
        scheduler, local_step = self._active(step)
        return scheduler.lr_at(local_step)

    def _restore_optimizer(self) -> None:
        self._active(max(self.last_epoch, 0))[0]._restore_optimizer()
        super()._restore_optimizer()


class ChainedScheduler(_ParentSchedule):
    r"""Step several schedulers on one optimizer at every step, in order; with chainable schedulers the
    multipliers compose (e.g. ``ExponentialLR`` × ``StepLR``: ``η_t = η₀ · γ₁^t · γ₂^{⌊t/s⌋}``).

    No closed form in general (the children read each other's output), so ``lr_at`` is not available.
    """

    closed_form = False

    def __init__(self, schedulers: Sequence[LRScheduler], optimizer: Optimizer | None = None) -> None:
        if len(schedulers) < 1:
            raise ValueError("ChainedScheduler needs at least one scheduler, got none")
        optimizer = optimizer or schedulers[0].optimizer
        _check_children("ChainedScheduler", optimizer, schedulers)
        self.optimizer = optimizer
        self._schedulers = list(schedulers)
        self.last_epoch = 0
        self._step_count = 0
        self.base_lrs = current_values(optimizer, "initial_lr")
        self._last_lr = current_values(optimizer, "lr")

    def step(self) -> None:  # type: ignore[override]
        """Step every child scheduler once, in order."""
        self._step_count += 1
        self.last_epoch += 1
        for scheduler in self._schedulers:
            scheduler.step()
        self._last_lr = current_values(self.optimizer, "lr")

    def _restore_optimizer(self) -> None:
        for scheduler in self._schedulers:
            if isinstance(scheduler, Schedule):
                scheduler._restore_optimizer()
        super()._restore_optimizer()


def with_warmup(scheduler: Schedule, warmup_steps: int, start_factor: float = 0.01) -> SequentialLR:
    r"""Put a linear warmup in front of ``scheduler``: for ``t < W`` the rate goes linearly from
    ``start_factor · η₀`` towards ``η₀`` (``η_t = η₀(s + (1 − s) t/W)``), then ``scheduler`` runs from its own
    step 0 (its step ``k`` happens at overall step ``W + k``). Returns a :class:`SequentialLR`.

    Example:
        >>> sched = with_warmup(CosineAnnealingLR(opt, T_max=900), warmup_steps=100)  # 1000 steps in all
    """
    if not isinstance(scheduler, Schedule):
        raise TypeError(f"with_warmup needs an optimlab schedule, got {type(scheduler).__name__}")
    if isinstance(scheduler, ReduceLROnPlateau):
        raise ValueError("with_warmup cannot wrap ReduceLROnPlateau (it steps on a metric); warm up with "
                         "LinearLR and step the plateau scheduler separately")
    check_positive_int("warmup_steps", warmup_steps)
    warmup = LinearLR(scheduler.optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(scheduler.optimizer, [warmup, scheduler], milestones=[warmup_steps])
