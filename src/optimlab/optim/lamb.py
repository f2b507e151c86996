r"""LAMB: Layer-wise Adaptive Moments for Batch training (You et al., "Large Batch Optimization for
Deep Learning: Training BERT in 76 minutes", ICLR 2020, Algorithm 2).

Adam's direction plus decoupled weight decay, rescaled per tensor (layer) by a trust ratio:

.. math::
    m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
    r_t &= \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon} \qquad
        \text{(no bias correction when ``bias_correction=False``)} \\
    u_t &= r_t + \lambda x_{t-1} \\
    x_t &= x_{t-1} - \eta\, \frac{\phi(\|x_{t-1}\|)}{\|u_t\|}\, u_t

with :math:`\phi(z) = z` (optionally capped: the ratio is clamped to ``max_trust_ratio``) and the
ratio taken as 1 when either norm is 0. With ``cautious=True`` the Adam ratio :math:`r_t` is masked
to the components whose sign agrees with :math:`g_t` and rescaled (:mod:`optimlab.optim.cautious`,
Liang et al. 2024) before the weight decay and the trust ratio.

One rule, three paths: :func:`_lamb_tensor` is the rule for one tensor; the per-tensor reference
(:func:`lamb_step`) loops over it, the fused path (:func:`lamb_step_fused`) compiles it with
:mod:`optimlab.optim._fused` (moments, both norms and the update of a tensor in one compiled call),
and :func:`lamb_step_foreach` is its ``torch._foreach_*`` twin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from optimlab.optim._base import (
    OptimlabOptimizer,
    ParamsT,
    as_float,
    check_betas,
    check_lr,
    check_non_negative,
    foreach_groups,
    increment_steps,
    prepare_grad,
    prepare_grads,
)
from optimlab.optim._dtensor import host_values
from optimlab.optim._fused import DEFAULT_CHUNK_SIZE, fused_step, resolve_fused, split_by_value
from optimlab.optim.cautious import cautious_
from optimlab.optim.lars import trust_ratio
from optimlab.optim.registry import register

__all__ = ["LAMB", "lamb_step", "lamb_step_foreach", "lamb_step_fused"]

LARGE_TENSOR_BYTES = 1 << 19
"""Parameters of at least this many bytes (512 KiB) go to the compiled rule one per call. Within one call,
Inductor runs every tensor's first loop (moments, update, both norms) before any tensor's second loop
(the scaled update), so with a chunk of large tensors the second loop re-reads each update and parameter
from memory instead of cache (a chunk of 8 tensors of 512 KiB touches 8 x 5 buffers, more than a typical
L3 share, between the two loops of its first tensor). Measured here (fp32, one thread, interleaved medians
on a loaded machine): 20M parameters in 10 tensors, one per call is 2x faster than chunks of 8; in 100
tensors the two are within the noise. Small tensors keep chunks (per-call overhead dominates them)."""


def _bias_corrections(steps: Sequence[float], beta1: float, beta2: float, enabled: bool) -> tuple[list[float], list[float]]:
    if not enabled:
        return [1.0] * len(steps), [1.0] * len(steps)
    return [1 - beta1**t for t in steps], [1 - beta2**t for t in steps]


def _lamb_tensor(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, lr: float | Tensor, beta1: float | Tensor,
    beta2: float | Tensor, eps: float | Tensor, bias_correction1: float | Tensor, bias_correction2: float | Tensor,
    max_trust_ratio: float | Tensor, weight_decay: float, maximize: bool, cautious: bool = False,
) -> None:
    r"""The LAMB rule (module docstring) for one tensor, in place: what :func:`lamb_step` loops over and
    :func:`lamb_step_fused` compiles (the float arguments then arrive as 0-dim tensors; ``weight_decay`` and
    ``maximize`` are compile-time constants). ``bias_correction1/2`` are :math:`1-\beta_{1,2}^t` (1 without
    bias correction) and ``max_trust_ratio`` is the cap (``math.inf`` for none), so neither is a branch."""
    grad = prepare_grad(param, grad, maximize=maximize, weight_decay=0.0)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = exp_avg_sq.div(bias_correction2).sqrt_().add_(eps)
    update = exp_avg.div(bias_correction1).div_(denom)
    if cautious:
        cautious_(update, grad)
    if weight_decay != 0:
        update.add_(param, alpha=weight_decay)
    ratio = trust_ratio(param.norm(), update.norm(), max_ratio=max_trust_ratio)
    update.mul_(ratio)
    param.add_(update, alpha=-lr)


def lamb_step(
    params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[float], *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    bias_correction: bool, max_trust_ratio: float | None, maximize: bool, cautious: bool = False,
) -> None:
    """Per-tensor reference path of LAMB (module docstring): :func:`_lamb_tensor` on each tensor; ``steps``
    are the already incremented counts."""
    corrections1, corrections2 = _bias_corrections(steps, beta1, beta2, bias_correction)
    cap = math.inf if max_trust_ratio is None else max_trust_ratio
    for param, grad, exp_avg, exp_avg_sq, correction1, correction2 in zip(
        params, grads, exp_avgs, exp_avg_sqs, corrections1, corrections2
    ):
        _lamb_tensor(param, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                     bias_correction1=correction1, bias_correction2=correction2, max_trust_ratio=cap,
                     weight_decay=weight_decay, maximize=maximize, cautious=cautious)


def lamb_step_fused(
    params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[float], *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    bias_correction: bool, max_trust_ratio: float | None, maximize: bool, cautious: bool = False,
) -> None:
    """Fused path of LAMB: :func:`_lamb_tensor` compiled by :mod:`optimlab.optim._fused`, one call per
    distinct step count (a parameter that skipped steps has its own bias corrections), parameters of
    :data:`LARGE_TENSOR_BYTES` or more one per compiled call. Learning rate, betas, eps, bias corrections
    and the trust-ratio cap are data: a schedule never recompiles."""
    static = {"weight_decay": weight_decay, "maximize": maximize, **({"cautious": True} if cautious else {})}
    cap = math.inf if max_trust_ratio is None else max_trust_ratio
    for step, lists in split_by_value([list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)], steps):
        (correction1,), (correction2,) = _bias_corrections([step], beta1, beta2, bias_correction)
        scalars = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "bias_correction1": correction1,
                   "bias_correction2": correction2, "max_trust_ratio": cap}
        large = [param.numel() * param.element_size() >= LARGE_TENSOR_BYTES for param in lists[0]]
        for is_large, part in split_by_value(lists, large):
            fused_step(_lamb_tensor, static, 1 if is_large else DEFAULT_CHUNK_SIZE)(part, scalars)


def lamb_step_foreach(
    params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[float], *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    bias_correction: bool, max_trust_ratio: float | None, maximize: bool, cautious: bool = False,
) -> None:
    """Multi-tensor (``torch._foreach_*``) path of :func:`lamb_step`."""
    tensor_lists = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)]
    for (device_params, device_grads, device_exp_avgs, device_exp_avg_sqs), (device_steps,) in foreach_groups(
        tensor_lists, [steps]
    ):
        device_grads = prepare_grads(device_params, device_grads, maximize=maximize, weight_decay=0.0)
        corrections1, corrections2 = _bias_corrections(device_steps, beta1, beta2, bias_correction)
        torch._foreach_lerp_(device_exp_avgs, device_grads, 1 - beta1)
        torch._foreach_mul_(device_exp_avg_sqs, beta2)
        torch._foreach_addcmul_(device_exp_avg_sqs, device_grads, device_grads, value=1 - beta2)
        denoms = torch._foreach_div(device_exp_avg_sqs, corrections2)
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, eps)
        updates = torch._foreach_div(device_exp_avgs, corrections1)
        torch._foreach_div_(updates, denoms)
        if cautious:
            for update, grad in zip(updates, device_grads):
                cautious_(update, grad)
        if weight_decay != 0:
            torch._foreach_add_(updates, device_params, alpha=weight_decay)
        ratios = trust_ratio(torch.stack(torch._foreach_norm(device_params)), torch.stack(torch._foreach_norm(updates)),
                             max_ratio=max_trust_ratio)
        torch._foreach_mul_(updates, host_values(ratios))
        torch._foreach_add_(device_params, updates, alpha=-lr)


@register(
    names={"lamb": "LAMB (You et al. 2020)"},
    lr_bounds=(1e-5, 1e-1), default_lr=1e-3, state_bytes=8, fused=True, complex="rejected",
    checks={
        "default": {"lr": 0.01},
        "wd-max-trust": {"lr": 0.01, "weight_decay": 0.1, "max_trust_ratio": 2.0},
        "no-bias-correction-maximize": {"lr": 0.01, "bias_correction": False, "maximize": True},
        "cautious-wd": {"lr": 0.01, "weight_decay": 0.1, "cautious": True},
    },
    fused_check={"lr": 1e-2, "weight_decay": 0.1, "max_trust_ratio": 0.9},
)
class LAMB(OptimlabOptimizer):
    r"""LAMB (You et al. 2020): Adam direction + decoupled weight decay, scaled by a per-layer trust ratio.

    .. math::
        u_t = \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon} + \lambda x_{t-1},\qquad
        x_t = x_{t-1} - \eta\,\min\!\Big(\frac{\|x_{t-1}\|}{\|u_t\|}, r_{\max}\Big)\,u_t

    Args:
        params: parameters or param-group dicts.
        lr: learning rate :math:`\eta` (>= 0).
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: :math:`\epsilon` (>= 0), added to :math:`\sqrt{\hat v}`.
        weight_decay: :math:`\lambda` (>= 0), added to the direction before the trust ratio.
        bias_correction: divide the moments by :math:`1-\beta^t` (the paper's Algorithm 2 does).
        max_trust_ratio: upper clamp of the trust ratio (> 0), or ``None`` for none (:math:`\phi(z) = z`).
        maximize: ascend the objective instead.
        foreach: use the multi-tensor path (default: see :func:`optimlab.optim._base.default_foreach`).
        fused: the compiled fused step (:mod:`optimlab.optim._fused`, one compiled call per tensor for
            its moments, norms and update); ``None`` (default) means off. Falls back to the multi-tensor
            path, warning once, where compilation is unavailable. Kept in ``defaults`` and param groups.
        cautious: mask the Adam ratio to the components whose sign agrees with the gradient, rescaled
            (:mod:`optimlab.optim.cautious`, Liang et al. 2024). Default False.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        max_trust_ratio: float | None = None,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        cautious: bool = False,
    ) -> None:
        check_lr(lr)
        check_betas(betas)
        check_non_negative("eps", eps)
        check_non_negative("weight_decay", weight_decay)
        if max_trust_ratio is not None and not (max_trust_ratio > 0):
            raise ValueError(f"Invalid max_trust_ratio: {max_trust_ratio} (accepted range: > 0, or None)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        max_trust_ratio=max_trust_ratio, maximize=maximize, foreach=foreach, fused=fused,
                        cautious=bool(cautious))
        super().__init__(params, defaults)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("step", "exp_avg", "exp_avg_sq")

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        beta1, beta2 = (as_float(beta) for beta in group["betas"])
        options = dict(lr=as_float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                       weight_decay=group["weight_decay"], bias_correction=group["bias_correction"],
                       max_trust_ratio=group["max_trust_ratio"], maximize=group["maximize"],
                       cautious=group["cautious"])
        if resolve_fused(group["fused"], params, type(self).__name__):
            rule = lamb_step_fused
        else:
            rule = lamb_step_foreach if self._use_foreach(group, params) else lamb_step
        rule(params, grads, [state["exp_avg"] for state in states], [state["exp_avg_sq"] for state in states],
             increment_steps(states), **options)
