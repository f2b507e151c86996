r"""Lion: EvoLved Sign Momentum (Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023).

The paper's Algorithm 2, with gradient :math:`g_t`, momentum :math:`m`, learning rate :math:`\eta`
and decoupled weight decay :math:`\lambda`:

.. math::
    c_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
    \theta_t &= \theta_{t-1} - \eta\,\big(\operatorname{sign}(c_t) + \lambda\,\theta_{t-1}\big) \\
    m_t &= \beta_2 m_{t-1} + (1 - \beta_2) g_t

Only one moment is kept (4 bytes per parameter in float32, 2 in bfloat16, about 1 in int8).
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
    check_betas,
    check_lr,
    check_non_negative,
    group_by_device_and_dtype,
)
from optimlab.optim.lowp_state import (
    init_moment,
    load_moments,
    register_state_dtype_restore,
    resolve_state_dtype,
    store_moments,
)

__all__ = ["Lion", "lion_step", "lion_step_foreach"]


def lion_step(
    params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], *,
    lr: float, beta1: float, beta2: float, weight_decay: float,
) -> None:
    """Per-tensor reference path of the Lion rule (module docstring), updating ``params`` and ``exp_avgs`` in place."""
    for param, grad, exp_avg in zip(params, grads, exp_avgs):
        update = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1).sign_()
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        param.add_(update, alpha=-lr)
        exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)


def lion_step_foreach(
    params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], *,
    lr: float, beta1: float, beta2: float, weight_decay: float,
) -> None:
    """Multi-tensor (``torch._foreach_*``) path of the same rule as :func:`lion_step`; all tensors share device and dtype."""
    updates = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(updates, grads, alpha=1 - beta1)
    torch._foreach_sign_(updates)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_add_(params, updates, alpha=-lr)
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta2)


class Lion(OptimlabOptimizer):
    r"""Lion (Chen et al. 2023, Algorithm 2): sign of an interpolated momentum, decoupled weight decay.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate :math:`\eta` (>= 0). Lion wants an lr 3-10x smaller than AdamW's.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1): interpolation for the update, decay of the momentum.
        weight_decay: decoupled weight decay :math:`\lambda` (>= 0), applied as :math:`\theta \leftarrow \theta(1 - \eta\lambda)`.
        maximize: ascend the objective instead.
        foreach: use the multi-tensor path (default: when the tensors are on CPU/CUDA).
        state_dtype: storage of the momentum: ``None`` (the parameter's dtype), ``"bfloat16"`` or
            ``"int8"`` (block-wise quantised, :mod:`optimlab.optim.lowp_state`). Updates are computed
            in the parameter's dtype either way.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        state_dtype: str | torch.dtype | None = None,
    ) -> None:
        check_lr(lr)
        check_betas(betas)
        check_non_negative("weight_decay", weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, maximize=maximize, foreach=foreach,
                        state_dtype=resolve_state_dtype(state_dtype))
        super().__init__(params, defaults)
        register_state_dtype_restore(self, ("exp_avg",))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (``torch.optim`` semantics), validating its ``state_dtype``."""
        super().add_param_group(param_group)
        self.param_groups[-1]["state_dtype"] = resolve_state_dtype(self.param_groups[-1]["state_dtype"])

    def _init_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        for param in params:
            state = self.state[param]
            if not state:
                init_moment(state, "exp_avg", param, group["state_dtype"], signed=True)

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        exp_avgs = load_moments(states, "exp_avg", params, signed=True)
        beta1, beta2 = group["betas"]
        options = dict(lr=as_float(group["lr"]), beta1=as_float(beta1), beta2=as_float(beta2),
                       weight_decay=group["weight_decay"])
        if self._use_foreach(group, params):
            grouped = group_by_device_and_dtype([params, grads, exp_avgs])
            for (device_params, device_grads, device_exp_avgs), _ in grouped.values():
                lion_step_foreach(device_params, device_grads, device_exp_avgs, **options)
        else:
            lion_step(params, grads, exp_avgs, **options)
        store_moments(states, "exp_avg", exp_avgs, signed=True)
