r"""D-Adapted Adam (Defazio & Mishchenko, "Learning-Rate-Free Learning by D-Adaptation", ICML 2023).

Adam whose step size :math:`d_k` is a lower bound on the distance to the solution, estimated from the
iterates, so the learning rate is left at 1. With :math:`\eta` = ``lr`` (a multiplier), gradient
:math:`g_k`, :math:`\eta_k = \eta\, d_k\, b_k` (:math:`b_k = \sqrt{1-\beta_2^{k+1}}/(1-\beta_1^{k+1})`
with ``use_bias_correction``, else 1), per-group ``layer_scale`` :math:`r` and
:math:`a_{k-1} = \sqrt{v_{k-1}} + \epsilon`, summed over every parameter of every group:

.. math::
    \rho_k &= \sum r\, \eta_k \langle g_k, s_{k-1} / a_{k-1} \rangle, \qquad
    N_k = \sqrt{\beta_2}\, N_{k-1} + (1 - \sqrt{\beta_2})\, \rho_k \\
    m_k &= \beta_1 m_{k-1} + (1-\beta_1)\, r\, \eta_k\, g_k, \qquad v_k = \beta_2 v_{k-1} + (1-\beta_2)\, g_k^2, \qquad
    s_k = \sqrt{\beta_2}\, s_{k-1} + (1 - \sqrt{\beta_2})\, \eta_k\, g_k \\
    \hat d_k &= \frac{N_k}{(1-\sqrt{\beta_2}) \sum r \|s_k\|_1}, \qquad
    d_{k+1} = \max\big(d_k,\ \min(\hat d_k,\ d_k \cdot \texttt{growth\_rate})\big) \\
    x_{k+1} &= x_k (1 - \lambda \eta_k) - \frac{m_k}{\sqrt{v_k} + \epsilon}

The step's size lives in :math:`m_k` (it accumulates :math:`\eta_k g_k`). Weight decay is an L2 term
added to :math:`g_k` (the default, ``decouple=False``) or decoupled as written. This is the authors'
``dadaptation`` 3.2 ``DAdaptAdam`` (the paper's Algorithm for Adam, with the authors' ``layer_scale``
and early exit: while :math:`\sum\|s_k\|_1 = 0`, no step is taken); the parity tests follow it to
1e-12. No ``log_every``: the estimate is read from ``optimizer.d``. On sharded (FSDP2, DTensor) parameters
the two sums (:math:`\rho_k` and :math:`\sum r \|s_k\|_1`) are taken over each rank's shards and all-reduced
in one call (the authors' ``fsdp_in_use``); the rest is elementwise on the shards. Equal to the unsharded run to
float64 reduction order (the shards' partial sums added in another order).

State per parameter: ``step``, ``s``, ``exp_avg``, ``exp_avg_sq``: 12 bytes per float32 parameter.
The estimate (``d``, ``numerator_weighted``, ``k``) lives in the param groups, as in ``dadaptation``,
whose checkpoints therefore load.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from optimlab.optim._base import (
    OptimlabOptimizer,
    ParamsT,
    as_float,
    check_betas,
    check_in_range,
    check_lr,
    check_non_negative,
    prepare_grad,
)
from optimlab.optim._dtensor import counted_once, has_dtensor, local, reduce_over_shards
from optimlab.optim.lr_free import LR_FREE_BOUNDS, GroupBatch, LRFreeOptimizer
from optimlab.optim.registry import register

__all__ = ["DAdaptAdam"]


@register(
    names={"dadapt-adam": "D-Adapted Adam, learning-rate free (Defazio & Mishchenko 2023); lr is a multiplier of d"},
    lr_bounds=LR_FREE_BOUNDS, default_lr=1.0, state_bytes=12, complex="rejected",
    checks={"default": {}, "bias-correction-decouple": {"use_bias_correction": True, "decouple": True,
                                                        "weight_decay": 0.1},
            "coupled-growth": {"weight_decay": 0.05, "growth_rate": 1.5, "betas": (0.8, 0.99), "d0": 1e-2}},
    graph_breaks="Tensor.item() for the distance estimate d (dadapt_adam.py)",
)
class DAdaptAdam(LRFreeOptimizer, OptimlabOptimizer):
    r"""D-Adapted Adam (Defazio & Mishchenko 2023): Adam with a learning rate estimated on the fly.

    Args:
        params: parameters or param-group dicts; a group may set ``layer_scale`` (> 0, default 1) to
            scale its step relative to the others.
        lr: multiplier of the estimated step (>= 0); leave at 1.0. All groups share it (or use 0).
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1). Default (0.9, 0.999).
        eps: :math:`\epsilon` (>= 0). Default 1e-8.
        weight_decay: :math:`\lambda` (>= 0). Default 0.
        decouple: decoupled (AdamW-style) weight decay, scaled by :math:`\eta_k`. Default False.
        use_bias_correction: Adam's bias correction in :math:`\eta_k`. Default False.
        d0: initial estimate (> 0). Default 1e-6.
        growth_rate: largest factor :math:`d` may grow per step (>= 1, ``math.inf`` for no limit).
    """

    #: d's two sums are all-reduced over the shards (module docstring)
    supports_dtensor = True

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decouple: bool = False,
        use_bias_correction: bool = False,
        d0: float = 1e-6,
        growth_rate: float = math.inf,
    ) -> None:
        check_lr(lr)
        check_betas(betas)
        check_non_negative("eps", eps)
        check_non_negative("weight_decay", weight_decay)
        check_in_range("d0", d0, 0.0, math.inf, low_inclusive=False)
        if not (growth_rate >= 1.0):
            raise ValueError(f"Invalid growth_rate: {growth_rate} (accepted range: >= 1, math.inf for no limit)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, d=d0, k=0, layer_scale=1.0,
                        numerator_weighted=0.0, growth_rate=growth_rate, use_bias_correction=use_bias_correction,
                        decouple=decouple)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (``torch.optim`` semantics), validating its ``layer_scale``."""
        super().add_param_group(param_group)
        check_in_range("layer_scale", self.param_groups[-1]["layer_scale"], 0.0, math.inf, low_inclusive=False)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("step", "s", "exp_avg", "exp_avg_sq")

    def _global_update(self, batches: list[GroupBatch]) -> None:
        first = self.param_groups[0]
        beta1, beta2 = (as_float(beta) for beta in first["betas"])
        sqrt_beta2 = beta2**0.5
        lr, k, d = self._shared_lr(), first["k"], first["d"]
        bias_correction = (1 - beta2 ** (k + 1)) ** 0.5 / (1 - beta1 ** (k + 1)) if first["use_bias_correction"] else 1.0
        dlr = d * lr * bias_correction
        numerator = torch.zeros((), dtype=torch.float64)
        s_norm = torch.zeros((), dtype=torch.float64)
        for group, params, grads, states in batches:
            if as_float(group["lr"]) == 0.0:
                continue
            scale, eps = group["layer_scale"], group["eps"]
            coupled = 0.0 if group["decouple"] else group["weight_decay"]
            for param, grad, state in zip(params, grads, states):
                grad = prepare_grad(param, grad, maximize=False, weight_decay=coupled)
                denom = state["exp_avg_sq"].sqrt().add_(eps)
                counted = counted_once(param)  # a replicated DTensor's sums on one rank only
                if counted:
                    numerator += scale * dlr * torch.dot(local(grad).flatten(), local(state["s"].div(denom)).flatten(
                    )).double()
                state["exp_avg"].mul_(beta1).add_(grad, alpha=scale * dlr * (1 - beta1))
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["s"].mul_(sqrt_beta2).add_(grad, alpha=dlr * (1 - sqrt_beta2))
                if counted:
                    s_norm += scale * local(state["s"]).abs().sum().double()
        every = [param for _, group_params, _, _ in batches for param in group_params]
        if has_dtensor(every):  # sharded: the shards' partial sums added over the ranks, in one all-reduce
            sums = torch.stack([numerator, s_norm]).to(local(every[0]).device)
            numerator, s_norm = reduce_over_shards(sums, torch.distributed.ReduceOp.SUM, every).cpu()
        numerator_weighted = sqrt_beta2 * first["numerator_weighted"] + (1 - sqrt_beta2) * numerator.item()
        sk_l1 = s_norm.item()
        if sk_l1 == 0:
            return  # no gradient signal yet: no step (as the authors' code)
        if lr > 0.0:
            d_hat = numerator_weighted / ((1 - sqrt_beta2) * sk_l1)
            d = max(d, min(d_hat, d * first["growth_rate"]))
        for group, params, _, states in batches:
            group.update(numerator_weighted=numerator_weighted, d=d)
            if as_float(group["lr"]) == 0.0:
                continue  # a frozen group stays put (the authors' code still decays it and, without m, moves it)
            for param, state in zip(params, states):
                state["step"] += 1
                denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
                if group["decouple"] and group["weight_decay"] != 0:
                    param.add_(param, alpha=-group["weight_decay"] * dlr)
                param.addcdiv_(state["exp_avg"], denom, value=-1)
            group["k"] += 1
