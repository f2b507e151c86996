"""Schedules by name, with defaults derived from the run length (``total_steps``).

``create_scheduler("warmup-cosine", optimizer, total_steps=1000)`` builds a schedule meant to be stepped once
per optimizer step for ``total_steps`` steps. Explicit keyword arguments override the defaults below; an
unknown name or keyword raises ``ValueError`` naming the valid ones. ``"plateau"`` is stepped with the
monitored metric: use :func:`step_scheduler` to step any of them uniformly.

Defaults (``T = total_steps``, ``η`` = each param group's current learning rate, ``W`` = 5 % of ``T``
rounded, at least 1 and at most ``T − 1``):

==================  ==============================================================================
name                class and defaults
==================  ==============================================================================
constant            ConstantLR(factor=1.0, total_iters=T): the learning rate as given
step                StepLR(step_size=max(1, T // 3), gamma=0.1)
multistep           MultiStepLR(milestones=[T // 2, 3T // 4], gamma=0.1)
exponential         ExponentialLR(gamma=0.01 ** (1 / T)): 1 % of η after T steps
linear              LinearLR(start_factor=1.0, end_factor=0.0, total_iters=T): linear decay to 0
polynomial          PolynomialLR(total_iters=T, power=0.9): the "poly" schedule
cosine              CosineAnnealingLR(T_max=T, eta_min=0)
cosine-restarts     CosineAnnealingWarmRestarts(T_0=max(1, T // 4), T_mult=1): four cycles
warmup-cosine       WarmupCosineLR(warmup_steps=W, total_steps=T, start_factor=0.01,
                    eta_min=0.1 η)
wsd                 WarmupStableDecayLR(warmup_steps=W, decay_steps=max(1, round(0.2 T)),
                    total_steps=T, start_factor=0.01, eta_min=0, decay_shape="1-sqrt")
onecycle            OneCycleLR(max_lr=η, total_steps=T, cycle_momentum=False)
cyclic              CyclicLR(base_lr=0.1 η, max_lr=η, step_size_up=max(1, T // 8), cycle_momentum=False):
                    four triangular cycles
plateau             ReduceLROnPlateau(factor=0.5, patience=max(1, T // 20))
==================  ==============================================================================

Momentum cycling is off by default for ``onecycle`` and ``cyclic`` so that a name never changes the
optimizer's momentum behind the caller's back; pass ``cycle_momentum=True`` to turn it on.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from optimlab.schedules.basic import ConstantLR, ExponentialLR, LinearLR, MultiStepLR, PolynomialLR, StepLR
from optimlab.schedules.cosine import CosineAnnealingLR, CosineAnnealingWarmRestarts
from optimlab.schedules.cyclic import CyclicLR
from optimlab.schedules.onecycle import OneCycleLR
from optimlab.schedules.plateau import ReduceLROnPlateau
from optimlab.schedules.warmup import WarmupCosineLR, WarmupStableDecayLR

__all__ = ["ScheduleSpec", "create_scheduler", "list_schedules", "get_schedule_spec", "step_scheduler",
           "needs_metric"]


def _group_lrs(optimizer: Optimizer) -> list[float]:
    return [float(group["lr"]) for group in optimizer.param_groups]


def _warmup(total: int) -> int:
    """5 % of the run, at least one step, and shorter than the run."""
    return min(max(1, round(0.05 * total)), total - 1)


@dataclass(frozen=True)
class ScheduleSpec:
    """One registry entry: a class and a function ``(optimizer, total_steps) -> default kwargs``."""

    name: str
    cls: type[LRScheduler]
    defaults: Callable[[Optimizer, int], dict[str, Any]]
    description: str


_SPECS: dict[str, ScheduleSpec] = {spec.name: spec for spec in [
    ScheduleSpec("constant", ConstantLR, lambda opt, t: {"factor": 1.0, "total_iters": t},
                 "constant learning rate"),
    ScheduleSpec("step", StepLR, lambda opt, t: {"step_size": max(1, t // 3), "gamma": 0.1},
                 "divide by 10 every third of the run"),
    ScheduleSpec("multistep", MultiStepLR, lambda opt, t: {"milestones": [max(1, t // 2), max(1, 3 * t // 4)],
                                                         "gamma": 0.1},
                 "divide by 10 at 50 % and 75 % of the run"),
    ScheduleSpec("exponential", ExponentialLR, lambda opt, t: {"gamma": 0.01 ** (1.0 / t)},
                 "exponential decay to 1 % at the end"),
    ScheduleSpec("linear", LinearLR, lambda opt, t: {"start_factor": 1.0, "end_factor": 0.0, "total_iters": t},
                 "linear decay to 0"),
    ScheduleSpec("polynomial", PolynomialLR, lambda opt, t: {"total_iters": t, "power": 0.9},
                 "polynomial ('poly', power 0.9) decay to 0"),
    ScheduleSpec("cosine", CosineAnnealingLR, lambda opt, t: {"T_max": t, "eta_min": 0.0},
                 "cosine annealing to 0 (Loshchilov & Hutter 2017)"),
    ScheduleSpec("cosine-restarts", CosineAnnealingWarmRestarts, lambda opt, t: {"T_0": max(1, t // 4), "T_mult": 1},
                 "SGDR: cosine with four warm restarts"),
    ScheduleSpec("warmup-cosine", WarmupCosineLR,
                 lambda opt, t: {"warmup_steps": _warmup(t), "total_steps": t, "start_factor": 0.01,
                                 "eta_min": [0.1 * lr for lr in _group_lrs(opt)]},
                 "5 % linear warmup, cosine to 10 % of the peak"),
    ScheduleSpec("wsd", WarmupStableDecayLR,
                 lambda opt, t: {"warmup_steps": _warmup(t), "decay_steps": max(1, round(0.2 * t)),
                                 "total_steps": t, "start_factor": 0.01, "eta_min": 0.0, "decay_shape": "1-sqrt"},
                 "warmup-stable-decay: 5 % warmup, 1-sqrt decay over the last 20 %"),
    ScheduleSpec("onecycle", OneCycleLR,
                 lambda opt, t: {"max_lr": _group_lrs(opt), "total_steps": t, "cycle_momentum": False},
                 "1cycle (Smith & Topin 2017) peaking at the given lr"),
    ScheduleSpec("cyclic", CyclicLR,
                 lambda opt, t: {"base_lr": [0.1 * lr for lr in _group_lrs(opt)], "max_lr": _group_lrs(opt),
                                 "step_size_up": max(1, t // 8), "cycle_momentum": False},
                 "triangular cycles between 10 % and 100 % of the lr (Smith 2017)"),
    ScheduleSpec("plateau", ReduceLROnPlateau, lambda opt, t: {"factor": 0.5, "patience": max(1, t // 20)},
                 "halve the lr when the metric stalls; step with step_scheduler(s, metric)"),
]}


def list_schedules() -> list[str]:
    """The registered schedule names, sorted."""
    return sorted(_SPECS)


def get_schedule_spec(name: str) -> ScheduleSpec:
    """The entry for ``name``; an unknown name raises ``ValueError`` listing close matches and all names."""
    spec = _SPECS.get(name.lower()) if isinstance(name, str) else None
    if spec is None:
        close = difflib.get_close_matches(str(name).lower(), list(_SPECS), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"Unknown schedule {name!r}.{hint} Valid names: {', '.join(list_schedules())}")
    return spec


def _accepted_kwargs(cls: type) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "optimizer", "last_epoch")]


def create_scheduler(name: str, optimizer: Optimizer, total_steps: int, **kwargs: Any) -> LRScheduler:
    """Build the schedule ``name`` for a run of ``total_steps`` optimizer steps (defaults in the module doc).

    Args:
        name: one of :func:`list_schedules` (case-insensitive).
        optimizer: the optimizer whose param groups' ``lr`` are the peak/base learning rates.
        total_steps: the number of optimizer steps of the run (>= 1); step the schedule once per step.
        **kwargs: constructor arguments overriding the defaults; unknown ones raise ``ValueError``.

    Returns:
        An :class:`~optimlab.schedules.Schedule` (a torch ``LRScheduler``); ``"plateau"`` returns a
        :class:`~optimlab.schedules.ReduceLROnPlateau`, stepped with the metric.
    """
    spec = get_schedule_spec(name)
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"Invalid total_steps: {total_steps!r} (accepted: an integer >= 1)")
    accepted = _accepted_kwargs(spec.cls)
    for key in kwargs:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=2, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ValueError(f"Unknown argument {key!r} for schedule {spec.name!r} ({spec.cls.__name__}).{hint} "
                             f"Valid arguments: {', '.join(accepted)}")
    options = {**spec.defaults(optimizer, total_steps), **kwargs}
    return spec.cls(optimizer, **options)


def needs_metric(scheduler: LRScheduler) -> bool:
    """True when ``scheduler.step`` takes the monitored metric (ReduceLROnPlateau, ours or torch's)."""
    return isinstance(scheduler, ReduceLROnPlateau) or type(scheduler).__name__ == "ReduceLROnPlateau"


def step_scheduler(scheduler: LRScheduler, metric: float | None = None) -> None:
    """Step any scheduler once: with ``metric`` for ReduceLROnPlateau (required there), without otherwise."""
    if needs_metric(scheduler):
        if metric is None:
            raise ValueError("ReduceLROnPlateau needs the monitored metric: step_scheduler(scheduler, metric)")
        scheduler.step(metric)
    else:
        scheduler.step()
