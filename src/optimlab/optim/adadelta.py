r"""Adadelta: step sizes from the ratio of running RMS of updates and of gradients.

With learning rate :math:`\eta` (a scale, 1 in the paper), decay :math:`\rho`, :math:`\epsilon` and
gradient :math:`g_t` (after ``maximize`` and weight decay, see
:func:`optimlab.optim._base.prepare_grad`):

.. math::
    v_t &= \rho\, v_{t-1} + (1 - \rho)\, g_t^2 \\
    \Delta_t &= \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t \\
    u_t &= \rho\, u_{t-1} + (1 - \rho)\, \Delta_t^2 \\
    \theta_t &= \theta_{t-1} - \eta\, \Delta_t

Reference: Zeiler, "ADADELTA: An Adaptive Learning Rate Method" (2012).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from optimlab.optim._base import (
    OptimlabOptimizer,
    ParamsT,
    as_float,
    check_differentiable,
    check_in_range,
    check_lr,
    check_non_negative,
    foreach_groups,
    increment_steps,
    loop_pieces,
    prepare_grad,
    prepare_grads,
    real_views,
    reject_unsupported,
)
from optimlab.optim._fused import fused_step, resolve_fused
from optimlab.optim.registry import register

__all__ = ["Adadelta"]


def _adadelta_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    acc_deltas: list[Tensor],
    *,
    lr: float,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Per-tensor reference path of the Adadelta rule (module docstring)."""
    for i, param in enumerate(params):
        for piece in loop_pieces(param, grads[i], square_avgs[i], acc_deltas[i]):
            _adadelta_tensor(*piece, lr=lr, rho=rho, eps=eps,
                             weight_decay=weight_decay, maximize=maximize)


def _adadelta_tensor(
    param: Tensor,
    grad: Tensor,
    square_avg: Tensor,
    acc_delta: Tensor,
    *,
    lr: float | Tensor,
    rho: float | Tensor,
    eps: float | Tensor,
    weight_decay: float,
    maximize: bool,
) -> None:
    """The Adadelta rule (module docstring) for one tensor, in place: what the per-tensor path loops over and
    the fused path compiles (:mod:`optimlab.optim._fused`, where ``lr``, ``rho`` and ``eps`` arrive as 0-dim
    tensors)."""
    grad = prepare_grad(param, grad, maximize=maximize, weight_decay=weight_decay)
    square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
    std = square_avg.add(eps).sqrt_()
    delta = acc_delta.add(eps).sqrt_() / std * grad  # not div_/mul_: sqrt_'s result is saved under autograd
    acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
    param.add_(delta, alpha=-lr)


def _adadelta_fused(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    acc_deltas: list[Tensor],
    *,
    lr: float,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Fused path of the same rule: :func:`_adadelta_tensor` compiled by :mod:`optimlab.optim._fused`, with
    ``lr``, ``rho`` and ``eps`` passed as 0-dim tensors (a schedule changes data, not the graph) and
    ``weight_decay`` and ``maximize`` as compile-time constants."""
    fused_step(_adadelta_tensor, {"weight_decay": weight_decay, "maximize": maximize}, elementwise=True)(
        [params, grads, square_avgs, acc_deltas], {"lr": lr, "rho": rho, "eps": eps})


def _adadelta_multi_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    acc_deltas: list[Tensor],
    *,
    lr: float,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Multi-tensor (``torch._foreach_*``) path of the same rule as :func:`_adadelta_single_tensor`."""
    for (device_params, device_grads, device_square_avgs, device_acc_deltas), _ in foreach_groups(
        [params, grads, square_avgs, acc_deltas]
    ):
        device_grads = prepare_grads(device_params, device_grads, maximize=maximize, weight_decay=weight_decay)
        torch._foreach_mul_(device_square_avgs, rho)
        torch._foreach_addcmul_(device_square_avgs, device_grads, device_grads, 1 - rho)
        stds = torch._foreach_add(device_square_avgs, eps)
        torch._foreach_sqrt_(stds)
        deltas = torch._foreach_add(device_acc_deltas, eps)
        torch._foreach_sqrt_(deltas)
        torch._foreach_div_(deltas, stds)
        torch._foreach_mul_(deltas, device_grads)
        torch._foreach_mul_(device_acc_deltas, rho)
        torch._foreach_addcmul_(device_acc_deltas, deltas, deltas, 1 - rho)
        torch._foreach_add_(device_params, deltas, alpha=-lr)


@register(
    names={"adadelta": "Adadelta (Zeiler 2012)"},
    lr_bounds=(1e-2, 10.0), default_lr=1.0, reference=torch.optim.Adadelta, state_bytes=8, fused=True,
    complex="supported",
    checks={
        "default": {"lr": 1.0},
        "rho-eps": {"lr": 0.5, "rho": 0.95, "eps": 1e-4},
        "wd": {"lr": 1.0, "weight_decay": 0.1},
        "maximize": {"lr": 1.0, "maximize": True},
    },
    fused_check={"lr": 0.5, "rho": 0.8, "eps": 1e-5, "weight_decay": 0.1, "maximize": True},
)
class Adadelta(OptimlabOptimizer):
    r"""Adadelta (Zeiler 2012).

    .. math::
        v_t = \rho v_{t-1} + (1-\rho) g_t^2,\quad
        \Delta_t = \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t,\quad
        u_t = \rho u_{t-1} + (1-\rho)\Delta_t^2,\quad
        \theta_t = \theta_{t-1} - \eta\,\Delta_t

    with :math:`g_t = \pm\nabla f + \lambda\theta`. Same arguments, defaults and state (``step``,
    ``square_avg``, ``acc_delta``) as ``torch.optim.Adadelta``.

    Args:
        params: parameters, named parameters or param-group dicts.
        lr: scale :math:`\eta` of the update (float or 0-dim tensor, >= 0). Default 1.0.
        rho: decay :math:`\rho` in [0, 1]. Default 0.9.
        eps: :math:`\epsilon` (>= 0). Default 1e-6.
        weight_decay: :math:`\lambda` (>= 0). Default 0.
        foreach: multi-tensor path (default: see :func:`optimlab.optim._base.default_foreach`).
        capturable, differentiable: not supported (``NotImplementedError`` when true).
        maximize: ascend the objective. Default False.
        fused: optimlab extension (keyword-only, after torch's arguments; torch has no fused Adadelta):
            the compiled fused step (:mod:`optimlab.optim._fused`); ``None`` (default) means off.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        reject_unsupported(type(self).__name__, capturable=capturable)
        check_differentiable(differentiable, foreach=foreach, fused=fused)
        check_lr(lr)
        check_in_range("rho", rho, 0.0, 1.0, high_inclusive=True)
        check_non_negative("eps", eps)
        check_non_negative("weight_decay", weight_decay)
        defaults = {
            "lr": lr,
            "rho": rho,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "capturable": capturable,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        }
        super().__init__(params, defaults)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("step", "square_avg", "acc_delta")

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        increment_steps(states)  # kept for torch.optim compatibility; the rule does not use t
        if resolve_fused(group["fused"], params, type(self).__name__):
            rule = _adadelta_fused
        else:
            rule = _adadelta_multi_tensor if self._use_foreach(group, params) else _adadelta_single_tensor
        rule(
            real_views(params),
            real_views(grads),
            real_views([state["square_avg"] for state in states]),
            real_views([state["acc_delta"] for state in states]),
            lr=as_float(group["lr"]),
            rho=group["rho"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
        )
