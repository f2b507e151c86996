r"""ADOPT (Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any β2 with the Optimal Rate", NeurIPS 2024).

Adam normalises the gradient by a second moment that already contains it, which breaks its
convergence proof unless :math:`\beta_2` is tuned to the problem. ADOPT normalises by the
*previous* second moment and applies momentum after the normalisation. With gradient :math:`g_t`
(after ``maximize`` and the weight decay, see below), per parameter step :math:`t`:

.. math::
    t = 1:&\quad v_1 = g_1^2 \quad\text{(no parameter update)} \\
    t > 1:&\quad \tilde g_t = \operatorname{clip}\!\Big(\frac{g_t}{\max(\sqrt{v_{t-1}}, \epsilon)},\ t^{c}\Big), \qquad
        m_t = \beta_1 m_{t-1} + (1 - \beta_1)\,\tilde g_t \\
        &\quad \theta_t = \theta_{t-1} - \eta\, m_t, \qquad v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2

where :math:`\operatorname{clip}(x, c)` clamps each component to :math:`[-c, c]` with the clip
schedule :math:`t^{c}` of the authors' code (``clip_exponent`` :math:`c = 0.25`; ``None`` turns the
clipping off, the paper's Algorithm 2 without its stabilising clip). Weight decay is an L2 term
added to :math:`g_t` or, with ``decouple=True``, :math:`\theta \leftarrow \theta(1 - \eta\lambda)`
before the update (also on the first step, as in the authors' code).

Steps are counted per parameter (the authors' code), so a parameter that first receives a gradient
later starts with its own :math:`t = 1`. pytorch-optimizer's ``ADOPT`` counts steps per param group
instead; the two agree whenever every parameter has a gradient at every step.

Memory: two buffers (``exp_avg`` :math:`m`, ``exp_avg_sq`` :math:`v`), 8 bytes per float32 parameter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from optimlab.optim._base import (
    OptimlabOptimizer,
    ParamsT,
    as_float,
    check_betas,
    check_lr,
    check_non_negative,
    increment_steps,
    prepare_grad,
)
from optimlab.optim._fused import fused_step, resolve_fused, split_by_value
from optimlab.optim.registry import register

__all__ = ["ADOPT", "adopt_tensor"]


def adopt_tensor(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *,
    lr: float | Tensor, beta1: float | Tensor, beta2: float | Tensor, eps: float | Tensor, clip: float | Tensor,
    weight_decay: float, decouple: bool, maximize: bool, first_step: bool,
) -> None:
    r"""The ADOPT rule (module docstring) for one tensor, in place: what the per-tensor path loops over and
    the fused path compiles (float arguments then arrive as 0-dim tensors). ``clip`` is :math:`t^{c}`
    (``math.inf`` without clipping); ``first_step`` selects the :math:`t = 1` branch."""
    grad = prepare_grad(param, grad, maximize=maximize, weight_decay=weight_decay, lr=lr, decoupled=decouple)
    if first_step:
        exp_avg_sq.addcmul_(grad, grad)
        return
    normed = grad / exp_avg_sq.sqrt().clamp_(min=eps)
    exp_avg.lerp_(normed.clamp_(-clip, clip), 1 - beta1)
    param.add_(exp_avg, alpha=-lr)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def _adopt_arguments(step: float, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """(compile-time constants, data) of :func:`adopt_tensor` at step count ``step``."""
    exponent = options["clip_exponent"]
    static = {"weight_decay": options["weight_decay"], "decouple": options["decouple"],
              "maximize": options["maximize"], "first_step": step == 1}
    scalars = {"lr": options["lr"], "beta1": options["beta1"], "beta2": options["beta2"], "eps": options["eps"],
               "clip": math.inf if exponent is None else step**exponent}
    return static, scalars


def adopt_step(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict[str, Any]],
               steps: Sequence[float], *, fused: bool, **options: Any) -> None:
    """Apply :func:`adopt_tensor` to each parameter (``steps``: the incremented counts), per tensor or,
    with ``fused``, compiled by :mod:`optimlab.optim._fused` once per distinct step count."""
    lists = [list(params), list(grads), [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]]
    for step, part in split_by_value(lists, steps):
        static, scalars = _adopt_arguments(step, options)
        if fused:
            fused_step(adopt_tensor, static, elementwise=True)(part, scalars)
        else:
            for param, grad, exp_avg, exp_avg_sq in zip(*part):
                adopt_tensor(param, grad, exp_avg, exp_avg_sq, **static, **scalars)


@register(
    names={"adopt": "ADOPT, Adam normalised by the previous second moment (Taniguchi et al. 2024)"},
    # parity with pytorch_optimizer.ADOPT (per-group steps, no foreach argument): tests/optim/test_frontier_adopt.py
    lr_bounds=(1e-5, 1e-1), default_lr=1e-3, state_bytes=8, fused=True,
    complex="rejected",
    checks={"default": {"lr": 0.01}, "betas-eps-wd": {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-3, "weight_decay": 0.1},
            "decouple-no-clip-maximize": {"lr": 0.01, "weight_decay": 0.1, "decouple": True, "clip_exponent": None,
                                          "maximize": True}},
    fused_check={"lr": 0.01, "weight_decay": 0.1, "decouple": True, "maximize": True},
    graph_breaks="a Python branch on a tensor value (adopt.py, the first-step case)",
)
class ADOPT(OptimlabOptimizer):
    r"""ADOPT (Taniguchi et al. 2024): Adam normalised by the previous second moment, momentum after it.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1)\operatorname{clip}\!\big(g_t / \max(\sqrt{v_{t-1}}, \epsilon), t^{c}\big),
        \quad \theta_t = \theta_{t-1} - \eta m_t, \quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2

    (the first step only sets :math:`v_1 = g_1^2`; see the module docstring).

    Args:
        params: parameters or param-group dicts.
        lr: :math:`\eta` (>= 0). Default 1e-3.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1). Default (0.9, 0.9999) (the authors').
        eps: :math:`\epsilon` (>= 0), the floor of :math:`\sqrt{v}`. Default 1e-6.
        weight_decay: :math:`\lambda` (>= 0). Default 0.
        decouple: decoupled weight decay :math:`\theta \leftarrow \theta(1-\eta\lambda)` instead of L2. Default False.
        clip_exponent: :math:`c` of the clip schedule :math:`t^{c}` (>= 0), or ``None`` for no clipping. Default 0.25.
        maximize: ascend the objective instead.
        fused: the compiled step (:mod:`optimlab.optim._fused`, elementwise); ``None`` (default) means off.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        decouple: bool = False,
        clip_exponent: float | None = 0.25,
        maximize: bool = False,
        fused: bool | None = None,
    ) -> None:
        check_lr(lr)
        check_betas(betas)
        check_non_negative("eps", eps)
        check_non_negative("weight_decay", weight_decay)
        if clip_exponent is not None:
            check_non_negative("clip_exponent", clip_exponent)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, decouple=decouple,
                        clip_exponent=clip_exponent, maximize=maximize, fused=fused)
        super().__init__(params, defaults)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("step", "exp_avg", "exp_avg_sq")

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        beta1, beta2 = (as_float(beta) for beta in group["betas"])
        adopt_step(params, grads, states, increment_steps(states),
                   fused=resolve_fused(group["fused"], params, type(self).__name__),
                   lr=as_float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                   weight_decay=group["weight_decay"], decouple=group["decouple"],
                   clip_exponent=group["clip_exponent"], maximize=group["maximize"])
