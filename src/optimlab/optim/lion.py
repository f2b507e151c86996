r"""Lion: EvoLved Sign Momentum (Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023).

The paper's Algorithm 2, with gradient :math:`g_t`, momentum :math:`m`, learning rate :math:`\eta`
and decoupled weight decay :math:`\lambda`:

.. math::
    c_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
    \theta_t &= \theta_{t-1} - \eta\,\big(\operatorname{sign}(c_t) + \lambda\,\theta_{t-1}\big) \\
    m_t &= \beta_2 m_{t-1} + (1 - \beta_2) g_t

With ``cautious=True`` the sign update :math:`\operatorname{sign}(c_t)` is masked to the components
whose sign agrees with :math:`g_t` and rescaled (:mod:`optimlab.optim.cautious`, Liang et al. 2024).

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
    foreach_groups,
    increment_steps,
    new_step_tensor,
    prepare_grad,
    prepare_grads,
)
from optimlab.optim._fused import fused_step, resolve_fused
from optimlab.optim.cautious import cautious_
from optimlab.optim.lowp_state import (
    fused_lowp_step,
    init_moment,
    load_moments,
    resolve_state_dtype,
    restore_state_dtypes,
    store_moments,
)
from optimlab.optim.registry import preset, register

__all__ = ["Lion", "lion_step", "lion_step_foreach", "lion_step_fused", "lion_tensor"]


def lion_step(
    params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], *,
    lr: float, beta1: float, beta2: float, weight_decay: float, maximize: bool, cautious: bool = False,
) -> None:
    """Per-tensor reference path of the Lion rule (module docstring), updating ``params`` and ``exp_avgs`` in place."""
    for param, grad, exp_avg in zip(params, grads, exp_avgs):
        lion_tensor(param, grad, exp_avg, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                    maximize=maximize, cautious=cautious)


def lion_tensor(
    param: Tensor, grad: Tensor, exp_avg: Tensor, *,
    lr: float | Tensor, beta1: float | Tensor, beta2: float | Tensor, weight_decay: float, maximize: bool,
    cautious: bool = False,
) -> None:
    """The Lion rule (module docstring) for one tensor, in place: what :func:`lion_step` loops over and the
    fused path compiles (:mod:`optimlab.optim._fused`, where ``lr`` and the betas arrive as 0-dim tensors)."""
    grad = prepare_grad(param, grad, maximize=maximize, weight_decay=weight_decay, lr=lr, decoupled=True)
    update = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1).sign_()
    if cautious:
        cautious_(update, grad)
    param.add_(update, alpha=-lr)
    exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)


def lion_step_fused(
    params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], *,
    lr: float, beta1: float, beta2: float, weight_decay: float, maximize: bool, cautious: bool = False,
) -> None:
    """Fused path of the same rule: :func:`lion_tensor` compiled by :mod:`optimlab.optim._fused` (not
    elementwise with ``cautious``: the mask's rescaling reduces over each tensor)."""
    static = {"weight_decay": weight_decay, "maximize": maximize, **({"cautious": True} if cautious else {})}
    fused_step(lion_tensor, static, elementwise=not cautious)(
        [params, grads, exp_avgs], {"lr": lr, "beta1": beta1, "beta2": beta2})


def lion_step_foreach(
    params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], *,
    lr: float, beta1: float, beta2: float, weight_decay: float, maximize: bool, cautious: bool = False,
) -> None:
    """Multi-tensor (``torch._foreach_*``) path of the same rule as :func:`lion_step` (the cautious mask,
    a per-tensor reduction, tensor by tensor)."""
    for (device_params, device_grads, device_exp_avgs), _ in foreach_groups([list(params), list(grads), list(exp_avgs)]):
        device_grads = prepare_grads(device_params, device_grads, maximize=maximize, weight_decay=weight_decay,
                                     lr=lr, decoupled=True)
        updates = torch._foreach_mul(device_exp_avgs, beta1)
        torch._foreach_add_(updates, device_grads, alpha=1 - beta1)
        torch._foreach_sign_(updates)
        if cautious:
            for update, grad in zip(updates, device_grads):
                cautious_(update, grad)
        torch._foreach_add_(device_params, updates, alpha=-lr)
        torch._foreach_mul_(device_exp_avgs, beta2)
        torch._foreach_add_(device_exp_avgs, device_grads, alpha=1 - beta2)


@register(
    names={
        "lion": "Lion (Chen et al. 2023)",
        "lion-bf16": preset("Lion with its momentum stored in bfloat16 (2 B/param)", state_dtype="bfloat16"),
        "lion-int8": preset("Lion with 8-bit block-wise quantised momentum (Dettmers et al. 2022; ~1 B/param)",
                            state_dtype="int8"),
    },
    lr_bounds=(3e-6, 3e-2), default_lr=1e-4, reference="lion_pytorch:Lion", state_bytes=4, fused=True,
    complex="rejected",
    checks={
        "default": {"lr": 1e-3},
        "betas-wd": {"lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.1},
        "maximize": {"lr": 1e-3, "maximize": True},
        "bf16-state": {"lr": 1e-3, "weight_decay": 0.1, "state_dtype": "bfloat16"},
        "int8-state": {"lr": 1e-3, "betas": (0.8, 0.9), "state_dtype": "int8"},
        "cautious-wd": {"lr": 1e-3, "weight_decay": 0.1, "cautious": True},
    },
    fused_check={"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.1},
)
class Lion(OptimlabOptimizer):
    r"""Lion (Chen et al. 2023, Algorithm 2): sign of an interpolated momentum, decoupled weight decay.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate :math:`\eta` (>= 0). Lion wants an lr 3-10x smaller than AdamW's.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1): interpolation for the update, decay of the momentum.
        weight_decay: decoupled weight decay :math:`\lambda` (>= 0), applied as :math:`\theta \leftarrow \theta(1 - \eta\lambda)`.
        maximize: ascend the objective instead.
        foreach: use the multi-tensor path (default: see :func:`optimlab.optim._base.default_foreach`).
        fused: the compiled fused step (:mod:`optimlab.optim._fused`); ``None`` (default) means off.
            With a bf16 / int8 ``state_dtype``, decoding the momentum, the rule and its stochastically
            rounded store are one compiled step (:func:`optimlab.optim.lowp_state.fused_lowp_step`).
        state_dtype: storage of the momentum: ``None`` (the parameter's dtype), ``"bfloat16"`` or
            ``"int8"`` (block-wise quantised, :mod:`optimlab.optim.lowp_state`). Updates are computed
            in the parameter's dtype either way; the stored moment is rounded stochastically, which
            needs a ``step`` counter in the state (low-precision state only).
        cautious: mask the sign update to the components that agree with the gradient, rescaled
            (:mod:`optimlab.optim.cautious`, Liang et al. 2024). Default False.
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
        fused: bool | None = None,
        state_dtype: str | torch.dtype | None = None,
        cautious: bool = False,
    ) -> None:
        check_lr(lr)
        check_betas(betas)
        check_non_negative("weight_decay", weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, maximize=maximize, foreach=foreach,
                        fused=fused, state_dtype=resolve_state_dtype(state_dtype), cautious=bool(cautious))
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (``torch.optim`` semantics), validating its ``state_dtype``."""
        super().add_param_group(param_group)
        self.param_groups[-1]["state_dtype"] = resolve_state_dtype(self.param_groups[-1]["state_dtype"])

    def _after_load_state_dict(self) -> None:
        """After ``load_state_dict`` (``torch.optim`` semantics): low-precision moments keep their storage dtype."""
        super()._after_load_state_dict()
        restore_state_dtypes(self, (("exp_avg", True),))

    def _init_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        for param in params:
            state = self.state[param]
            if not state:
                init_moment(state, "exp_avg", param, group["state_dtype"], signed=True)
                if group["state_dtype"] is not None:
                    state["step"] = new_step_tensor()  # seeds the stochastic rounding of the stored moment

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        beta1, beta2 = group["betas"]
        fused = resolve_fused(group["fused"], params, type(self).__name__)
        if fused and group["state_dtype"] is not None:
            # low-precision momentum: decode, rule and stochastic-rounding store in one compiled pass
            arguments = {"lr": as_float(group["lr"]), "beta1": as_float(beta1), "beta2": as_float(beta2)}
            fused_lowp_step(lion_tensor, {"weight_decay": group["weight_decay"], "maximize": group["maximize"],
                                          **({"cautious": True} if group["cautious"] else {})},
                            [("exp_avg", True)], group["state_dtype"], params, grads, states,
                            increment_steps(states), lambda step: arguments)
            return
        exp_avgs = load_moments(states, "exp_avg", params, signed=True)
        steps = increment_steps(states) if group["state_dtype"] is not None else [0.0] * len(states)
        if fused:
            rule = lion_step_fused
        else:
            rule = lion_step_foreach if self._use_foreach(group, params) else lion_step
        rule(params, grads, exp_avgs, lr=as_float(group["lr"]), beta1=as_float(beta1), beta2=as_float(beta2),
             weight_decay=group["weight_decay"], maximize=group["maximize"], cautious=group["cautious"])
        store_moments(states, "exp_avg", exp_avgs, signed=True, steps=steps)
