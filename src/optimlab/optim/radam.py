r"""RAdam: Adam with a rectified adaptive learning rate (no warm-up needed).

With learning rate :math:`\eta`, betas :math:`(\beta_1, \beta_2)`, :math:`\epsilon`, step :math:`t` and
gradient :math:`g_t` (after ``maximize`` and coupled or decoupled weight decay, see
:func:`optimlab.optim._base.prepare_grad`):

.. math::
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
    \rho_\infty &= \frac{2}{1 - \beta_2} - 1, \qquad
    \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t} \\
    r_t &= \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\,\rho_\infty}{(\rho_\infty - 4)(\rho_\infty - 2)\,\rho_t}} \\
    \theta_t &= \theta_{t-1} - \frac{\eta}{1 - \beta_1^t} \begin{cases}
        r_t\, \dfrac{\sqrt{1 - \beta_2^t}\; m_t}{\sqrt{v_t} + \epsilon} & \rho_t > 5 \\
        m_t & \text{otherwise (SGD with momentum while the variance is intractable)} \end{cases}

Reference: Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond" (2019/2020);
decoupled weight decay from Loshchilov & Hutter (2019).
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

__all__ = ["RAdam"]

_RECTIFICATION_THRESHOLD = 5.0  # rho_t above which the variance of the adaptive lr is tractable


def _radam_step_size(step: float, *, lr: float, beta1: float, beta2: float) -> tuple[float, bool]:
    r"""The signed step size and whether the adaptive (rectified) update applies at step ``t``:
    :math:`-\eta\, r_t \sqrt{1-\beta_2^t} / (1-\beta_1^t)` when :math:`\rho_t > 5`, else :math:`-\eta/(1-\beta_1^t)`.
    With ``step`` a tensor (under ``torch.compile``) both are 0-dim tensors."""
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
    if isinstance(rho_t, Tensor):  # under torch.compile (step a tensor): the switch as data, not a branch
        adaptive = rho_t > _RECTIFICATION_THRESHOLD
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)).clamp(min=0) ** 0.5
        return torch.where(adaptive, -lr * rect * bias_correction2**0.5 / bias_correction1,
                           -lr / bias_correction1), adaptive
    if rho_t > _RECTIFICATION_THRESHOLD:
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        return -lr * rect * bias_correction2**0.5 / bias_correction1, True
    return -lr / bias_correction1, False


def _radam_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    """Per-tensor reference path of the RAdam rule (module docstring): :func:`_radam_tensor` per tensor."""
    for i, param in enumerate(params):
        step_size, adaptive = _radam_step_size(steps[i], lr=lr, beta1=beta1, beta2=beta2)
        for piece in loop_pieces(param, grads[i], exp_avgs[i], exp_avg_sqs[i]):
            _radam_tensor(*piece, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                          step_size=step_size, adaptive=adaptive, weight_decay=weight_decay,
                          decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)


def _radam_tensor(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float | Tensor,
    step_size: float | Tensor,
    adaptive: bool,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    r"""The RAdam rule (module docstring) for one tensor, in place: what the per-tensor path loops over and
    the fused path compiles (:mod:`optimlab.optim._fused`, where the float arguments arrive as 0-dim tensors).

    ``step_size`` and ``adaptive`` (:math:`\rho_t > 5`) come from :func:`_radam_step_size`; ``adaptive``
    is a compile-time constant of the fused path, which therefore keeps two graphs (before and after
    the switch) rather than one per step."""
    grad = prepare_grad(param, grad, maximize=maximize, weight_decay=weight_decay, lr=lr,
                        decoupled=decoupled_weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if isinstance(adaptive, Tensor):  # under torch.compile: a denominator of 1 before the switch (exact)
        param.addcdiv_(exp_avg, torch.where(adaptive, exp_avg_sq.sqrt() + eps, 1.0), value=step_size)
    elif adaptive:
        param.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=step_size)
    else:
        param.add_(exp_avg, alpha=step_size)


def _radam_multi_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    """Multi-tensor (``torch._foreach_*``) path of the same rule as :func:`_radam_single_tensor`.

    Tensors in the rectified phase are batched into one ``addcdiv``, the others into one ``add``
    (they differ once parameters have missed steps)."""
    for (device_params, device_grads, device_exp_avgs, device_exp_avg_sqs), (device_steps,) in foreach_groups(
        [params, grads, exp_avgs, exp_avg_sqs], [steps]
    ):
        device_grads = prepare_grads(device_params, device_grads, maximize=maximize, weight_decay=weight_decay,
                                     lr=lr, decoupled=decoupled_weight_decay)
        torch._foreach_lerp_(device_exp_avgs, device_grads, 1 - beta1)
        torch._foreach_mul_(device_exp_avg_sqs, beta2)
        torch._foreach_addcmul_(device_exp_avg_sqs, device_grads, device_grads, 1 - beta2)
        step_sizes = [_radam_step_size(step, lr=lr, beta1=beta1, beta2=beta2) for step in device_steps]
        rectified = [j for j, (_, adaptive) in enumerate(step_sizes) if adaptive]
        plain = [j for j, (_, adaptive) in enumerate(step_sizes) if not adaptive]
        if rectified:
            denoms = torch._foreach_sqrt([device_exp_avg_sqs[j] for j in rectified])
            torch._foreach_add_(denoms, eps)
            torch._foreach_addcdiv_([device_params[j] for j in rectified], [device_exp_avgs[j] for j in rectified],
                                    denoms, [step_sizes[j][0] for j in rectified])
        if plain:
            scaled = torch._foreach_mul([device_exp_avgs[j] for j in plain], [step_sizes[j][0] for j in plain])
            torch._foreach_add_([device_params[j] for j in plain], scaled)


def _radam_fused(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    """Fused path of the same rule: :func:`_radam_tensor` compiled by :mod:`optimlab.optim._fused`. The step
    size is computed once per distinct step count and passed as a 0-dim tensor; whether the rectified
    update applies selects one of two compiled rules (``adaptive`` is constant in each)."""
    static = {"weight_decay": weight_decay, "decoupled_weight_decay": decoupled_weight_decay, "maximize": maximize}
    for step, lists in split_by_value([params, grads, exp_avgs, exp_avg_sqs], steps):
        step_size, adaptive = _radam_step_size(step, lr=lr, beta1=beta1, beta2=beta2)
        fused_step(_radam_tensor, dict(static, adaptive=adaptive), elementwise=True)(lists, {
            "lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "step_size": step_size})


@register(
    names={"radam": "RAdam (Liu et al. 2019)"},
    lr_bounds=(1e-5, 1e-1), default_lr=1e-3, reference=torch.optim.RAdam, state_bytes=8, fused=True,
    complex="supported",
    checks={
        "default": {"lr": 0.02},
        "beta2-0.99": {"lr": 0.02, "betas": (0.9, 0.99)},
        "wd": {"lr": 0.02, "betas": (0.9, 0.99), "weight_decay": 0.1},
        "decoupled": {"lr": 0.02, "weight_decay": 0.1, "decoupled_weight_decay": True},
        "maximize": {"lr": 0.02, "betas": (0.85, 0.98), "maximize": True},
    },
    fused_check={"lr": 1e-2, "weight_decay": 0.1, "maximize": True, "decoupled_weight_decay": True},
)
class RAdam(OptimlabOptimizer):
    r"""RAdam (Liu et al. 2019): Adam whose adaptive step is switched on and rectified by
    :math:`r_t` once the variance of the adaptive learning rate is tractable (:math:`\rho_t > 5`).

    .. math::
        \theta_t = \theta_{t-1} - \frac{\eta}{1-\beta_1^t}\begin{cases}
            r_t \sqrt{1-\beta_2^t}\, m_t / (\sqrt{v_t} + \epsilon) & \rho_t > 5 \\ m_t & \text{otherwise}\end{cases}

    with Adam's moments, :math:`\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)`,
    :math:`\rho_\infty = 2/(1-\beta_2) - 1` and
    :math:`r_t = \sqrt{(\rho_t-4)(\rho_t-2)\rho_\infty / ((\rho_\infty-4)(\rho_\infty-2)\rho_t)}`.
    Coupled (:math:`g_t = \pm\nabla f + \lambda\theta`) or decoupled weight decay (Loshchilov & Hutter 2019).

    Same arguments, defaults and state (``step``, ``exp_avg``, ``exp_avg_sq``) as ``torch.optim.RAdam``,
    plus the keyword-only ``fused`` extension.

    Args:
        params: parameters, named parameters or param-group dicts.
        lr: :math:`\eta` (float or 0-dim tensor, >= 0). Default 1e-3.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1). Default (0.9, 0.999).
        eps: :math:`\epsilon` (>= 0). Default 1e-8.
        weight_decay: :math:`\lambda` (>= 0). Default 0.
        decoupled_weight_decay: AdamW-style decay. Default False.
        foreach: multi-tensor path (default: see :func:`optimlab.optim._base.default_foreach`).
        maximize: ascend the objective. Default False.
        capturable, differentiable: not supported (``NotImplementedError`` when true).
        fused: optimlab extension (keyword-only, after torch's arguments; torch has no fused RAdam):
            the compiled fused step (:mod:`optimlab.optim._fused`); ``None`` (default) means off.
            Kept in ``defaults``, so a param group may override it.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
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
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "decoupled_weight_decay": decoupled_weight_decay,
            "differentiable": differentiable,
            "fused": fused,
        }
        super().__init__(params, defaults)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("step", "exp_avg", "exp_avg_sq")

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        beta1, beta2 = group["betas"]
        if resolve_fused(group["fused"], params, type(self).__name__):
            rule = _radam_fused
        else:
            rule = _radam_multi_tensor if self._use_foreach(group, params) else _radam_single_tensor
        rule(
            real_views(params),
            real_views(grads),
            real_views([state["exp_avg"] for state in states]),
            real_views([state["exp_avg_sq"] for state in states]),
            increment_steps(states),
            lr=as_float(group["lr"]),
            beta1=as_float(beta1),
            beta2=as_float(beta2),
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            maximize=group["maximize"],
        )
