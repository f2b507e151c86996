r"""Adamax: Adam with the infinity norm in place of the second moment.

With learning rate :math:`\eta`, betas :math:`(\beta_1, \beta_2)`, :math:`\epsilon`, step :math:`t` and
gradient :math:`g_t` (after ``maximize`` and weight decay, see
:func:`optimlab.optim._base.prepare_grad`):

.. math::
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
    u_t &= \max(\beta_2 u_{t-1},\ |g_t| + \epsilon) \\
    \theta_t &= \theta_{t-1} - \frac{\eta}{1 - \beta_1^t}\, \frac{m_t}{u_t}

Reference: Kingma & Ba, "Adam: A Method for Stochastic Optimization" (2014), section 7.1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from optimlab.optim._base import (
    OptimlabOptimizer,
    ParamsT,
    as_float,
    check_betas,
    check_differentiable,
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
from optimlab.optim._fused import fused_step, resolve_fused, split_by_value
from optimlab.optim.registry import register

__all__ = ["Adamax"]


def _adamax_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_infs: list[Tensor],
    steps: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Per-tensor reference path of the Adamax rule (module docstring): :func:`_adamax_tensor` per tensor."""
    for i, param in enumerate(params):
        for piece in loop_pieces(param, grads[i], exp_avgs[i], exp_infs[i]):
            _adamax_tensor(*piece, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                           bias_correction1=1 - beta1 ** steps[i], weight_decay=weight_decay, maximize=maximize)


def _adamax_tensor(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_inf: Tensor,
    *,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float | Tensor,
    bias_correction1: float | Tensor,
    weight_decay: float,
    maximize: bool,
) -> None:
    r"""The Adamax rule (module docstring) for one tensor, in place, with
    ``bias_correction1`` :math:`= 1 - \beta_1^t`: what the per-tensor path loops over and the fused path
    compiles (:mod:`optimlab.optim._fused`, where the float arguments arrive as 0-dim tensors)."""
    grad = prepare_grad(param, grad, maximize=maximize, weight_decay=weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    norm = grad.abs().add_(eps)
    if torch.is_grad_enabled():  # differentiable=True: out= is not differentiable, maximum saves its inputs
        exp_inf.copy_(torch.maximum(exp_inf.mul(beta2), norm))
    else:
        torch.maximum(exp_inf.mul_(beta2), norm, out=exp_inf)
    param.addcdiv_(exp_avg, exp_inf, value=-(lr / bias_correction1))


def _adamax_multi_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_infs: list[Tensor],
    steps: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Multi-tensor (``torch._foreach_*``) path of the same rule as :func:`_adamax_single_tensor`."""
    for (device_params, device_grads, device_exp_avgs, device_exp_infs), (device_steps,) in foreach_groups(
        [params, grads, exp_avgs, exp_infs], [steps]
    ):
        device_grads = prepare_grads(device_params, device_grads, maximize=maximize, weight_decay=weight_decay)
        torch._foreach_lerp_(device_exp_avgs, device_grads, 1 - beta1)
        torch._foreach_mul_(device_exp_infs, beta2)
        abs_grads = torch._foreach_abs(device_grads)
        torch._foreach_add_(abs_grads, eps)
        torch._foreach_maximum_(device_exp_infs, abs_grads)
        step_sizes = [-(lr / (1 - beta1**step)) for step in device_steps]
        torch._foreach_addcdiv_(device_params, device_exp_avgs, device_exp_infs, step_sizes)


def _adamax_fused(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_infs: list[Tensor],
    steps: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Fused path of the same rule: :func:`_adamax_tensor` compiled by :mod:`optimlab.optim._fused`, the
    bias correction computed once per distinct step count and passed as a 0-dim tensor."""
    static = {"weight_decay": weight_decay, "maximize": maximize}
    for step, lists in split_by_value([params, grads, exp_avgs, exp_infs], steps):
        fused_step(_adamax_tensor, static, elementwise=True)(lists, {
            "lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "bias_correction1": 1 - beta1**step})


@register(
    names={"adamax": "Adamax (Kingma & Ba 2014)"},
    lr_bounds=(1e-5, 1e-1), default_lr=2e-3, reference=torch.optim.Adamax, state_bytes=8, fused=True,
    complex="supported",
    checks={
        "default": {"lr": 0.02},
        "wd": {"lr": 0.02, "weight_decay": 0.1},
        "betas-maximize": {"lr": 0.02, "betas": (0.8, 0.95), "maximize": True},
    },
    fused_check={"lr": 1e-2, "weight_decay": 0.1, "maximize": True},
)
class Adamax(OptimlabOptimizer):
    r"""Adamax (Kingma & Ba 2014, section 7.1): Adam with an infinity-norm second moment.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon),\quad
        \theta_t = \theta_{t-1} - \frac{\eta}{1-\beta_1^t}\,\frac{m_t}{u_t}

    with :math:`g_t = \pm\nabla f + \lambda\theta`. Same arguments, defaults and state (``step``,
    ``exp_avg``, ``exp_inf``) as ``torch.optim.Adamax``, plus the keyword-only ``fused`` extension.

    Args:
        params: parameters, named parameters or param-group dicts.
        lr: :math:`\eta` (float or 0-dim tensor, >= 0). Default 2e-3.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1). Default (0.9, 0.999).
        eps: :math:`\epsilon` (>= 0). Default 1e-8.
        weight_decay: :math:`\lambda` (>= 0). Default 0.
        foreach: multi-tensor path (default: see :func:`optimlab.optim._base.default_foreach`).
        maximize: ascend the objective. Default False.
        differentiable, capturable: not supported (``NotImplementedError`` when true).
        fused: optimlab extension (keyword-only, after torch's arguments; torch has no fused Adamax):
            the compiled fused step (:mod:`optimlab.optim._fused`); ``None`` (default) means off.
            Kept in ``defaults``, so a param group may override it.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        fused: bool | None = None,
    ) -> None:
        reject_unsupported(type(self).__name__, capturable=capturable)
        check_differentiable(differentiable, foreach=foreach, fused=fused)
        check_lr(lr)
        check_betas(betas)
        check_non_negative("eps", eps)
        check_non_negative("weight_decay", weight_decay)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "capturable": capturable,
            "fused": fused,
        }
        super().__init__(params, defaults)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("step", "exp_avg", "exp_inf")

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        beta1, beta2 = group["betas"]
        if resolve_fused(group["fused"], params, type(self).__name__):
            rule = _adamax_fused
        else:
            rule = _adamax_multi_tensor if self._use_foreach(group, params) else _adamax_single_tensor
        rule(
            real_views(params),
            real_views(grads),
            real_views([state["exp_avg"] for state in states]),
            real_views([state["exp_inf"] for state in states]),
            increment_steps(states),
            lr=as_float(group["lr"]),
            beta1=as_float(beta1),
            beta2=as_float(beta2),
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
        )
