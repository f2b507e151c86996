r"""NAdam: Adam with Nesterov momentum and a warming momentum schedule.

With learning rate :math:`\eta`, betas :math:`(\beta_1, \beta_2)`, momentum decay :math:`\psi`,
:math:`\epsilon`, step :math:`t` and gradient :math:`g_t` (after ``maximize`` and coupled or decoupled
weight decay, see :func:`optimlab.optim._base.prepare_grad`):

.. math::
    \mu_t &= \beta_1\,\big(1 - \tfrac12\, 0.96^{t\psi}\big), \qquad
    \Pi_t = \prod_{s \le t} \mu_s \quad (\texttt{mu\_product}) \\
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
    d_t &= \sqrt{v_t / (1 - \beta_2^t)} + \epsilon \\
    \theta_t &= \theta_{t-1} - \eta\,\frac{1 - \mu_t}{1 - \Pi_t}\,\frac{g_t}{d_t}
        - \eta\,\frac{\mu_{t+1}}{1 - \Pi_t \mu_{t+1}}\,\frac{m_t}{d_t}

References: Dozat, "Incorporating Nesterov Momentum into Adam" (2016); decoupled weight decay from
Loshchilov & Hutter (2019).
"""

from __future__ import annotations

from types import MappingProxyType
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

__all__ = ["NAdam"]


def _momentum_coefficient(beta1: float, momentum_decay: float, step: float) -> float:
    r""":math:`\mu_t = \beta_1 (1 - \tfrac12 0.96^{t\psi})`."""
    return beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))


def _nadam_step_sizes(
    mu_product: Tensor, step: float, *, lr: float, beta1: float, momentum_decay: float
) -> tuple[float, float]:
    r"""Advance :math:`\Pi_t = \Pi_{t-1}\mu_t` in place (a 0-dim state tensor) and return the
    signed coefficients of :math:`g_t/d_t` and :math:`m_t/d_t` in the update (:func:`_nadam_coefficients`)."""
    mu_product.mul_(_momentum_coefficient(beta1, momentum_decay, step))
    return _nadam_coefficients(as_float(mu_product), step, lr=lr, beta1=beta1, momentum_decay=momentum_decay)


def _nadam_coefficients(
    product: float, step: float, *, lr: float, beta1: float, momentum_decay: float
) -> tuple[float, float]:
    r"""The signed coefficients :math:`-\eta(1-\mu_t)/(1-\Pi_t)` of :math:`g_t/d_t` and
    :math:`-\eta\mu_{t+1}/(1-\Pi_t\mu_{t+1})` of :math:`m_t/d_t`, given :math:`\Pi_t` (``product``)."""
    mu = _momentum_coefficient(beta1, momentum_decay, step)
    mu_next = _momentum_coefficient(beta1, momentum_decay, step + 1)
    return -lr * (1.0 - mu) / (1.0 - product), -lr * mu_next / (1.0 - product * mu_next)


def _nadam_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    mu_products: list[Tensor],
    steps: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    momentum_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    """Per-tensor reference path of the NAdam rule (module docstring): :func:`_nadam_tensor` per tensor;
    ``mu_products`` are 0-dim tensors updated in place."""
    for i, param in enumerate(params):
        grad_coefficient, exp_avg_coefficient = _nadam_step_sizes(
            mu_products[i], steps[i], lr=lr, beta1=beta1, momentum_decay=momentum_decay
        )
        for piece in loop_pieces(param, grads[i], exp_avgs[i], exp_avg_sqs[i]):
            _nadam_tensor(*piece, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                          bias_correction2=1 - beta2 ** steps[i], grad_coefficient=grad_coefficient,
                          exp_avg_coefficient=exp_avg_coefficient, weight_decay=weight_decay,
                          decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)


def _nadam_tensor(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float | Tensor,
    bias_correction2: float | Tensor,
    grad_coefficient: float | Tensor,
    exp_avg_coefficient: float | Tensor,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    r"""The NAdam rule (module docstring) for one tensor, in place, with ``bias_correction2``
    :math:`= 1 - \beta_2^t` and the step-dependent coefficients of :func:`_nadam_step_sizes`: what the
    per-tensor path loops over and the fused path compiles (:mod:`optimlab.optim._fused`, where the
    float arguments arrive as 0-dim tensors)."""
    grad = prepare_grad(param, grad, maximize=maximize, weight_decay=weight_decay, lr=lr,
                        decoupled=decoupled_weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = exp_avg_sq.div(bias_correction2).sqrt_() + eps  # not add_: sqrt_'s result is saved under autograd
    param.addcdiv_(grad, denom, value=grad_coefficient)
    param.addcdiv_(exp_avg, denom, value=exp_avg_coefficient)


def _nadam_multi_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    mu_products: list[Tensor],
    steps: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    momentum_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    """Multi-tensor (``torch._foreach_*``) path of the same rule as :func:`_nadam_single_tensor`."""
    for (device_params, device_grads, device_exp_avgs, device_exp_avg_sqs), (device_mu_products, device_steps) in (
        foreach_groups([params, grads, exp_avgs, exp_avg_sqs], [mu_products, steps])
    ):
        device_grads = prepare_grads(device_params, device_grads, maximize=maximize, weight_decay=weight_decay,
                                     lr=lr, decoupled=decoupled_weight_decay)
        coefficients = [
            _nadam_step_sizes(mu_product, step, lr=lr, beta1=beta1, momentum_decay=momentum_decay)
            for mu_product, step in zip(device_mu_products, device_steps)
        ]
        torch._foreach_lerp_(device_exp_avgs, device_grads, 1 - beta1)
        torch._foreach_mul_(device_exp_avg_sqs, beta2)
        torch._foreach_addcmul_(device_exp_avg_sqs, device_grads, device_grads, 1 - beta2)
        denoms = torch._foreach_div(device_exp_avg_sqs, [1 - beta2**step for step in device_steps])
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, eps)
        torch._foreach_addcdiv_(device_params, device_grads, denoms, [c for c, _ in coefficients])
        torch._foreach_addcdiv_(device_params, device_exp_avgs, denoms, [c for _, c in coefficients])


def _nadam_fused(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    mu_products: list[Tensor],
    steps: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    momentum_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    r"""Fused path of the same rule: :func:`_nadam_tensor` compiled by :mod:`optimlab.optim._fused`.

    The 0-dim ``mu_products`` (CPU state, as in ``torch.optim.NAdam``) advance in Python; the tensors are
    split by step count and then by :math:`\Pi_t` (equal for equal steps unless ``betas`` or
    ``momentum_decay`` changed during training), and each part's coefficients are computed once and
    passed as 0-dim tensors."""
    static = {"weight_decay": weight_decay, "decoupled_weight_decay": decoupled_weight_decay, "maximize": maximize}
    for step, lists in split_by_value([params, grads, exp_avgs, exp_avg_sqs, mu_products], steps):
        *tensor_lists, step_mu_products = lists
        torch._foreach_mul_(step_mu_products, _momentum_coefficient(beta1, momentum_decay, step))
        for product, part in split_by_value(tensor_lists, [float(mu_product) for mu_product in step_mu_products]):
            grad_coefficient, exp_avg_coefficient = _nadam_coefficients(
                product, step, lr=lr, beta1=beta1, momentum_decay=momentum_decay)
            fused_step(_nadam_tensor, static, elementwise=True)(part, {
                "lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "bias_correction2": 1 - beta2**step,
                "grad_coefficient": grad_coefficient, "exp_avg_coefficient": exp_avg_coefficient})


@register(
    names={"nadam": "NAdam (Dozat 2016)"},
    lr_bounds=(1e-5, 1e-1), default_lr=2e-3, reference=torch.optim.NAdam, state_bytes=8, fused=True,
    complex="supported",
    checks={
        "default": {"lr": 0.02},
        "momentum-decay": {"lr": 0.02, "momentum_decay": 0.05},
        "wd": {"lr": 0.02, "weight_decay": 0.1},
        "decoupled": {"lr": 0.02, "weight_decay": 0.1, "decoupled_weight_decay": True},
        "maximize": {"lr": 0.02, "betas": (0.8, 0.99), "maximize": True},
    },
    fused_check={"lr": 1e-2, "weight_decay": 0.1, "maximize": True, "decoupled_weight_decay": True},
)
class NAdam(OptimlabOptimizer):
    r"""NAdam (Dozat 2016): Adam with Nesterov momentum and the momentum schedule
    :math:`\mu_t = \beta_1(1 - \tfrac12 0.96^{t\psi})`.

    .. math::
        \theta_t = \theta_{t-1} - \eta\,\frac{1 - \mu_t}{1 - \Pi_t}\,\frac{g_t}{d_t}
            - \eta\,\frac{\mu_{t+1}}{1 - \Pi_t \mu_{t+1}}\,\frac{m_t}{d_t},\qquad
        d_t = \sqrt{v_t/(1-\beta_2^t)} + \epsilon,\quad \Pi_t = \textstyle\prod_{s\le t}\mu_s

    with Adam's moments :math:`m_t, v_t` and :math:`g_t = \pm\nabla f + \lambda\theta` (coupled) or
    :math:`\theta \leftarrow \theta(1-\eta\lambda)` first (``decoupled_weight_decay``, Loshchilov & Hutter 2019).

    Same arguments, defaults and state (``step``, ``mu_product``, ``exp_avg``, ``exp_avg_sq``) as
    ``torch.optim.NAdam``, plus the keyword-only ``fused`` extension.

    Args:
        params: parameters, named parameters or param-group dicts.
        lr: :math:`\eta` (float or 0-dim tensor, >= 0). Default 2e-3.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1). Default (0.9, 0.999).
        eps: :math:`\epsilon` (>= 0). Default 1e-8.
        weight_decay: :math:`\lambda` (>= 0). Default 0.
        momentum_decay: :math:`\psi` (>= 0). Default 4e-3.
        decoupled_weight_decay: AdamW-style decay. Default False.
        foreach: multi-tensor path (default: see :func:`optimlab.optim._base.default_foreach`).
        maximize: ascend the objective. Default False.
        capturable, differentiable: not supported (``NotImplementedError`` when true).
        fused: optimlab extension (keyword-only, after torch's arguments; torch has no fused NAdam):
            the compiled fused step (:mod:`optimlab.optim._fused`); ``None`` (default) means off.
            Kept in ``defaults``, so a param group may override it.
    """

    scalar_state_init = MappingProxyType({"mu_product": 1.0})

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        reject_unsupported(type(self).__name__, capturable=capturable)
        check_differentiable(differentiable, foreach=foreach, fused=fused)
        check_lr(lr)
        check_betas(betas)
        check_non_negative("eps", eps)
        check_non_negative("weight_decay", weight_decay)
        check_non_negative("momentum_decay", momentum_decay)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "momentum_decay": momentum_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
        }
        super().__init__(params, defaults)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("step", "mu_product", "exp_avg", "exp_avg_sq")

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        beta1, beta2 = group["betas"]
        if resolve_fused(group["fused"], params, type(self).__name__):
            rule = _nadam_fused
        else:
            rule = _nadam_multi_tensor if self._use_foreach(group, params) else _nadam_single_tensor
        rule(
            real_views(params),
            real_views(grads),
            real_views([state["exp_avg"] for state in states]),
            real_views([state["exp_avg_sq"] for state in states]),
            [state["mu_product"] for state in states],
            increment_steps(states),
            lr=as_float(group["lr"]),
            beta1=as_float(beta1),
            beta2=as_float(beta2),
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            momentum_decay=group["momentum_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            maximize=group["maximize"],
        )
