r"""Schedule-Free AdamW (Defazio et al., "The Road Less Scheduled", NeurIPS 2024).

Three sequences replace the learning-rate schedule: the base sequence :math:`z` takes Adam-normalised
gradient steps, :math:`x` is a weighted average of the :math:`z` iterates (the weights to evaluate),
and gradients are taken at their interpolation :math:`y`:

.. math::
    y_t &= (1-\beta_1)\, z_t + \beta_1\, x_t \\
    v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2, \qquad g_t = \nabla f(y_t) \\
    \hat g_t &= g_t / \big(\sqrt{v_t / (1-\beta_2^t)} + \epsilon\big) + \lambda\, y_t \\
    z_{t+1} &= z_t - \gamma_t\, \hat g_t \\
    x_{t+1} &= (1 - c_{t+1})\, x_t + c_{t+1}\, z_{t+1}, \qquad
    c_{t+1} = \frac{w_t}{\sum_{i \le t} w_i}, \quad w_t = t^{r}\, \gamma_{\max}^{p}

with warmup :math:`\gamma_t = \gamma \min(1, t / T_{\text{warmup}})`, :math:`\gamma_{\max} = \max_{i\le t}\gamma_i`
and :math:`p` = ``weight_lr_power``. The parameters hold :math:`y` in train mode and :math:`x` in eval
mode; :meth:`ScheduleFreeAdamW.eval` and :meth:`ScheduleFreeAdamW.train` switch between them using
:math:`x = (y - (1-\beta_1) z)/\beta_1`. The state keeps :math:`z` and :math:`v` (8 bytes per float32
parameter); :math:`x` is never stored, :math:`y` is updated in place:
:math:`y_{t+1} = y_t + c_{t+1}(z_t - y_t) + \gamma_t(\beta_1(1-c_{t+1}) - 1)\,\hat g_t`.

One per-tensor rule, :func:`schedule_free_adamw_tensor`, is what the reference path (``foreach=False``)
loops over and what the fused path (``fused=True``) compiles with ``torch.compile``
(:mod:`optimlab.optim._fused`); the multi-tensor path (the default) is its ``torch._foreach_*`` twin.
The schedule (warmup learning rate, :math:`c_{t+1}`, bias correction) is computed once per group and
step in Python and reaches the compiled rule as data, so it never triggers a recompile.
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
    prepare_grad,
    prepare_grads,
    zeros_state,
)
from optimlab.optim._fused import fused_step, resolve_fused
from optimlab.optim.registry import register

__all__ = [
    "ScheduleFreeAdamW",
    "schedule_free_adamw_step",
    "schedule_free_adamw_step_foreach",
    "schedule_free_adamw_step_fused",
    "schedule_free_adamw_tensor",
]


def schedule_free_adamw_tensor(
    y: Tensor, grad: Tensor, z: Tensor, exp_avg_sq: Tensor, *,
    lr: float | Tensor, beta1: float | Tensor, beta2: float | Tensor, eps: float | Tensor,
    bias_correction2: float | Tensor, ckp1: float | Tensor, weight_decay: float, maximize: bool,
) -> None:
    r"""The Schedule-Free AdamW rule (module docstring) for one tensor, in place: what the per-tensor path
    loops over and the fused path compiles (:mod:`optimlab.optim._fused`, where the float arguments
    arrive as 0-dim float64 tensors; ``weight_decay`` and ``maximize`` are compile-time constants).

    .. math::
        v \leftarrow \beta_2 v + (1-\beta_2) g^2, \quad
        \hat g = g / \big(\sqrt{v / b_2} + \epsilon\big) + \lambda y, \quad
        y \leftarrow y + c\,(z - y) + \gamma(\beta_1(1-c) - 1)\,\hat g, \quad
        z \leftarrow z - \gamma \hat g

    with :math:`b_2 = 1 - \beta_2^t` (``bias_correction2``) and :math:`c = c_{t+1}` (``ckp1``). Every
    tensor is read before ``y`` and ``z`` are written, and ``y``, ``z``, ``exp_avg_sq`` must not alias.
    """
    grad = prepare_grad(y, grad, maximize=maximize, weight_decay=0.0)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = exp_avg_sq.div(bias_correction2).sqrt_().add_(eps)
    normalized = grad.div(denom)
    if weight_decay != 0:
        normalized.add_(y, alpha=weight_decay)
    y.lerp_(z, ckp1)
    y.add_(normalized, alpha=lr * (beta1 * (1 - ckp1) - 1))
    # z + (-lr) n, not z.sub_(n, alpha=lr): the same value bit for bit, but torch 2.13's Inductor compiles
    # sub with a 0-dim tensor alpha that is a graph input to a kernel that keeps the first call's value
    # (no guard, no recompile), which froze z's learning rate at its first value on the fused path.
    z.add_(normalized, alpha=-lr)


def schedule_free_adamw_step(
    params: Sequence[Tensor], grads: Sequence[Tensor], zs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor], *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, bias_correction2: float, ckp1: float,
    maximize: bool,
) -> None:
    """Per-tensor reference path of the Schedule-Free AdamW step: :func:`schedule_free_adamw_tensor` on
    each tensor; ``params`` hold :math:`y`."""
    for y, grad, z, exp_avg_sq in zip(params, grads, zs, exp_avg_sqs):
        schedule_free_adamw_tensor(y, grad, z, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                   bias_correction2=bias_correction2, ckp1=ckp1, weight_decay=weight_decay,
                                   maximize=maximize)


def schedule_free_adamw_step_fused(
    params: Sequence[Tensor], grads: Sequence[Tensor], zs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor], *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, bias_correction2: float, ckp1: float,
    maximize: bool,
) -> None:
    """Fused path of the same rule: :func:`schedule_free_adamw_tensor` compiled by :mod:`optimlab.optim._fused`
    (an elementwise rule). The step-dependent values (warmup learning rate, bias correction, averaging
    weight :math:`c_{t+1}`) are computed once per group and step by the caller and passed as 0-dim
    tensors, so they change the data, never the compiled graph."""
    fused_step(schedule_free_adamw_tensor, {"weight_decay": weight_decay, "maximize": maximize}, elementwise=True)(
        [list(params), list(grads), list(zs), list(exp_avg_sqs)],
        {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "bias_correction2": bias_correction2, "ckp1": ckp1})


def schedule_free_adamw_step_foreach(
    params: Sequence[Tensor], grads: Sequence[Tensor], zs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor], *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, bias_correction2: float, ckp1: float,
    maximize: bool,
) -> None:
    """Multi-tensor (``torch._foreach_*``) path of :func:`schedule_free_adamw_step`."""
    tensor_lists = [list(params), list(grads), list(zs), list(exp_avg_sqs)]
    for (ys, device_grads, device_zs, device_exp_avg_sqs), _ in foreach_groups(tensor_lists):
        device_grads = prepare_grads(ys, device_grads, maximize=maximize, weight_decay=0.0)
        torch._foreach_mul_(device_exp_avg_sqs, beta2)
        torch._foreach_addcmul_(device_exp_avg_sqs, device_grads, device_grads, value=1 - beta2)
        denoms = torch._foreach_div(device_exp_avg_sqs, bias_correction2)
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, eps)
        normalized = torch._foreach_div(device_grads, denoms)
        if weight_decay != 0:
            torch._foreach_add_(normalized, ys, alpha=weight_decay)
        torch._foreach_lerp_(ys, device_zs, ckp1)
        torch._foreach_add_(ys, normalized, alpha=lr * (beta1 * (1 - ckp1) - 1))
        torch._foreach_sub_(device_zs, normalized, alpha=lr)


@register(
    names={"schedule-free-adamw": "Schedule-Free AdamW (Defazio et al. 2024); call train()/eval()"},
    lr_bounds=(1e-5, 1e-1), default_lr=2.5e-3, state_bytes=8, fused=True, complex="rejected",
    checks={
        "default": {"lr": 0.01},
        "warmup-wd": {"lr": 0.01, "warmup_steps": 5, "weight_decay": 0.1, "r": 0.5},
        "maximize": {"lr": 0.01, "betas": (0.8, 0.99), "maximize": True},
    },
    fused_check={"lr": 2e-2, "betas": (0.8, 0.99), "weight_decay": 0.05, "warmup_steps": 3, "r": 0.5},
)
class ScheduleFreeAdamW(OptimlabOptimizer):
    r"""Schedule-Free AdamW (Defazio et al. 2024): no learning-rate schedule needed; call ``train()``/``eval()``.

    Put the optimizer in eval mode (``opt.eval()``) before evaluating the model or saving a
    checkpoint, and back in train mode (``opt.train()``) before training. Unlike the reference
    ``schedulefree`` package the optimizer starts in train mode (before the first step the
    parameters are the same in both modes), so a plain training loop works unchanged; ``step()``
    in eval mode raises ``RuntimeError``. The schedule counters (``step``, ``weight_sum``,
    ``lr_max``, ``train_mode``) live in each param group, so ``state_dict`` carries them.

    Args:
        params: parameters or param-group dicts.
        lr: peak learning rate :math:`\gamma` (>= 0).
        betas: :math:`(\beta_1, \beta_2)` in [0, 1); :math:`\beta_1` is the interpolation, not a momentum.
        eps: :math:`\epsilon` (>= 0) added to the denominator.
        weight_decay: :math:`\lambda` (>= 0), applied at :math:`y` (AdamW-style, scaled by :math:`\gamma_t`).
        warmup_steps: linear warmup length :math:`T_{\text{warmup}}` (>= 0).
        r: power of :math:`t` in the averaging weights (>= 0; 0 = uniform).
        weight_lr_power: power :math:`p` of :math:`\gamma_{\max}` in the averaging weights (>= 0).
        maximize: ascend the objective instead.
        foreach: use the multi-tensor path (default: see :func:`optimlab.optim._base.default_foreach`).
        fused: the compiled fused step (:mod:`optimlab.optim._fused`, :func:`schedule_free_adamw_tensor`
            compiled by ``torch.compile``); ``None`` (default) means off. Kept in ``defaults``, so a
            param group may override it; ``train()``/``eval()`` work the same on either path.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 2.5e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        check_lr(lr)
        check_betas(betas)
        if as_float(betas[0]) == 0.0:
            raise ValueError("Invalid betas[0] (beta1): 0.0 (accepted range: (0, 1) — eval() divides by beta1)")
        check_non_negative("eps", eps)
        check_non_negative("weight_decay", weight_decay)
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"Invalid warmup_steps: {warmup_steps!r} (accepted range: an integer >= 0)")
        check_non_negative("r", r)
        check_non_negative("weight_lr_power", weight_lr_power)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps,
                        r=r, weight_lr_power=weight_lr_power, maximize=maximize, foreach=foreach, fused=fused,
                        train_mode=True, step=0, weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0)
        super().__init__(params, defaults)

    @torch.no_grad()
    def eval(self) -> None:
        r"""Switch the parameters to the averaged weights :math:`x = y + (1 - 1/\beta_1)(z - y)`."""
        self._switch_mode(train=False)

    @torch.no_grad()
    def train(self) -> None:
        r"""Switch the parameters back to the gradient point :math:`y = x + (1-\beta_1)(z - x)`."""
        self._switch_mode(train=True)

    def _switch_mode(self, *, train: bool) -> None:
        r"""Move each group's parameters that have state to the other point: one foreach lerp towards
        :math:`z` per (device, dtype), with weight :math:`1-\beta_1` (to train) or :math:`1-1/\beta_1` (to eval)."""
        for group in self.param_groups:
            if group["train_mode"] == train:
                continue
            beta1 = as_float(group["betas"][0])
            weight = 1 - beta1 if train else 1 - 1 / beta1
            params = [param for param in group["params"] if "z" in self.state.get(param, {})]
            if params:
                for (device_params, device_zs), _ in foreach_groups([params, [self.state[p]["z"] for p in params]]):
                    torch._foreach_lerp_(device_params, device_zs, weight)
            group["train_mode"] = train

    def _init_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        if not group["train_mode"]:
            raise RuntimeError(
                "ScheduleFreeAdamW.step() was called in eval mode; call optimizer.train() before training "
                "and optimizer.eval() before evaluating or saving"
            )
        for param in params:
            state = self.state[param]
            if not state:
                state["z"] = param.detach().clone(memory_format=torch.preserve_format)
                state["exp_avg_sq"] = zeros_state(param)

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        beta1, beta2 = (as_float(beta) for beta in group["betas"])
        step = group["step"]
        warmup = group["warmup_steps"]
        lr = as_float(group["lr"]) * ((step + 1) / warmup if step < warmup else 1.0)
        group["scheduled_lr"] = lr
        group["lr_max"] = lr_max = max(lr, group["lr_max"])
        weight = (step + 1) ** group["r"] * lr_max ** group["weight_lr_power"]
        group["weight_sum"] = weight_sum = group["weight_sum"] + weight
        ckp1 = weight / weight_sum if weight_sum != 0 else 0.0
        options = dict(lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                       bias_correction2=1 - beta2 ** (step + 1), ckp1=ckp1, maximize=group["maximize"])
        if resolve_fused(group["fused"], params, type(self).__name__):
            rule = schedule_free_adamw_step_fused
        elif self._use_foreach(group, params):
            rule = schedule_free_adamw_step_foreach
        else:
            rule = schedule_free_adamw_step
        rule(params, grads, [state["z"] for state in states], [state["exp_avg_sq"] for state in states], **options)
        group["step"] = step + 1
