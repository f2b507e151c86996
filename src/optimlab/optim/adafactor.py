r"""Adafactor (Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", ICML 2018).

For a parameter :math:`X` (matrices, and the last two dimensions of higher-rank tensors) the second
moment is kept factored as a row statistic :math:`R` and a column statistic :math:`C`; vectors keep a
full :math:`V`. At step :math:`t`, with :math:`G = \nabla f`:

.. math::
    \hat\beta_{2,t} &= 1 - t^{c} \qquad (c = \texttt{beta2\_decay} = -0.8) \\
    \rho_t &= \min(\texttt{lr}, 1/\sqrt t) \ \text{(relative step; else } \rho_t = \texttt{lr}) \\
    \alpha_t &= \max(\epsilon_2, \mathrm{RMS}(X_{t-1}))\,\rho_t \ \text{(parameter scaling; else } \alpha_t = \rho_t) \\
    R_t &= \hat\beta_{2,t} R_{t-1} + (1-\hat\beta_{2,t})\,\mathrm{mean}_{\text{cols}}(G^2), \quad
    C_t = \hat\beta_{2,t} C_{t-1} + (1-\hat\beta_{2,t})\,\mathrm{mean}_{\text{rows}}(G^2) \\
    \hat V_t &= R_t C_t / \mathrm{mean}(R_t) \quad (\text{vectors: } \hat V_t = \hat\beta_{2,t}\hat V_{t-1} + (1-\hat\beta_{2,t}) G^2) \\
    U_t &= G / \sqrt{\max(\hat V_t, \epsilon_1^2)}, \qquad \hat U_t = U_t / \max(1, \mathrm{RMS}(U_t)/d) \\
    M_t &= \beta_1 M_{t-1} + (1-\beta_1)\hat U_t \ \text{(optional first moment; else } M_t = \hat U_t) \\
    X_t &= X_{t-1}(1 - \texttt{lr}\,\lambda) - \alpha_t M_t

With ``beta1=None``, ``relative_step=True`` and ``scale_parameter=True`` (the defaults) this is
exactly ``torch.optim.Adafactor``. The paper's Algorithms 4/5 differ in two details, both kept from
torch here: :math:`\epsilon_1` bounds :math:`\hat V` from below instead of being added to
:math:`G^2` (:math:`10^{-30}` in the paper), and decoupled weight decay is added. The first moment
(paper Section 7, "with momentum") is taken over the clipped update :math:`\hat U_t` before the
step size :math:`\alpha_t`, so it costs a full-size buffer only when ``beta1`` is set.
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
    check_in_range,
    check_lr,
    check_non_negative,
    increment_steps,
    new_step_tensor,
    prepare_grad,
    zeros_state,
)

__all__ = ["Adafactor", "adafactor_step"]


def _rms(tensor: Tensor) -> float:
    return tensor.norm(2).item() / math.sqrt(tensor.numel())


def adafactor_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict[str, Any]],
    steps: Sequence[float],
    *,
    lr: float,
    beta2_decay: float,
    eps1: float | None,
    eps2: float,
    d: float,
    weight_decay: float,
    beta1: float | None,
    relative_step: bool,
    scale_parameter: bool,
    maximize: bool,
) -> None:
    """Apply the Adafactor rule (module docstring) to each parameter; ``states`` hold
    ``row_var``/``col_var`` (factored) or ``variance``, and ``exp_avg`` when ``beta1`` is set;
    ``steps`` are the already incremented step counts."""
    for param, grad, state, step in zip(params, grads, states, steps):
        new_weight = step**beta2_decay  # 1 - beta2_hat_t
        rho = min(lr, 1 / math.sqrt(step)) if relative_step else lr
        alpha = max(eps2, _rms(param)) * rho if scale_parameter else rho
        eps_floor = torch.finfo(param.dtype).eps if eps1 is None else eps1
        grad = prepare_grad(param, grad, maximize=maximize, weight_decay=weight_decay, lr=lr, decoupled=True)
        if grad.dim() > 1:
            row_var, col_var = state["row_var"], state["col_var"]
            row_var.lerp_(grad.square().mean(dim=-1, keepdim=True), new_weight)
            col_var.lerp_(grad.square().mean(dim=-2, keepdim=True), new_weight)
            var_estimate = (row_var @ col_var).div_(row_var.mean(dim=-2, keepdim=True).clamp(min=eps_floor))
        else:
            variance = state["variance"]
            variance.lerp_(grad.square(), new_weight)
            var_estimate = variance.clone()
        update = var_estimate.clamp_(min=eps_floor * eps_floor).rsqrt_().mul_(grad)
        update.div_(max(1.0, _rms(update) / d))
        if beta1 is not None:
            update = state["exp_avg"].lerp_(update, 1 - beta1)
        param.add_(update, alpha=-alpha)


class Adafactor(OptimlabOptimizer):
    r"""Adafactor (Shazeer & Stern 2018): factored second moments, relative step, update clipping.

    Args:
        params: parameters or param-group dicts.
        lr: the cap of the relative step :math:`\rho_t = \min(\text{lr}, 1/\sqrt t)`, or the step
            itself when ``relative_step=False`` (>= 0).
        beta2_decay: :math:`c \le 0` in :math:`\hat\beta_{2,t} = 1 - t^c`.
        eps: :math:`(\epsilon_1, \epsilon_2)`: the floor of :math:`\sqrt{\hat V}` (``None`` = the dtype's
            machine epsilon) and the floor of the parameter RMS in :math:`\alpha_t` (both >= 0).
        d: update-clipping threshold (>= 1).
        weight_decay: decoupled weight decay :math:`\lambda` (>= 0), :math:`X \leftarrow X(1 - \text{lr}\,\lambda)`.
        beta1: first-moment decay in [0, 1), or ``None`` for no first moment (the paper's default).
        relative_step: use :math:`\rho_t = \min(\text{lr}, 1/\sqrt t)`; otherwise :math:`\rho_t = \text{lr}`.
        scale_parameter: multiply the step by :math:`\max(\epsilon_2, \mathrm{RMS}(X))`.
        maximize: ascend the objective instead.

    Memory: :math:`4(m + n)` bytes for an :math:`m \times n` float32 matrix instead of Adam's
    :math:`8mn`. The update needs per-tensor norms and matrix products, so there is no multi-tensor path.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        beta1: float | None = None,
        relative_step: bool = True,
        scale_parameter: bool = True,
        maximize: bool = False,
    ) -> None:
        check_lr(lr)
        if not (beta2_decay <= 0.0):
            raise ValueError(f"Invalid beta2_decay: {beta2_decay} (accepted range: <= 0)")
        if len(eps) != 2:
            raise ValueError(f"Invalid eps: {eps!r} (expected a pair (eps1 or None, eps2))")
        if eps[0] is not None:
            check_non_negative("eps[0] (eps1)", eps[0])
        check_non_negative("eps[1] (eps2)", eps[1])
        if not (d >= 1.0):
            raise ValueError(f"Invalid d: {d} (accepted range: >= 1)")
        check_non_negative("weight_decay", weight_decay)
        if beta1 is not None:
            check_in_range("beta1", beta1, 0.0, 1.0)
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=tuple(eps), d=d, weight_decay=weight_decay, beta1=beta1,
                        relative_step=relative_step, scale_parameter=scale_parameter, maximize=maximize)
        super().__init__(params, defaults)

    def _init_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        for param in params:
            state = self.state[param]
            if state:
                continue
            state["step"] = new_step_tensor()
            if param.dim() > 1:
                state["row_var"] = param.new_zeros((*param.shape[:-1], 1))
                state["col_var"] = param.new_zeros((*param.shape[:-2], 1, param.shape[-1]))
            else:
                state["variance"] = zeros_state(param)
            if group["beta1"] is not None:
                state["exp_avg"] = zeros_state(param)

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        eps1, eps2 = group["eps"]
        adafactor_step(
            params, grads, states, increment_steps(states), lr=as_float(group["lr"]), beta2_decay=group["beta2_decay"], eps1=eps1, eps2=eps2,
            d=group["d"], weight_decay=group["weight_decay"], beta1=group["beta1"],
            relative_step=group["relative_step"], scale_parameter=group["scale_parameter"],
            maximize=group["maximize"],
        )
