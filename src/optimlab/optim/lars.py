r"""LARS: Layer-wise Adaptive Rate Scaling (You, Gitman & Ginsburg, "Large Batch Training of
Convolutional Networks", 2017, Algorithm 1).

Each tensor (layer) :math:`w` gets its own local learning rate from the ratio of its norm to the norm
of its (weight-decayed) gradient, so every layer moves by about the same relative amount:

.. math::
    \lambda^{l} &= \eta\, \frac{\|w\|}{\|\nabla L(w)\| + \beta \|w\| + \epsilon}
        \qquad (\lambda^l = 1 \text{ if } \|w\| = 0 \text{ or } \|\nabla L(w)\| = 0) \\
    v &\leftarrow m\, v + \gamma\, \lambda^{l}\, (\nabla L(w) + \beta w) \\
    w &\leftarrow w - v

with global learning rate :math:`\gamma`, trust coefficient :math:`\eta`, weight decay :math:`\beta`
and momentum :math:`m` (the learning rate sits inside the momentum buffer, as in the paper). Biases
and normalisation gains (tensors with at most one dimension) are excluded from both the adaptation
and the weight decay by default (``exclude_bias_and_norm``), common practice since
Goyal et al. 2017 / SimCLR (Chen et al. 2020): for them :math:`\lambda^l = 1` and :math:`\beta = 0`.

One rule, three paths: :func:`_lars_tensor` is the rule for one tensor; the per-tensor reference
(:func:`lars_step`) loops over it, the fused path (:func:`lars_step_fused`) compiles it with
:mod:`optimlab.optim._fused` (both norms and the update in one compiled call per tensor), and
:func:`lars_step_foreach` is its ``torch._foreach_*`` twin. The trust ratio (:func:`trust_ratio`) is
shared with LAMB and written without a data-dependent branch, so it compiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from optimlab.optim._base import (
    OptimlabOptimizer,
    ParamsT,
    as_float,
    check_in_range,
    check_lr,
    check_non_negative,
    foreach_groups,
    prepare_grad,
    prepare_grads,
)
from optimlab.optim._dtensor import host_values
from optimlab.optim._fused import fused_step, resolve_fused
from optimlab.optim.registry import register

__all__ = ["LARS", "lars_step", "lars_step_foreach", "lars_step_fused", "trust_ratio"]


def trust_ratio(weight_norm: Tensor, update_norm: Tensor, *, coefficient: float | Tensor | None = None,
                extra: float | Tensor | None = None, eps: float | Tensor | None = None,
                max_ratio: float | Tensor | None = None) -> Tensor:
    r"""Layer-wise trust ratio, elementwise over the norms (0-dim for one tensor, or stacked for many):

    .. math::
        r = \begin{cases} \min\!\big(\eta\,\|w\| / (\|u\| + \text{extra} + \epsilon),\ r_{\max}\big)
                & \|w\| > 0 \text{ and } \|u\| > 0 \\ 1 & \text{otherwise} \end{cases}

    The shared rule of LARS (You et al. 2017: :math:`\eta` the trust coefficient,
    :math:`\text{extra} = \beta\|w\|`) and LAMB (You et al. 2020: :math:`\eta = 1`, no extra term, optional
    cap :math:`r_{\max}`); an argument left at ``None`` drops its term (:math:`\eta = 1`, no extra, no
    :math:`\epsilon`, no cap). The zero-norm case is a ``torch.where``, not a Python branch, so the rule
    compiles to one graph and never synchronises with the device; the terms may be floats or 0-dim
    tensors (as the fused path passes them). No float defaults: under ``torch.compile`` those would
    become inputs of the compiled graph.
    """
    numerator = weight_norm if coefficient is None else coefficient * weight_norm
    denominator = update_norm if extra is None else update_norm + extra
    if eps is not None:
        denominator = denominator + eps
    ratio = numerator / denominator
    if max_ratio is not None:
        ratio = ratio.clamp(max=max_ratio)
    return torch.where((weight_norm > 0) & (update_norm > 0), ratio, 1.0)


def _lars_tensor(
    param: Tensor, grad: Tensor, momentum_buffer: Tensor, *, lr: float | Tensor, momentum: float | Tensor,
    trust_coefficient: float | Tensor, eps: float | Tensor, weight_decay: float, adapt: bool, maximize: bool,
) -> None:
    r"""The LARS rule (module docstring) for one tensor, in place: what :func:`lars_step` loops over and
    :func:`lars_step_fused` compiles (the float arguments then arrive as 0-dim tensors; ``weight_decay``,
    ``adapt`` and ``maximize`` are compile-time constants). ``adapt=False`` means :math:`\lambda^l = 1`."""
    grad = prepare_grad(param, grad, maximize=maximize, weight_decay=0.0)
    direction = prepare_grad(param, grad, maximize=False, weight_decay=weight_decay)
    if adapt:
        param_norm = param.norm()
        ratio = trust_ratio(param_norm, grad.norm(), coefficient=trust_coefficient, extra=param_norm * weight_decay,
                            eps=eps)
        direction = direction.mul(ratio)
    momentum_buffer.mul_(momentum).add_(direction, alpha=lr)
    param.sub_(momentum_buffer)


def lars_step(
    params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor], *,
    lr: float, momentum: float, weight_decay: float, trust_coefficient: float, eps: float, adapt: bool,
    maximize: bool,
) -> None:
    """Per-tensor reference path of LARS (module docstring): :func:`_lars_tensor` on each tensor."""
    for param, grad, buffer in zip(params, grads, momentum_buffers):
        _lars_tensor(param, grad, buffer, lr=lr, momentum=momentum, trust_coefficient=trust_coefficient, eps=eps,
                     weight_decay=weight_decay, adapt=adapt, maximize=maximize)


def lars_step_fused(
    params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor], *,
    lr: float, momentum: float, weight_decay: float, trust_coefficient: float, eps: float, adapt: bool,
    maximize: bool,
) -> None:
    """Fused path of LARS: :func:`_lars_tensor` compiled by :mod:`optimlab.optim._fused`, both norms, the
    trust ratio and the momentum update of a tensor in one compiled call. ``lr``, ``momentum``,
    ``trust_coefficient`` and ``eps`` are data (a schedule never recompiles); without adaptation the
    rule is elementwise, so those tensors (biases, norm gains) may be concatenated."""
    fused_step(_lars_tensor, {"weight_decay": weight_decay, "adapt": adapt, "maximize": maximize},
               elementwise=not adapt)([list(params), list(grads), list(momentum_buffers)],
                                      {"lr": lr, "momentum": momentum, "trust_coefficient": trust_coefficient,
                                       "eps": eps})


def lars_step_foreach(
    params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor], *,
    lr: float, momentum: float, weight_decay: float, trust_coefficient: float, eps: float, adapt: bool,
    maximize: bool,
) -> None:
    """Multi-tensor (``torch._foreach_*``) path of :func:`lars_step`."""
    for (device_params, device_grads, buffers), _ in foreach_groups([list(params), list(grads), list(momentum_buffers)]):
        device_grads = prepare_grads(device_params, device_grads, maximize=maximize, weight_decay=0.0)
        directions = prepare_grads(device_params, device_grads, maximize=False, weight_decay=weight_decay)
        if adapt:
            param_norms = torch.stack(torch._foreach_norm(device_params))
            ratios = trust_ratio(param_norms, torch.stack(torch._foreach_norm(device_grads)),
                                 coefficient=trust_coefficient, extra=param_norms * weight_decay, eps=eps)
            directions = torch._foreach_mul(directions, host_values(ratios))
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, directions, alpha=lr)
        torch._foreach_sub_(device_params, buffers)


@register(
    names={"lars": "LARS, momentum 0.9 (You et al. 2017)"},
    lr_bounds=(1e-2, 1e2), default_lr=1.0, state_bytes=4, fused=True, complex="supported",
    checks={
        "default": {"lr": 0.5, "trust_coefficient": 0.02},
        "wd-adapt-all": {"lr": 0.5, "trust_coefficient": 0.02, "weight_decay": 0.01, "exclude_bias_and_norm": False},
        "maximize": {"lr": 0.2, "momentum": 0.5, "trust_coefficient": 0.05, "maximize": True},
    },
    fused_check={"lr": 0.5, "trust_coefficient": 0.02, "weight_decay": 0.01},
)
class LARS(OptimlabOptimizer):
    r"""LARS (You et al. 2017): SGD with momentum and a per-layer trust ratio.

    .. math::
        \lambda^l = \eta\,\frac{\|w\|}{\|\nabla L(w)\| + \beta\|w\| + \epsilon},\quad
        v \leftarrow m\,v + \gamma\,\lambda^l\,(\nabla L(w) + \beta w),\quad w \leftarrow w - v

    Args:
        params: parameters or param-group dicts.
        lr: global learning rate :math:`\gamma` (>= 0); with the default trust coefficient the
            per-step relative change of a layer is about :math:`\gamma\eta`.
        momentum: :math:`m` in [0, 1).
        weight_decay: :math:`\beta` (>= 0), L2 added to the gradient.
        trust_coefficient: :math:`\eta` (> 0), 0.001 in the paper.
        eps: added to the trust-ratio denominator (>= 0).
        exclude_bias_and_norm: tensors with ``ndim <= 1`` get no adaptation and no weight decay.
        maximize: ascend the objective instead.
        foreach: use the multi-tensor path (default: see :func:`optimlab.optim._base.default_foreach`).
        fused: the compiled fused step (:mod:`optimlab.optim._fused`, one compiled call per tensor for
            its norms and update); ``None`` (default) means off. Falls back to the multi-tensor path,
            warning once, where compilation is unavailable. Kept in ``defaults`` and param groups.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
        eps: float = 1e-8,
        exclude_bias_and_norm: bool = True,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        check_lr(lr)
        check_in_range("momentum", momentum, 0.0, 1.0)
        check_non_negative("weight_decay", weight_decay)
        if not (trust_coefficient > 0):
            raise ValueError(f"Invalid trust_coefficient: {trust_coefficient} (accepted range: > 0)")
        check_non_negative("eps", eps)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        eps=eps, exclude_bias_and_norm=exclude_bias_and_norm, maximize=maximize, foreach=foreach,
                        fused=fused)
        super().__init__(params, defaults)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",)

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        buffers = [state["momentum_buffer"] for state in states]
        excluded = [group["exclude_bias_and_norm"] and param.dim() <= 1 for param in params]
        options = dict(lr=as_float(group["lr"]), momentum=group["momentum"], trust_coefficient=group["trust_coefficient"],
                       eps=group["eps"], maximize=group["maximize"])
        if resolve_fused(group["fused"], params, type(self).__name__):
            rule = lars_step_fused
        else:
            rule = lars_step_foreach if self._use_foreach(group, params) else lars_step
        for adapt in (True, False):
            chosen = [i for i, is_excluded in enumerate(excluded) if is_excluded != adapt]
            if not chosen:
                continue
            tensors = [[tensor_list[i] for i in chosen] for tensor_list in (params, grads, buffers)]
            rule(*tensors, weight_decay=group["weight_decay"] if adapt else 0.0, adapt=adapt, **options)
