r"""RMSprop: divide the gradient by a running root-mean-square of recent gradients.

With learning rate :math:`\eta`, smoothing :math:`\alpha`, :math:`\epsilon`, momentum :math:`\mu`
and gradient :math:`g_t` (after ``maximize`` and weight decay, see
:func:`optimlab.optim._base.prepare_grad`):

.. math::
    v_t &= \alpha\, v_{t-1} + (1 - \alpha)\, g_t^2 \\
    \bar g_t &= \alpha\, \bar g_{t-1} + (1 - \alpha)\, g_t \quad \text{(centered only)} \\
    r_t &= \sqrt{v_t - \bar g_t^2} + \epsilon \ \text{(centered)}, \quad \sqrt{v_t} + \epsilon \ \text{(otherwise)} \\
    b_t &= \mu\, b_{t-1} + g_t / r_t, \qquad
    \theta_t = \theta_{t-1} - \eta\, b_t \quad (\mu > 0), \qquad
    \theta_t = \theta_{t-1} - \eta\, g_t / r_t \quad (\mu = 0)

References: Tieleman & Hinton, "Lecture 6.5 - RMSprop", COURSERA: Neural Networks for Machine
Learning (2012); the centered variant from Graves, "Generating Sequences With Recurrent Neural
Networks" (2013).
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

__all__ = ["RMSprop"]


def _rmsprop_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
) -> None:
    """Per-tensor reference path of the RMSprop rule (module docstring). ``grad_avgs`` is empty
    unless ``centered``; ``momentum_buffers`` is empty unless ``momentum > 0``."""
    for i, param in enumerate(params):
        for piece in loop_pieces(param, grads[i], square_avgs[i], grad_avgs[i] if centered else None,
                                 momentum_buffers[i] if momentum > 0 else None):
            _rmsprop_tensor(*piece, lr=lr, alpha=alpha, eps=eps,
                            momentum=momentum, weight_decay=weight_decay, centered=centered, maximize=maximize)


def _rmsprop_tensor(
    param: Tensor,
    grad: Tensor,
    square_avg: Tensor,
    grad_avg: Tensor | None = None,
    momentum_buffer: Tensor | None = None,
    *,
    lr: float | Tensor,
    alpha: float | Tensor,
    eps: float | Tensor,
    momentum: float | Tensor,
    weight_decay: float,
    centered: bool,
    maximize: bool,
) -> None:
    r"""The RMSprop rule (module docstring) for one tensor, in place: what the per-tensor path loops over
    and the fused path compiles (:mod:`optimlab.optim._fused`, where the float arguments arrive as 0-dim
    tensors).

    ``grad_avg`` (:math:`\bar g`) is used iff ``centered``. The momentum variant is chosen by the buffer,
    not by the value of :math:`\mu`: ``momentum_buffer`` is given iff :math:`\mu > 0` (the optimizer
    keeps one only then), so :math:`\mu` can be a 0-dim tensor that a schedule (e.g. ``OneCycleLR``'s
    cycled momentum) changes without a recompile."""
    grad = prepare_grad(param, grad, maximize=maximize, weight_decay=weight_decay)
    square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
    if centered:
        grad_avg.lerp_(grad, 1 - alpha)  # type: ignore[union-attr]
        rms = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_() + eps  # type: ignore[arg-type]
    else:
        rms = square_avg.sqrt() + eps  # not in place: sqrt's result is saved under autograd (differentiable)
    if momentum_buffer is not None:
        momentum_buffer.mul_(momentum).addcdiv_(grad, rms)
        param.add_(momentum_buffer, alpha=-lr)
    else:
        param.addcdiv_(grad, rms, value=-lr)


def _rmsprop_fused(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
) -> None:
    """Fused path of the same rule: :func:`_rmsprop_tensor` compiled by :mod:`optimlab.optim._fused`, with
    ``lr``, ``alpha``, ``eps`` and ``momentum`` passed as 0-dim tensors (a schedule changes data, not the graph)
    and ``weight_decay``, ``centered`` and ``maximize`` as compile-time constants."""
    static = {"weight_decay": weight_decay, "centered": centered, "maximize": maximize}
    tensor_lists = [params, grads, square_avgs, grad_avgs if centered else None,
                    momentum_buffers if momentum > 0 else None]
    fused_step(_rmsprop_tensor, static, elementwise=True)(
        tensor_lists, {"lr": lr, "alpha": alpha, "eps": eps, "momentum": momentum})


def _rmsprop_multi_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
) -> None:
    """Multi-tensor (``torch._foreach_*``) path of the same rule as :func:`_rmsprop_single_tensor`."""
    for (device_params, device_grads, device_square_avgs, device_grad_avgs, device_momentum_buffers), _ in (
        foreach_groups([params, grads, square_avgs, grad_avgs, momentum_buffers])
    ):
        device_grads = prepare_grads(device_params, device_grads, maximize=maximize, weight_decay=weight_decay)
        torch._foreach_mul_(device_square_avgs, alpha)
        torch._foreach_addcmul_(device_square_avgs, device_grads, device_grads, 1 - alpha)
        if centered:
            torch._foreach_lerp_(device_grad_avgs, device_grads, 1 - alpha)
            rms = torch._foreach_addcmul(device_square_avgs, device_grad_avgs, device_grad_avgs, -1)
            torch._foreach_sqrt_(rms)
        else:
            rms = torch._foreach_sqrt(device_square_avgs)
        torch._foreach_add_(rms, eps)
        if momentum > 0:
            torch._foreach_mul_(device_momentum_buffers, momentum)
            torch._foreach_addcdiv_(device_momentum_buffers, device_grads, rms)
            torch._foreach_add_(device_params, device_momentum_buffers, alpha=-lr)
        else:
            torch._foreach_addcdiv_(device_params, device_grads, rms, -lr)


@register(
    names={"rmsprop": "RMSprop (Tieleman & Hinton 2012)"},
    lr_bounds=(1e-5, 1e-1), default_lr=1e-3, reference=torch.optim.RMSprop, state_bytes=4, fused=True,
    complex="supported",
    checks={
        "default": {"lr": 0.01},
        "centered": {"lr": 0.01, "centered": True},
        "momentum": {"lr": 0.01, "momentum": 0.9},
        "centered-momentum-wd": {"lr": 0.01, "centered": True, "momentum": 0.5, "weight_decay": 0.1},
        "alpha-maximize": {"lr": 0.01, "alpha": 0.9, "eps": 1e-4, "maximize": True},
    },
    fused_check={"lr": 1e-2, "alpha": 0.9, "eps": 1e-6, "momentum": 0.9, "centered": True, "weight_decay": 0.1,
                 "maximize": True},
)
class RMSprop(OptimlabOptimizer):
    r"""RMSprop (Tieleman & Hinton 2012), optionally centered (Graves 2013) and with momentum.

    .. math::
        v_t = \alpha v_{t-1} + (1-\alpha) g_t^2,\quad
        r_t = \sqrt{v_t - [\text{centered}]\,\bar g_t^2} + \epsilon,\quad
        \theta_t = \theta_{t-1} - \eta\, b_t,\ b_t = \mu b_{t-1} + g_t / r_t

    where :math:`\bar g_t = \alpha \bar g_{t-1} + (1-\alpha) g_t` and :math:`g_t = \pm\nabla f + \lambda\theta`
    (with :math:`\mu = 0` the update is :math:`\eta\, g_t / r_t`).

    Same arguments, defaults and state (``step``, ``square_avg``, ``momentum_buffer`` when
    ``momentum > 0``, ``grad_avg`` when ``centered``) as ``torch.optim.RMSprop``.

    Args:
        params: parameters, named parameters or param-group dicts.
        lr: :math:`\eta` (float or 0-dim tensor, >= 0). Default 1e-2.
        alpha: smoothing constant :math:`\alpha` in [0, 1]. Default 0.99.
        eps: :math:`\epsilon` (>= 0). Default 1e-8.
        weight_decay: :math:`\lambda` (>= 0). Default 0.
        momentum: :math:`\mu` (>= 0). Default 0.
        centered: normalise by the estimated variance instead of the second moment. Default False.
        capturable, differentiable: not supported (``NotImplementedError`` when true).
        foreach: multi-tensor path (default: see :func:`optimlab.optim._base.default_foreach`).
        maximize: ascend the objective. Default False.
        fused: optimlab extension (keyword-only, after torch's arguments; torch has no fused RMSprop):
            the compiled fused step (:mod:`optimlab.optim._fused`); ``None`` (default) means off.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        fused: bool | None = None,
    ) -> None:
        reject_unsupported(type(self).__name__, capturable=capturable)
        check_differentiable(differentiable, foreach=foreach, fused=fused)
        check_lr(lr)
        check_in_range("alpha", alpha, 0.0, 1.0, high_inclusive=True)
        check_non_negative("eps", eps)
        check_non_negative("weight_decay", weight_decay)
        check_non_negative("momentum", momentum)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "alpha": alpha,
            "eps": eps,
            "centered": centered,
            "weight_decay": weight_decay,
            "capturable": capturable,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "fused": fused,
        }
        super().__init__(params, defaults)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        momentum = ("momentum_buffer",) if group["momentum"] > 0 else ()
        centered = ("grad_avg",) if group["centered"] else ()
        return ("step", "square_avg", *momentum, *centered)

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        increment_steps(states)  # kept for torch.optim compatibility; the rule does not use t
        momentum, centered = group["momentum"], group["centered"]
        if resolve_fused(group["fused"], params, type(self).__name__):
            rule = _rmsprop_fused
        else:
            rule = _rmsprop_multi_tensor if self._use_foreach(group, params) else _rmsprop_single_tensor
        rule(
            real_views(params),
            real_views(grads),
            real_views([state["square_avg"] for state in states]),
            real_views([state["grad_avg"] for state in states]) if centered else [],
            real_views([state["momentum_buffer"] for state in states]) if momentum > 0 else [],
            lr=as_float(group["lr"]),
            alpha=group["alpha"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            momentum=momentum,
            centered=centered,
            maximize=group["maximize"],
        )
