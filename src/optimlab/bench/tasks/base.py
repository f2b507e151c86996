"""What a benchmark task is: a :class:`TaskSpec` (name, metric, target, step budget) that builds a
:class:`TaskInstance` (a model, a training loss, an infinite batch iterator, a validation routine).

The runner, the learning-rate finder and anything else that trains "a task" use only these two types.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["TaskSpec", "TaskInstance"]


@dataclass
class TaskInstance:
    """One freshly initialised copy of a task, ready to train.

    Attributes:
        model: the module whose parameters the optimizer updates.
        loss: ``batch -> scalar`` training loss of ``model`` on one batch (differentiable).
        batches: an infinite, seeded iterator of training batches (``None`` items for test functions).
        evaluate: ``() -> {metric name: value}`` on held-out data (or the exact loss for test functions);
            always contains the task's ``metric`` key and ``"loss"``. Runs under ``torch.no_grad``.
        point: for test functions, ``() -> current coordinates`` (recorded as the trajectory); else ``None``.
    """

    model: torch.nn.Module
    loss: Callable[[Any], Tensor]
    batches: Iterator[Any]
    evaluate: Callable[[], dict[str, float]]
    point: Callable[[], list[float]] | None = None


@dataclass(frozen=True)
class TaskSpec:
    """A registered task.

    Attributes:
        name: registry name, e.g. ``"digits-mlp"``.
        description: one line for listings.
        metric: the key of :attr:`TaskInstance.evaluate` that tuning optimises and reports.
        mode: ``"min"`` or ``"max"``: which direction of ``metric`` is better.
        target: the value of ``metric`` that counts as "reached" (steps/time to target).
        steps: the step budget of a full run.
        quick_steps: the step budget under ``--quick``.
        eval_every: evaluate every this many steps (and at the last step).
        family: ``"function"`` for test functions, ``"model"`` for learning tasks.
        build: ``seed -> TaskInstance``: same seed, same initial weights and batch order.
        lr_widen: the tuning range's upper learning-rate bound is the optimizer's registry bound times
            this (the same for every optimizer; test functions need larger steps than networks).
        deterministic: whether the result ignores the seed (``None``: true for the ``"function"`` family).
            Deterministic tasks are reported without a spread; any difference beyond rounding is real.
        source: where the task comes from: ``"built-in"``, a task file or module reference
            (``PATH.py:NAME``, ``package.module:NAME``) or ``"entry point NAME"``; set by the loader.

    ``build`` may take a ``device`` keyword (``build(seed, device="cuda")``): such a task runs where
    ``--device`` says; a task whose ``build`` takes only the seed runs on the CPU.
    """

    name: str
    description: str
    metric: str
    mode: str
    target: float
    steps: int
    quick_steps: int
    eval_every: int
    family: str
    build: Callable[[int], TaskInstance]
    lr_widen: float = 1.0
    deterministic: bool | None = None
    source: str = "built-in"

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"Invalid mode for task {self.name!r}: {self.mode!r} (accepted: 'min', 'max')")
        for label in ("steps", "quick_steps", "eval_every"):
            if getattr(self, label) < 1:
                raise ValueError(f"Invalid {label} for task {self.name!r}: {getattr(self, label)} (accepted range: >= 1)")
        if not self.lr_widen >= 1.0:
            raise ValueError(f"Invalid lr_widen for task {self.name!r}: {self.lr_widen} (accepted range: >= 1)")

    @property
    def is_deterministic(self) -> bool:
        """:attr:`deterministic`, defaulting to ``family == "function"``."""
        return self.family == "function" if self.deterministic is None else self.deterministic

    @property
    def accepts_device(self) -> bool:
        """Whether :attr:`build` takes a ``device`` keyword."""
        try:
            return "device" in inspect.signature(self.build).parameters
        except (TypeError, ValueError):  # some builtins have no signature
            return False

    def instantiate(self, seed: int, device: str = "cpu") -> TaskInstance:
        """``build(seed)`` on ``device``; ``ValueError`` when the task cannot run there."""
        if self.accepts_device:
            return self.build(seed, device=device)  # type: ignore[call-arg]
        if device != "cpu":
            raise ValueError(f"Invalid device for task {self.name!r}: {device!r} (its build(seed) takes no device; "
                             "accepted: 'cpu')")
        return self.build(seed)

    def reached(self, value: float) -> bool:
        """Whether a metric ``value`` meets the target (``<=`` for min tasks, ``>=`` for max tasks)."""
        return value <= self.target if self.mode == "min" else value >= self.target

    def better(self, a: float, b: float) -> bool:
        """Whether metric value ``a`` is strictly better than ``b``."""
        return a < b if self.mode == "min" else a > b
