r"""Stochastic gradient descent with optional heavy-ball or Nesterov momentum.

With learning rate :math:`\eta`, momentum :math:`\mu`, dampening :math:`\tau` and weight decay
:math:`\lambda` (gradient :math:`g_t` after ``maximize`` and weight decay, see
:func:`optimlab.optim._base.prepare_grad`):

.. math::
    b_1 &= g_1, \qquad b_t = \mu\, b_{t-1} + (1 - \tau)\, g_t \quad (t > 1) \\
    d_t &= \begin{cases} g_t + \mu\, b_t & \text{nesterov} \\ b_t & \mu \neq 0 \\ g_t & \mu = 0 \end{cases} \\
    \theta_t &= \theta_{t-1} - \eta\, d_t

References: Robbins & Monro, "A Stochastic Approximation Method" (1951); Polyak, "Some methods of
speeding up the convergence of iteration methods" (1964); Nesterov, "A method for solving the convex
programming problem with convergence rate O(1/k^2)" (1983), in the form of Sutskever et al. (2013).
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
    loop_pieces,
    prepare_grad,
    prepare_grads,
    real_views,
    zeros_state,
)
from optimlab.optim._fused import fused_step, resolve_fused
from optimlab.optim.registry import preset, register

__all__ = ["SGD", "MOMENTUM_STYLES"]

#: ``momentum_style`` values: torch's form (``None``) and the EMA form.
MOMENTUM_STYLES = (None, "ema")


def _sgd_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """Per-tensor reference path of the SGD rule (module docstring). Missing momentum buffers
    (``None``) are created from the first gradient and written back into ``momentum_buffers``. Large
    tensors are updated in slices (:func:`optimlab.optim._base.loop_pieces`) once their buffer exists."""
    for i, param in enumerate(params):
        if momentum != 0 and momentum_buffers[i] is None:
            momentum_buffers[i] = _sgd_tensor(param, grads[i], None, lr=lr, weight_decay=weight_decay,
                                              momentum=momentum, dampening=dampening, nesterov=nesterov,
                                              maximize=maximize)
            continue
        for piece in loop_pieces(param, grads[i], momentum_buffers[i] if momentum != 0 else None):
            _sgd_tensor(*piece, lr=lr, weight_decay=weight_decay, momentum=momentum, dampening=dampening,
                        nesterov=nesterov, maximize=maximize)


def _sgd_tensor(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None = None,
    *,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> Tensor | None:
    """The SGD rule (module docstring) for one tensor, in place; returns the momentum buffer (created from
    the first gradient when ``None``). The per-tensor path loops over it; the fused path compiles it
    (:mod:`optimlab.optim._fused`, ``lr`` then arrives as a 0-dim tensor)."""
    grad = prepare_grad(param, grad, maximize=maximize, weight_decay=weight_decay)
    if momentum != 0:
        if momentum_buffer is None:
            momentum_buffer = grad.detach().clone()
        else:
            momentum_buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
        grad = grad.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    param.add_(grad, alpha=-lr)
    return momentum_buffer


def _sgd_fused(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """Fused path of the same rule: :func:`_sgd_tensor` compiled by :mod:`optimlab.optim._fused`. A momentum
    buffer's first step (the buffer is created from the gradient) runs the per-tensor path."""
    options = {"weight_decay": weight_decay, "momentum": momentum, "dampening": dampening, "nesterov": nesterov,
               "maximize": maximize}
    fresh = [i for i in range(len(params)) if momentum != 0 and momentum_buffers[i] is None]
    for i in fresh:
        momentum_buffers[i] = _sgd_tensor(params[i], grads[i], None, lr=lr, **options)
    tensor_lists = [params, grads] + ([momentum_buffers] if momentum != 0 else [])
    if fresh:
        skipped = set(fresh)
        rest = [i for i in range(len(params)) if i not in skipped]
        tensor_lists = [[tensors[i] for i in rest] for tensors in tensor_lists]
    fused_step(_sgd_tensor, options, elementwise=True)(tensor_lists, {"lr": lr})


def _sgd_multi_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """Multi-tensor (``torch._foreach_*``) path of the same rule as :func:`_sgd_single_tensor`."""
    positions = list(range(len(params)))
    for (device_params, device_grads), (device_positions,) in foreach_groups([params, grads], [positions]):
        device_grads = prepare_grads(device_params, device_grads, maximize=maximize, weight_decay=weight_decay)
        if momentum != 0:
            existing = [j for j, i in enumerate(device_positions) if momentum_buffers[i] is not None]
            if existing:
                bufs = [momentum_buffers[device_positions[j]] for j in existing]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, [device_grads[j] for j in existing], alpha=1 - dampening)
            for j, i in enumerate(device_positions):
                if momentum_buffers[i] is None:
                    momentum_buffers[i] = device_grads[j].detach().clone()
            bufs = [momentum_buffers[i] for i in device_positions]
            device_grads = list(torch._foreach_add(device_grads, bufs, alpha=momentum)) if nesterov else bufs
        torch._foreach_add_(device_params, device_grads, alpha=-lr)


def _check_momentum_style(style: str | None, momentum: float, dampening: float, nesterov: bool) -> None:
    if style not in MOMENTUM_STYLES:
        raise ValueError(f"Invalid momentum_style: {style!r} (accepted: None for torch's form, 'ema' for "
                         "v <- beta*v + (1 - beta)*g from v = 0)")
    if style == "ema":
        check_in_range("momentum", momentum, 0.0, 1.0)
        if nesterov:
            raise ValueError("momentum_style='ema' does not combine with nesterov=True (use momentum_style=None)")
        if dampening != 0:
            raise ValueError(f"momentum_style='ema' fixes the dampening (the (1 - momentum) factor on the gradient); "
                             f"got dampening={dampening}, pass dampening=0")


@register(
    names={
        "sgd": "SGD (Robbins & Monro 1951)",
        "sgd-momentum": preset("SGD with heavy-ball momentum 0.9 (Polyak 1964)", momentum=0.9, torch=True),
        "sgd-nesterov": preset("SGD with Nesterov momentum 0.9 (Nesterov 1983; Sutskever et al. 2013)",
                               momentum=0.9, nesterov=True),
    },
    lr_bounds=(1e-4, 1.0), default_lr=1e-2, reference=torch.optim.SGD, state_bytes=0, fused=True, complex="supported",
    checks={
        "plain": {"lr": 0.1},
        "momentum": {"lr": 0.05, "momentum": 0.9},
        "dampening": {"lr": 0.05, "momentum": 0.9, "dampening": 0.5},
        "nesterov": {"lr": 0.05, "momentum": 0.9, "nesterov": True},
        "nesterov-wd": {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.1},
        "wd-maximize": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.05, "maximize": True},
        "ema-momentum": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.05, "momentum_style": "ema"},
    },
    fused_check={"lr": 1e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
)
class SGD(OptimlabOptimizer):
    r"""Stochastic gradient descent, optionally with heavy-ball or Nesterov momentum.

    .. math::
        b_t = \mu\, b_{t-1} + (1 - \tau)\, g_t \;(b_1 = g_1), \qquad
        \theta_t = \theta_{t-1} - \eta \begin{cases} g_t + \mu b_t & \text{nesterov} \\ b_t & \text{otherwise}\end{cases}

    where :math:`g_t = \pm\nabla f(\theta_{t-1}) + \lambda\theta_{t-1}` (minus when ``maximize``).
    Robbins & Monro 1951; momentum Polyak 1964; Nesterov 1983 (Sutskever et al. 2013 form).

    Same arguments, defaults and state (``momentum_buffer`` when ``momentum != 0``) as
    ``torch.optim.SGD``; sparse gradients are supported (reference path, no weight decay).

    ``momentum_style="ema"`` (keyword-only optimlab extension) gives the EMA form of the heavy ball,
    :math:`v_t = \beta v_{t-1} + (1-\beta) g_t` from :math:`v_0 = 0`, :math:`\theta_t = \theta_{t-1} - \eta v_t`
    (:math:`\beta` = ``momentum`` in [0, 1)): torch's rule with dampening :math:`\beta` and a zero initial
    buffer. Since :math:`v_t = (1-\beta) b_t` for torch's undampened buffer :math:`b`, lr :math:`\eta` here
    equals lr :math:`(1-\beta)\eta` in torch's form; unlike torch's ``dampening=momentum``, whose buffer starts
    at :math:`b_1 = g_1`, the first step is :math:`\eta(1-\beta) g_1`.

    Args:
        params: parameters, named parameters or param-group dicts.
        lr: learning rate :math:`\eta` (float or 0-dim tensor, >= 0). Default 1e-3.
        momentum: :math:`\mu` (>= 0). Default 0.
        dampening: :math:`\tau` in [0, 1]. Default 0.
        weight_decay: L2 penalty :math:`\lambda` (>= 0). Default 0.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``). Default False.
        maximize: ascend the objective. Default False.
        foreach: multi-tensor path (default: see :func:`optimlab.optim._base.default_foreach`).
        fused: the compiled fused step (:mod:`optimlab.optim._fused`); ``None`` (default) means off.
        differentiable: not supported (``NotImplementedError`` when true).
        momentum_style: ``None`` (default) for torch's form above, ``"ema"`` for the EMA form.
    """

    supports_sparse = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        momentum_style: str | None = None,
    ) -> None:
        check_differentiable(differentiable, foreach=foreach, fused=fused)
        _check_momentum_style(momentum_style, momentum, dampening, nesterov)
        check_lr(lr)
        check_non_negative("momentum", momentum)
        check_in_range("dampening", dampening, 0.0, 1.0, high_inclusive=True)
        check_non_negative("weight_decay", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(
                f"Invalid nesterov=True with momentum={momentum}, dampening={dampening}: "
                "Nesterov momentum requires momentum > 0 and dampening = 0"
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
            "momentum_style": momentum_style,
        }
        super().__init__(params, defaults)

    def _init_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """SGD's only state, ``momentum_buffer``, is created by the rule from the first gradient; with
        ``momentum_style="ema"`` it starts at zero here instead (the rule then applies from the first step)."""
        if group["momentum_style"] == "ema" and group["momentum"] != 0:
            for param in params:
                self.state[param].setdefault("momentum_buffer", zeros_state(param))

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        momentum = group["momentum"]
        buffers = real_views([state.get("momentum_buffer") for state in states]) if momentum != 0 else []
        if resolve_fused(group["fused"], params, type(self).__name__):
            rule = _sgd_fused
        else:
            rule = _sgd_multi_tensor if self._use_foreach(group, params) else _sgd_single_tensor
        rule(
            real_views(params),
            real_views(grads),
            buffers,
            lr=as_float(group["lr"]),
            weight_decay=as_float(group["weight_decay"]),
            momentum=momentum,
            dampening=momentum if group["momentum_style"] == "ema" else group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        if momentum != 0:
            for param, state, buf in zip(params, states, buffers):
                state["momentum_buffer"] = torch.view_as_complex(buf) if param.is_complex() else buf
