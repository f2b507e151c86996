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

__all__ = ["LARS", "lars_step", "lars_step_foreach", "trust_ratios"]


def trust_ratios(param_norms: Sequence[Tensor], update_norms: Sequence[Tensor], *, coefficient: float = 1.0,
                 extra: Sequence[Tensor] | None = None, eps: float = 0.0, max_ratio: float | None = None) -> list[float]:
    r"""Layer-wise trust ratios :math:`\eta\,\|w\| / (\|u\| + \text{extra} + \epsilon)`, 1 where a norm is 0.

    The shared rule of LARS (:math:`\text{extra} = \beta\|w\|`) and LAMB (:math:`\eta = 1`, extra 0,
    optional upper clamp ``max_ratio``). Takes 0-dim norm tensors, returns Python floats.
    """
    weight = torch.stack(list(param_norms))
    update = torch.stack(list(update_norms))
    denominator = update + torch.stack(list(extra)) + eps if extra is not None else update + eps
    ratio = coefficient * weight / denominator
    if max_ratio is not None:
        ratio = ratio.clamp(max=max_ratio)
    ratio = torch.where((weight > 0) & (update > 0), ratio, torch.ones_like(ratio))
    return ratio.tolist()


def lars_step(
    params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor], *,
    lr: float, momentum: float, weight_decay: float, trust_coefficient: float, eps: float, adapt: bool,
    maximize: bool,
) -> None:
    """Per-tensor reference path of LARS (module docstring); ``adapt=False`` means :math:`\\lambda^l = 1`."""
    for param, grad, buffer in zip(params, grads, momentum_buffers):
        grad = prepare_grad(param, grad, maximize=maximize, weight_decay=0.0)
        direction = prepare_grad(param, grad, maximize=False, weight_decay=weight_decay)
        if adapt:
            param_norm = param.norm()
            (ratio,) = trust_ratios([param_norm], [grad.norm()], coefficient=trust_coefficient,
                                    extra=[param_norm * weight_decay], eps=eps)
            direction = direction.mul(ratio)
        buffer.mul_(momentum).add_(direction, alpha=lr)
        param.sub_(buffer)


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
            param_norms = torch._foreach_norm(device_params)
            ratios = trust_ratios(param_norms, torch._foreach_norm(device_grads), coefficient=trust_coefficient,
                                  extra=torch._foreach_mul(param_norms, weight_decay), eps=eps)
            directions = torch._foreach_mul(directions, ratios)
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, directions, alpha=lr)
        torch._foreach_sub_(device_params, buffers)


class LARS(OptimlabOptimizer):
    r"""LARS (You et al. 2017): SGD with momentum and a per-layer trust ratio.

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
        foreach: use the multi-tensor path (default: when the tensors are on CPU/CUDA).
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
    ) -> None:
        check_lr(lr)
        check_in_range("momentum", momentum, 0.0, 1.0)
        check_non_negative("weight_decay", weight_decay)
        if not (trust_coefficient > 0):
            raise ValueError(f"Invalid trust_coefficient: {trust_coefficient} (accepted range: > 0)")
        check_non_negative("eps", eps)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        eps=eps, exclude_bias_and_norm=exclude_bias_and_norm, maximize=maximize, foreach=foreach)
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
        rule = lars_step_foreach if self._use_foreach(group, params) else lars_step
        for adapt in (True, False):
            chosen = [i for i, is_excluded in enumerate(excluded) if is_excluded != adapt]
            if not chosen:
                continue
            tensors = [[tensor_list[i] for i in chosen] for tensor_list in (params, grads, buffers)]
            rule(*tensors, weight_decay=group["weight_decay"] if adapt else 0.0, adapt=adapt, **options)
