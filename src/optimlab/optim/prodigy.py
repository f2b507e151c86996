r"""Prodigy (Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner", ICML 2024).

Adam whose step size :math:`d_k` estimates the distance :math:`\|x_0 - x_*\|` from the iterates, so the
learning rate is left at 1. With :math:`\eta` = ``lr`` (a multiplier, default 1), gradient :math:`g_k`,
:math:`\beta_3` (default :math:`\sqrt{\beta_2}`) and :math:`\eta_k = \eta\, d_k\, b_k` where
:math:`b_k = \sqrt{1 - \beta_2^{k+1}} / (1 - \beta_1^{k+1})` with ``use_bias_correction`` (else 1):

.. math::
    r_k &= \beta_3 r_{k-1} + \tfrac{d_k}{d_0}\, \eta_k \langle g_k, x_0 - x_k \rangle, \qquad
    s_k = \beta_3 s_{k-1} + \tfrac{d_k}{d_0}\, \eta_k\, g_k \quad (d_k \text{ instead of } \eta_k
    \text{ with ``safeguard_warmup``}) \\
    \hat d_k &= \texttt{d\_coef}\; r_k / \|s_k\|_1, \qquad
    d_{k+1} = \min\big(\max_{j \le k} \hat d_j,\; d_k \cdot \texttt{growth\_rate}\big)
        \quad (\text{at least } d_k) \\
    m_k &= \beta_1 m_{k-1} + (1-\beta_1)\, d_k\, g_k, \qquad v_k = \beta_2 v_{k-1} + (1-\beta_2)\, d_k^2 g_k^2 \\
    x_{k+1} &= x_k (1 - \lambda \eta_k) - \eta_k\, \frac{m_k}{\sqrt{v_k} + d_{k+1}\,\epsilon}

(:math:`\beta_1 = 0`: no :math:`m`, the step uses :math:`d_{k+1} g_k`). The sums run over every
parameter of every group; decoupled weight decay :math:`\lambda` as written (``decouple=True``, the
default) or an L2 term added to :math:`g_k`. The factor :math:`1/d_0` appears in both :math:`r` and
:math:`s` and cancels in :math:`\hat d`; it keeps the statistics away from underflow (the authors'
code). This is the authors' ``prodigyopt`` 1.1 (its ``slice_p`` included: :math:`s` and :math:`x_0`
are kept for every ``slice_p``-th element), which the parity tests follow to 1e-12; the paper's
Algorithm 3 writes :math:`(1-\beta_3)` into both :math:`r` and :math:`s`, a factor that cancels too.
No ``fsdp_in_use``: the statistics are not all-reduced (single process or DDP-replicated only).

State per parameter: ``step``, ``s``, ``p0`` (:math:`x_0`), ``exp_avg`` (when :math:`\beta_1 > 0`),
``exp_avg_sq``: 16 bytes per float32 parameter (4 fewer without :math:`m`, less with ``slice_p``).
The estimate (``d``, ``d0``, ``d_max``, ``d_numerator``, ``d_hat``, ``d_denom``, ``k``) lives in the
param groups, as in ``prodigyopt``, whose checkpoints therefore load.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from optimlab.optim._base import (
    OptimlabOptimizer,
    ParamsT,
    as_float,
    check_betas,
    check_in_range,
    check_lr,
    check_non_negative,
    check_positive_int,
    new_step_tensor,
    prepare_grad,
)
from optimlab.optim.lr_free import LR_FREE_BOUNDS, GroupBatch, LRFreeOptimizer
from optimlab.optim.registry import register

__all__ = ["Prodigy"]


@register(
    names={"prodigy": "Prodigy, learning-rate-free Adam (Mishchenko & Defazio 2024); lr is a multiplier of d"},
    lr_bounds=LR_FREE_BOUNDS, default_lr=1.0, state_bytes=16, complex="rejected",
    checks={"default": {}, "bias-correction-safeguard": {"use_bias_correction": True, "safeguard_warmup": True,
                                                         "weight_decay": 0.1, "d0": 1e-2},
            "no-momentum-coupled-growth": {"betas": (0.0, 0.99), "decouple": False, "weight_decay": 0.05,
                                           "growth_rate": 1.5, "d_coef": 0.5, "d0": 1e-2}},
    graph_breaks="Tensor.item() for the distance estimate d (prodigy.py)",
)
class Prodigy(LRFreeOptimizer, OptimlabOptimizer):
    r"""Prodigy (Mishchenko & Defazio 2024): Adam with a learning rate estimated on the fly (module docstring).

    Args:
        params: parameters or param-group dicts.
        lr: multiplier of the estimated step (>= 0); leave at 1.0. All groups share it (or use 0).
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1). Default (0.9, 0.999).
        beta3: decay of the estimate's statistics in [0, 1), ``None`` for :math:`\sqrt{\beta_2}`.
        eps: :math:`\epsilon` (>= 0), scaled by :math:`d`. Default 1e-8.
        weight_decay: :math:`\lambda` (>= 0). Default 0.
        decouple: decoupled (AdamW-style) weight decay, scaled by :math:`\eta_k`. Default True.
        use_bias_correction: Adam's bias correction in :math:`\eta_k`. Default False.
        safeguard_warmup: leave :math:`\eta` out of :math:`s` (steadier early estimate). Default False.
        d0: initial estimate (> 0). Default 1e-6.
        d_coef: multiplier of the estimate (> 0); the preferred knob (0.5 to 2). Default 1.
        growth_rate: largest factor :math:`d` may grow per step (>= 1, ``math.inf`` for no limit).
        slice_p: keep the estimate's statistics on every ``slice_p``-th element (>= 1). Default 1.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decouple: bool = True,
        use_bias_correction: bool = False,
        safeguard_warmup: bool = False,
        d0: float = 1e-6,
        d_coef: float = 1.0,
        growth_rate: float = math.inf,
        slice_p: int = 1,
    ) -> None:
        check_lr(lr)
        check_betas(betas)
        if beta3 is not None:
            check_in_range("beta3", beta3, 0.0, 1.0)
        check_non_negative("eps", eps)
        check_non_negative("weight_decay", weight_decay)
        check_in_range("d0", d0, 0.0, math.inf, low_inclusive=False)
        check_in_range("d_coef", d_coef, 0.0, math.inf, low_inclusive=False)
        if not (growth_rate >= 1.0):
            raise ValueError(f"Invalid growth_rate: {growth_rate} (accepted range: >= 1, math.inf for no limit)")
        check_positive_int("slice_p", slice_p)
        defaults = dict(lr=lr, betas=tuple(betas), beta3=beta3, eps=eps, weight_decay=weight_decay,
                        d=d0, d0=d0, d_max=d0, d_numerator=0.0, d_coef=d_coef, k=0, growth_rate=growth_rate,
                        use_bias_correction=use_bias_correction, decouple=decouple,
                        safeguard_warmup=safeguard_warmup, slice_p=slice_p)
        super().__init__(params, defaults)

    def _init_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        for param in params:
            state = self.state[param]
            if state:
                continue
            state["step"] = new_step_tensor()
            flat = param.detach().flatten()[:: group["slice_p"]]
            state["s"] = torch.zeros_like(flat)
            # an all-zero start is stored as a 0-dim zero (the authors' memory saving)
            state["p0"] = flat.clone() if param.any() else param.new_zeros(())
            if group["betas"][0] > 0:
                state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)

    def _global_update(self, batches: list[GroupBatch]) -> None:
        first = self.param_groups[0]
        beta1, beta2 = (as_float(beta) for beta in first["betas"])
        beta3 = math.sqrt(beta2) if first["beta3"] is None else first["beta3"]
        lr, k, d, d0 = self._shared_lr(), first["k"], first["d"], first["d0"]
        bias_correction = (1 - beta2 ** (k + 1)) ** 0.5 / (1 - beta1 ** (k + 1)) if first["use_bias_correction"] else 1.0
        dlr = d * lr * bias_correction
        numerator = torch.zeros((), dtype=torch.float64)
        denominator = torch.zeros((), dtype=torch.float64)
        directions: list[list[Tensor]] = []
        for group, params, grads, states in batches:
            coupled = 0.0 if group["decouple"] else group["weight_decay"]
            prepared = [prepare_grad(p, g, maximize=False, weight_decay=coupled) for p, g in zip(params, grads)]
            directions.append(prepared)
            if as_float(group["lr"]) == 0.0:
                continue
            slice_p = group["slice_p"]
            for param, grad, state in zip(params, prepared, states):
                sliced = grad.flatten()[::slice_p]
                numerator += (d / d0) * dlr * torch.dot(sliced, state["p0"] - param.flatten()[::slice_p]).double()
                if beta1 > 0:
                    state["exp_avg"].mul_(beta1).add_(grad, alpha=d * (1 - beta1))
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=d * d * (1 - beta2))
                state["s"].mul_(beta3).add_(sliced, alpha=(d / d0) * (d if group["safeguard_warmup"] else dlr))
                denominator += state["s"].abs().sum().double()
        d_numerator, d_denom = first["d_numerator"] * beta3 + numerator.item(), denominator.item()
        if d_denom == 0:
            return  # no gradient signal yet: no step (as the authors' code)
        d_hat, d_max = d, first["d_max"]
        if lr > 0.0:
            d_hat = first["d_coef"] * d_numerator / d_denom
            if d == d0:
                d = max(d, d_hat)
            d_max = max(d_max, d_hat)
            d = min(d_max, d * first["growth_rate"])
        for (group, params, _, states), prepared in zip(batches, directions):
            group.update(d_numerator=d_numerator, d_denom=d_denom, d=d, d_max=d_max, d_hat=d_hat)
            if as_float(group["lr"]) == 0.0:
                continue  # a frozen group stays put (the authors' code still decays it and, without m, moves it)
            for param, grad, state in zip(params, prepared, states):
                state["step"] += 1
                denom = state["exp_avg_sq"].sqrt().add_(d * group["eps"])
                if group["decouple"] and group["weight_decay"] != 0:
                    param.add_(param, alpha=-group["weight_decay"] * dlr)
                if beta1 > 0:
                    param.addcdiv_(state["exp_avg"], denom, value=-dlr)
                else:
                    param.addcdiv_(grad, denom, value=-dlr * d)
        for group in self.param_groups:
            group["k"] += 1
