r"""Resilient backpropagation (Rprop), as ``torch.optim.Rprop``.

Each coordinate keeps its own step size :math:`\Delta` (initially ``lr``) and uses only the sign of the
gradient. With :math:`s = \operatorname{sign}(g_t \cdot g_{t-1})` (:math:`g_0 = 0`, after ``maximize``):

.. math::
    \Delta_t &= \operatorname{clip}\big(\Delta_{t-1} \cdot
        \{\eta_+ \text{ if } s > 0;\ \eta_- \text{ if } s < 0;\ 1 \text{ if } s = 0\},
        \ \Delta_{\min}, \Delta_{\max}\big) \\
    \tilde g_t &= 0 \text{ where } s < 0, \text{ else } g_t \\
    \theta_t &= \theta_{t-1} - \operatorname{sign}(\tilde g_t)\, \Delta_t, \qquad
        \text{state ``prev``} = \tilde g_t

(after a sign change the coordinate does not move and its next step counts as a fresh start: the Rprop−
variant without weight backtracking). ``lr`` only sets the initial step sizes: changing it later (e.g. a
schedule) has no effect, as in torch. Reference: Riedmiller & Braun, "A direct adaptive method for faster
backpropagation learning: the RPROP algorithm" (ICNN 1993).
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
    new_step_tensor,
    real_views,
    reject_unsupported,
    zeros_state,
)
from optimlab.optim.registry import register

__all__ = ["Rprop"]


def _rprop_tensor(param: Tensor, grad: Tensor, prev: Tensor, step_size: Tensor, *, etaminus: float,
                  etaplus: float, step_size_min: float, step_size_max: float, maximize: bool) -> None:
    """The Rprop rule (module docstring) for one tensor, in place on ``param``, ``prev`` and ``step_size``."""
    if maximize:
        grad = -grad
    # under autograd (differentiable=True) the product must not save ``prev``, which is overwritten below
    factor = grad.mul(prev.clone() if torch.is_grad_enabled() else prev).sign()
    grew, shrank = factor.gt(0), factor.lt(0)
    factor.masked_fill_(grew, etaplus).masked_fill_(shrank, etaminus).masked_fill_(factor.eq(0), 1)
    step_size.mul_(factor).clamp_(step_size_min, step_size_max)
    grad = grad.masked_fill(shrank, 0)
    param.addcmul_(grad.sign(), step_size, value=-1)
    prev.copy_(grad)


@register(
    names={"rprop": "Rprop (Riedmiller & Braun 1993), for full-batch training"},
    lr_bounds=(1e-5, 1e-1), default_lr=1e-2, reference=torch.optim.Rprop, state_bytes=8, complex="supported",
    checks={
        "default": {"lr": 0.01},
        "etas": {"lr": 2e-4, "etas": (0.5, 1.5)},
        "step-sizes": {"lr": 0.01, "step_sizes": (2e-6, 0.05)},
        "maximize": {"lr": 0.01, "etas": (0.3, 1.1), "maximize": True},
    },
)
class Rprop(OptimlabOptimizer):
    r"""Rprop: per-coordinate step sizes grown by :math:`\eta_+` while the gradient keeps its sign and cut by
    :math:`\eta_-` when it flips; the update uses only the gradient's sign (module docstring).

    Same arguments, defaults and state (``step``, ``prev``, ``step_size``) as ``torch.optim.Rprop``. Meant
    for full-batch training (the sign test needs consistent gradients). ``foreach`` is accepted for the same
    signature; optimlab runs its one per-tensor rule either way.

    Args:
        params: parameters, named parameters or param-group dicts.
        lr: initial step size :math:`\Delta_0` (>= 0). Default 1e-2.
        etas: :math:`(\eta_-, \eta_+)` with :math:`0 < \eta_- < 1 < \eta_+`. Default (0.5, 1.2).
        step_sizes: :math:`(\Delta_{\min}, \Delta_{\max})`, :math:`0 \le \Delta_{\min} \le \Delta_{\max}`.
            Default (1e-6, 50).
        foreach: accepted, same rule.
        maximize: ascend the objective. Default False.
        differentiable: gradients flow through the update (meta-learning); the per-tensor rule runs under
            autograd (with ``foreach=True``: torch's ``RuntimeError``). Default False.
        capturable: not supported (``NotImplementedError`` when true).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        etas: tuple[float, float] = (0.5, 1.2),
        step_sizes: tuple[float, float] = (1e-6, 50),
        *,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        reject_unsupported(type(self).__name__, capturable=capturable)
        check_differentiable(differentiable, foreach=foreach)
        check_lr(lr)
        if len(etas) != 2 or not 0.0 < etas[0] < 1.0 < etas[1]:
            raise ValueError(f"Invalid eta values: {', '.join(str(e) for e in etas)} "
                             "(accepted: etas=(etaminus, etaplus) with 0 < etaminus < 1 < etaplus)")
        if len(step_sizes) != 2 or not 0.0 <= step_sizes[0] <= step_sizes[1]:
            raise ValueError(f"Invalid step_sizes: {tuple(step_sizes)} (accepted: (min, max) with 0 <= min <= max)")
        defaults = {"lr": lr, "etas": etas, "step_sizes": step_sizes, "foreach": foreach, "maximize": maximize,
                    "differentiable": differentiable, "capturable": capturable}
        super().__init__(params, defaults)

    def _init_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """``step`` 0, ``prev`` zeros and ``step_size`` filled with the group's lr (both parts of a complex
        entry), in torch's order."""
        lr = as_float(group["lr"])
        for param in params:
            state = self.state[param]
            if not state:
                state["step"] = new_step_tensor(0.0)
                state["prev"] = zeros_state(param)
                fill = complex(lr, lr) if param.is_complex() else lr
                state["step_size"] = torch.full_like(param.grad, fill, memory_format=torch.preserve_format)

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        (etaminus, etaplus), (low, high) = group["etas"], group["step_sizes"]
        for param, grad, state in zip(real_views(params), real_views(grads), states):
            state["step"] += 1
            prev, step_size = real_views([state["prev"], state["step_size"]])
            _rprop_tensor(param, grad, prev, step_size, etaminus=etaminus, etaplus=etaplus, step_size_min=low,
                          step_size_max=high, maximize=group["maximize"])
