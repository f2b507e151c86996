r"""AdaGrad: per-coordinate learning rates from the sum of squared gradients.

With learning rate :math:`\eta`, learning-rate decay :math:`\delta`, :math:`\epsilon`, step :math:`t`,
initial accumulator :math:`s_0` and gradient :math:`g_t` (after ``maximize`` and weight decay, see
:func:`optimlab.optim._base.prepare_grad`):

.. math::
    \tilde\eta_t &= \frac{\eta}{1 + (t - 1)\,\delta} \\
    s_t &= s_{t-1} + g_t^2 \\
    \theta_t &= \theta_{t-1} - \tilde\eta_t\, \frac{g_t}{\sqrt{s_t} + \epsilon}

Sparse gradients update only the rows they touch. Reference: Duchi, Hazan & Singer, "Adaptive
Subgradient Methods for Online Learning and Stochastic Optimization" (2011).
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
    check_lr,
    check_non_negative,
    foreach_groups,
    increment_steps,
    loop_pieces,
    new_step_tensor,
    prepare_grad,
    prepare_grads,
    real_views,
)
from optimlab.optim._fused import fused_step, resolve_fused, split_by_value
from optimlab.optim.registry import register

__all__ = ["Adagrad"]


def _decayed_lr(lr: float, lr_decay: float, step: float) -> float:
    r""":math:`\eta / (1 + (t - 1)\delta)`."""
    return lr / (1 + (step - 1) * lr_decay)


def _sparse_like(grad: Tensor, values: Tensor) -> Tensor:
    """A sparse tensor with ``grad``'s (coalesced) indices and the given values."""
    return torch.sparse_coo_tensor(grad._indices(), values, grad.size(), check_invariants=False)


def _adagrad_sparse_update(param: Tensor, grad: Tensor, state_sum: Tensor, *, lr: float, eps: float) -> None:
    """The AdaGrad rule restricted to the rows a sparse gradient touches."""
    grad = grad.coalesce()  # the update is non-linear in g, so each index must appear once
    grad_values = grad._values()
    state_sum.add_(_sparse_like(grad, grad_values.pow(2)))
    std_values = state_sum.sparse_mask(grad)._values().sqrt_().add_(eps)
    param.add_(_sparse_like(grad, grad_values / std_values), alpha=-lr)


def _adagrad_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    state_sums: list[Tensor],
    steps: list[float],
    *,
    lr: float,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
) -> None:
    """Per-tensor reference path of the AdaGrad rule (module docstring); handles sparse gradients."""
    for i, param in enumerate(params):
        for piece in loop_pieces(param, grads[i], state_sums[i]):
            _adagrad_tensor(*piece, decayed_lr=_decayed_lr(lr, lr_decay, steps[i]), eps=eps,
                            weight_decay=weight_decay, maximize=maximize)


def _adagrad_tensor(
    param: Tensor, grad: Tensor, state_sum: Tensor, *, decayed_lr: float | Tensor, eps: float | Tensor,
    weight_decay: float, maximize: bool,
) -> None:
    """The AdaGrad rule (module docstring) for one tensor, in place: what the per-tensor path loops over and
    the fused path compiles (:mod:`optimlab.optim._fused`, ``decayed_lr`` and ``eps`` then 0-dim tensors)."""
    grad = prepare_grad(param, grad, maximize=maximize, weight_decay=weight_decay)
    if grad.is_sparse:
        _adagrad_sparse_update(param, grad, state_sum, lr=decayed_lr, eps=eps)
        return
    state_sum.addcmul_(grad, grad, value=1)
    std = state_sum.sqrt() + eps  # not in place: sqrt's result is saved under autograd (differentiable)
    param.addcdiv_(grad, std, value=-decayed_lr)


def _adagrad_fused(
    params: list[Tensor],
    grads: list[Tensor],
    state_sums: list[Tensor],
    steps: list[float],
    *,
    lr: float,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
) -> None:
    """Fused path of the same rule: :func:`_adagrad_tensor` compiled by :mod:`optimlab.optim._fused`, the decayed
    learning rate computed once per distinct step count."""
    for step, lists in split_by_value([params, grads, state_sums], steps):
        fused_step(_adagrad_tensor, {"weight_decay": weight_decay, "maximize": maximize}, elementwise=True)(
            lists, {"decayed_lr": _decayed_lr(lr, lr_decay, step), "eps": eps})


def _adagrad_multi_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    state_sums: list[Tensor],
    steps: list[float],
    *,
    lr: float,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
) -> None:
    """Multi-tensor (``torch._foreach_*``) path of the same rule as :func:`_adagrad_single_tensor` (dense only)."""
    for (device_params, device_grads, device_state_sums), (device_steps,) in foreach_groups(
        [params, grads, state_sums], [steps]
    ):
        device_grads = prepare_grads(device_params, device_grads, maximize=maximize, weight_decay=weight_decay)
        torch._foreach_addcmul_(device_state_sums, device_grads, device_grads, 1)
        stds = torch._foreach_sqrt(device_state_sums)
        torch._foreach_add_(stds, eps)
        step_sizes = [-_decayed_lr(lr, lr_decay, step) for step in device_steps]
        torch._foreach_addcdiv_(device_params, device_grads, stds, step_sizes)


@register(
    names={"adagrad": "AdaGrad (Duchi et al. 2011)"},
    lr_bounds=(1e-4, 1.0), default_lr=1e-2, reference=torch.optim.Adagrad, state_bytes=4, fused=True,
    complex="supported",
    checks={
        "default": {"lr": 0.1},
        "lr-decay": {"lr": 0.1, "lr_decay": 0.05},
        "initial-accumulator": {"lr": 0.1, "initial_accumulator_value": 0.5, "eps": 1e-6},
        "wd-maximize": {"lr": 0.1, "weight_decay": 0.1, "maximize": True, "lr_decay": 0.01},
    },
    fused_check={"lr": 1e-1, "lr_decay": 0.01, "weight_decay": 0.01, "initial_accumulator_value": 0.1},
)
class Adagrad(OptimlabOptimizer):
    r"""AdaGrad (Duchi, Hazan & Singer 2011).

    .. math::
        s_t = s_{t-1} + g_t^2, \qquad
        \theta_t = \theta_{t-1} - \frac{\eta}{1 + (t-1)\delta}\,\frac{g_t}{\sqrt{s_t} + \epsilon}

    with :math:`s_0` = ``initial_accumulator_value`` and :math:`g_t = \pm\nabla f + \lambda\theta`.

    Same arguments, defaults and state (``step``, ``sum``; created at construction, as torch does)
    as ``torch.optim.Adagrad``. Sparse gradients are supported (without weight decay). Unlike
    torch, each param group's own ``initial_accumulator_value`` is honoured.

    Args:
        params: parameters, named parameters or param-group dicts.
        lr: :math:`\eta` (float or 0-dim tensor, >= 0). Default 1e-2.
        lr_decay: :math:`\delta` (>= 0). Default 0.
        weight_decay: :math:`\lambda` (>= 0). Default 0.
        initial_accumulator_value: :math:`s_0` (>= 0). Default 0.
        eps: :math:`\epsilon` (>= 0). Default 1e-10.
        foreach: multi-tensor path (default: see :func:`optimlab.optim._base.default_foreach`; dense gradients only).
        maximize: ascend the objective. Default False.
        fused: the compiled fused step (:mod:`optimlab.optim._fused`); ``None`` (default) means off.
        differentiable: not supported (``NotImplementedError`` when true).
    """

    supports_sparse = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        check_differentiable(differentiable, foreach=foreach, fused=fused)
        check_lr(lr)
        check_non_negative("lr_decay", lr_decay)
        check_non_negative("weight_decay", weight_decay)
        check_non_negative("initial_accumulator_value", initial_accumulator_value)
        check_non_negative("eps", eps)
        defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "fused": fused,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._init_group(group, group["params"])

    def _init_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        for param in params:
            state = self.state[param]
            if not state:
                value = group["initial_accumulator_value"]
                state["step"] = new_step_tensor()
                state["sum"] = torch.full_like(
                    param, complex(value, value) if param.is_complex() else value,
                    memory_format=torch.preserve_format,
                )

    def share_memory(self) -> None:
        """Move each ``sum`` accumulator to shared memory (for Hogwild-style multiprocessing), as torch does."""
        for group in self.param_groups:
            for param in group["params"]:
                self.state[param]["sum"].share_memory_()

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        if resolve_fused(group["fused"], params, type(self).__name__):
            rule = _adagrad_fused
        else:
            rule = _adagrad_multi_tensor if self._use_foreach(group, params) else _adagrad_single_tensor
        rule(
            real_views(params),
            real_views(grads),
            real_views([state["sum"] for state in states]),
            increment_steps(states),
            lr=as_float(group["lr"]),
            lr_decay=group["lr_decay"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )
