"""Shared machinery for optimlab's optimizers: argument validation, the step skeleton, tensor grouping.

Every optimizer in :mod:`optimlab.optim` subclasses :class:`OptimlabOptimizer`, which is a plain
:class:`torch.optim.Optimizer`. A subclass supplies two things:

* ``_init_group(group, params)``: create the per-parameter state lazily (the same state keys as
  ``torch.optim``), and
* ``_update_group(group, params, grads, states)``: apply the update rule to the parameters of one
  param group that have a gradient, either through its per-tensor reference path or its multi-tensor
  (``torch._foreach_*``) path, chosen by :meth:`OptimlabOptimizer._use_foreach`.

Everything else (closures, ``maximize``, sparse-gradient checks, ``lr`` as a tensor, state_dict and
hooks) is handled here or by ``torch.optim.Optimizer`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "OptimlabOptimizer",
    "ParamsT",
    "check_betas",
    "check_in_range",
    "check_lr",
    "check_non_negative",
    "reject_unsupported",
    "group_by_device_and_dtype",
    "as_float",
    "new_step_tensor",
]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]


def as_float(value: float | Tensor) -> float:
    """Return ``value`` as a Python float (0-dim tensors allowed)."""
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def check_lr(lr: float | Tensor) -> None:
    """Raise ``ValueError`` unless ``lr`` is a finite float >= 0 or a 0-dim tensor holding one."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"Invalid lr: a tensor lr must hold exactly one element, got shape {tuple(lr.shape)}")
    value = as_float(lr)
    if not (value >= 0.0) or math.isinf(value):
        raise ValueError(f"Invalid lr: {value} (accepted range: a finite value >= 0)")


def check_non_negative(name: str, value: float) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` >= 0 (NaN is rejected too)."""
    if isinstance(value, Tensor):
        value = as_float(value)
    if not (value >= 0.0):
        raise ValueError(f"Invalid {name}: {value} (accepted range: >= 0)")


def check_in_range(
    name: str, value: float, low: float, high: float, *, low_inclusive: bool = True, high_inclusive: bool = False
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` lies in the interval [low, high) (bounds configurable)."""
    if isinstance(value, Tensor):
        value = as_float(value)
    above = value >= low if low_inclusive else value > low
    below = value <= high if high_inclusive else value < high
    if not (above and below):
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        raise ValueError(f"Invalid {name}: {value} (accepted range: {left}{low}, {high}{right})")


def check_betas(betas: Sequence[float], names: tuple[str, ...] = ("beta1", "beta2")) -> None:
    """Validate a tuple of betas: each in [0, 1). Names the failing entry (``betas[0]``/``beta1``)."""
    if len(betas) != len(names):
        raise ValueError(f"Invalid betas: expected {len(names)} values, got {len(betas)}")
    for index, (beta, label) in enumerate(zip(betas, names)):
        if isinstance(beta, Tensor) and beta.numel() != 1:
            raise ValueError(f"Invalid betas[{index}] ({label}): tensor betas must hold one element")
        check_in_range(f"betas[{index}] ({label})", as_float(beta), 0.0, 1.0)


def reject_unsupported(class_name: str, **flags: bool | None) -> None:
    """Raise ``NotImplementedError`` for each flag that is set but not implemented by optimlab.

    torch.optim accepts ``capturable``, ``differentiable`` and ``fused``; optimlab keeps the same
    constructor signature so that imports can be swapped, and refuses loudly rather than ignoring a
    flag the caller relies on.
    """
    for name, value in flags.items():
        if value:
            raise NotImplementedError(
                f"{class_name}({name}=True) is not supported by optimlab yet; pass {name}=False "
                f"(or use torch.optim.{class_name} for that feature)"
            )


def group_by_device_and_dtype(tensor_lists: list[list[Tensor | None]]) -> dict:
    """Group parallel tensor lists by (device, dtype) so each multi-tensor kernel sees one kind.

    Returns ``{(device, dtype): (lists, indices)}`` like torch's internal helper, which it wraps.
    """
    return torch.optim.Optimizer._group_tensors_by_device_and_dtype(tensor_lists)  # type: ignore[arg-type]


def new_step_tensor() -> Tensor:
    """A fresh ``step`` counter in torch.optim's format: a 0-dim CPU tensor, float64 when the default
    dtype is float64 and float32 otherwise (so state_dicts move between torch.optim and optimlab)."""
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(0.0, dtype=dtype)


class OptimlabOptimizer(torch.optim.Optimizer):
    """Base class: the ``step`` skeleton shared by every optimlab optimizer.

    Subclasses implement :meth:`_init_group` and :meth:`_update_group`. The skeleton

    1. evaluates the closure (with grad enabled) and keeps its loss,
    2. for each param group collects the parameters that have a gradient,
    3. rejects sparse gradients unless the subclass sets ``supports_sparse = True``,
    4. initialises missing state, then
    5. hands the group to the update rule and returns the closure's loss.
    """

    supports_sparse: bool = False

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                step = p_state.get("step")
                if step is not None and not torch.is_tensor(step):
                    p_state["step"] = new_step_tensor() + float(step)

    @staticmethod
    def _use_foreach(group: dict[str, Any], params: list[Tensor]) -> bool:
        """The multi-tensor path is the default (``foreach=None``) unless the params are not on a
        native device (foreach kernels need CPU/CUDA tensors); ``foreach=False`` picks the reference."""
        foreach = group.get("foreach")
        if foreach is None:
            return all(p.device.type in ("cpu", "cuda") and not torch.jit.is_scripting() for p in params)
        return bool(foreach)

    def _init_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        raise NotImplementedError

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; returns the closure's loss when a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if not self.supports_sparse and any(p.grad.is_sparse for p in params):
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients; "
                    "use optimlab.optim.Adagrad or SGD, or torch.optim.SparseAdam"
                )
            self._init_group(group, params)
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            self._update_group(group, params, grads, states)
        return loss
