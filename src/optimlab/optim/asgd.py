r"""Averaged stochastic gradient descent (ASGD), as ``torch.optim.ASGD``.

With base learning rate :math:`\eta_0` (``lr``), decay :math:`\lambda` (``lambd``), power :math:`\alpha`,
averaging start :math:`t_0` and the gradient :math:`g_t` after ``maximize`` and the L2 penalty
(:func:`optimlab.optim._base.prepare_grad`), with :math:`\eta_1 = \eta_0`, :math:`\mu_1 = 1`:

.. math::
    \theta_t &= \theta_{t-1}\,(1 - \lambda\eta_t) - \eta_t\, g_t \\
    \bar\theta_t &= \bar\theta_{t-1} + \mu_t\,(\theta_t - \bar\theta_{t-1})
from optimlab.optim.registry import register
        \quad (\bar\theta_t = \theta_t \text{ while } \mu_t = 1) \\
    \eta_{t+1} &= \eta_0 / (1 + \lambda\eta_0 t)^{\alpha}, \qquad \mu_{t+1} = 1 / \max(1, t - t_0)

The parameters follow the SGD iterates; the Polyak–Ruppert average :math:`\bar\theta` is kept in the state
(``ax``) and is not written back. References: Polyak & Juditsky, "Acceleration of stochastic approximation
by averaging" (SIAM J. Control Optim. 1992); Bottou, "Stochastic Gradient Descent Tricks" (2012), whose
schedule torch follows.
"""

from __future__ import annotations

from types import MappingProxyType
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
    new_step_tensor,
    prepare_grad,
    real_views,
    reject_unsupported,
    scalar_hyperparameter,
    zeros_state,
)
from optimlab.optim.registry import register

__all__ = ["ASGD"]


def _asgd_tensor(param: Tensor, grad: Tensor, ax: Tensor, step: Tensor, eta: Tensor, mu: Tensor, *, lr: float | Tensor,
                 lambd: float, alpha: float, t0: float, weight_decay: float, maximize: bool) -> None:
    """The ASGD rule (module docstring) for one tensor, in place on ``param``, ``ax`` and the 0-dim state
    ``step``, ``eta``, ``mu`` (kept in the scalar dtype, as torch does, so trajectories match)."""
    grad = prepare_grad(param, grad, maximize=maximize, weight_decay=weight_decay)
    step += 1
    eta_now = eta.item()
    param.mul_(1 - lambd * eta_now).add_(grad, alpha=-eta_now)
    if mu.item() != 1:
        ax.add_(param.sub(ax).mul_(mu))
    else:
        ax.copy_(param)
    t = step.item()
    # through torch.as_tensor, i.e. rounded to the default dtype, as torch does (it matters once a loaded
    # state_dict has cast eta and mu to a float64 parameter's dtype)
    eta.copy_(torch.as_tensor(lr / ((1 + lambd * lr * t) ** alpha)))
    mu.copy_(torch.as_tensor(1 / max(1, t - t0)))


@register(
    names={"asgd": "Averaged SGD (Polyak & Juditsky 1992; Bottou 2012)"},
    lr_bounds=(1e-4, 1.0), default_lr=1e-2, reference=torch.optim.ASGD, state_bytes=4, complex="supported",
    checks={
        "default": {"lr": 0.01},
        "lambd-t0": {"lr": 0.02, "lambd": 0.1, "t0": 3},
        "alpha-early-average": {"lr": 0.05, "lambd": 0.5, "alpha": 0.5, "t0": 0},
        "wd-maximize": {"lr": 0.01, "weight_decay": 0.1, "maximize": True, "t0": 5},
    },
    graph_breaks="Tensor.item() on eta/mu/step in the per-tensor rule (asgd.py, _asgd_tensor)",
)
class ASGD(OptimlabOptimizer):
    r"""Averaged SGD: SGD with a decaying step :math:`\eta_t = \eta_0/(1 + \lambda\eta_0 t)^\alpha` and a
    Polyak–Ruppert average of the iterates from step :math:`t_0` on (state ``ax``); see the module docstring.

    Same arguments, defaults and state (``step``, ``eta``, ``mu``, ``ax``) as ``torch.optim.ASGD``.
    ``foreach`` is accepted for the same signature; optimlab runs its one per-tensor rule either way.

    Args:
        params: parameters, named parameters or param-group dicts.
        lr: :math:`\eta_0` (>= 0). Default 1e-2.
        lambd: decay term :math:`\lambda` (>= 0). Default 1e-4.
        alpha: power :math:`\alpha` of the step decay (>= 0). Default 0.75.
        t0: step at which averaging starts (>= 0). Default 1e6.
        weight_decay: L2 penalty (>= 0). Default 0.
        foreach: accepted, same rule.
        maximize: ascend the objective. Default False.
        differentiable: gradients flow through the update (meta-learning); the per-tensor rule runs under
            autograd (with ``foreach=True``: torch's ``RuntimeError``). Default False.
        capturable: not supported (``NotImplementedError`` when true).
    """

    #: 0-dim state kept in the scalar dtype by ``load_state_dict`` (torch's casts them to the parameter's dtype,
    #: so a resumed optimlab run equals an uninterrupted one); ``eta`` actually starts at the group's lr.
    scalar_state_init = MappingProxyType({"eta": 1e-2, "mu": 1.0})

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        lambd: float = 1e-4,
        alpha: float = 0.75,
        t0: float = 1e6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
    ) -> None:
        reject_unsupported(type(self).__name__, capturable=capturable)
        check_differentiable(differentiable, foreach=foreach)
        check_lr(lr)
        for name, value in (("lambd", lambd), ("alpha", alpha), ("t0", t0), ("weight_decay", weight_decay)):
            check_non_negative(name, value)
        defaults = {"lr": lr, "lambd": lambd, "alpha": alpha, "t0": t0, "weight_decay": weight_decay,
                    "foreach": foreach, "maximize": maximize, "differentiable": differentiable,
                    "capturable": capturable}
        super().__init__(params, defaults)

    def _init_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """``step`` 0, ``eta`` = the group's lr, ``mu`` 1 (0-dim, scalar dtype, on the parameter's device) and
        ``ax`` zeros, in torch's order."""
        for param in params:
            state = self.state[param]
            if not state:
                state["step"] = new_step_tensor(0.0).to(param.device)
                state["eta"] = new_step_tensor(as_float(group["lr"])).to(param.device)
                state["mu"] = new_step_tensor(1.0).to(param.device)
                state["ax"] = zeros_state(param)

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        options = {key: group[key] for key in ("lambd", "alpha", "t0", "maximize")}
        for param, grad, ax, state in zip(real_views(params), real_views(grads),
                                          real_views([s["ax"] for s in states]), states):
            _asgd_tensor(param, grad, ax, state["step"], state["eta"], state["mu"], lr=scalar_hyperparameter(group["lr"]),
                         weight_decay=as_float(group["weight_decay"]), **options)
