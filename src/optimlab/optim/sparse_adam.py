r"""SparseAdam: Adam restricted to the entries a sparse gradient holds, as ``torch.optim.SparseAdam``.

For the set :math:`S_t` of indices stored in the (coalesced) sparse gradient :math:`g_t` (negated with
``maximize``), and only there:

.. math::
    m_S &\leftarrow m_S + (1 - \beta_1)(g_S - m_S), \qquad
    v_S \leftarrow v_S + (1 - \beta_2)(g_S^2 - v_S) \\
    \theta_S &\leftarrow \theta_S - \eta\,\frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}\;
        \frac{m_S}{\sqrt{v_S} + \epsilon}

Every other entry of :math:`\theta`, :math:`m` and :math:`v` is left alone (plain Adam would decay the
moments of rows that got no gradient). :math:`t` counts the steps in which the parameter had a gradient,
an empty one included. Meant for ``nn.Embedding(sparse=True)`` and other modules whose backward produces
sparse-layout gradients; the parameters themselves must be dense and real. Reference: Kingma & Ba, "Adam: A
Method for Stochastic Optimization" (ICLR 2015), masked as in torch.
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
    check_lr,
    scalar_hyperparameter,
    zeros_state,
)
from optimlab.optim.registry import register

__all__ = ["SparseAdam"]


def _sparse_adam_tensor(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, *, lr: float | Tensor,
                        beta1: float, beta2: float, eps: float, maximize: bool) -> None:
    """The SparseAdam rule (module docstring) for one dense parameter and its sparse gradient, in place."""
    grad = (-grad if maximize else grad).coalesce()
    indices, values = grad.indices(), grad.values()
    if values.numel() == 0:
        return

    def on_support(entries: Tensor) -> Tensor:
        return torch.sparse_coo_tensor(indices, entries, grad.size(), check_invariants=False)

    old_m = exp_avg.sparse_mask(grad).coalesce().values()
    delta_m = values.sub(old_m).mul_(1 - beta1)
    exp_avg.add_(on_support(delta_m))
    old_v = exp_avg_sq.sparse_mask(grad).coalesce().values()
    delta_v = values.pow(2).sub_(old_v).mul_(1 - beta2)
    exp_avg_sq.add_(on_support(delta_v))
    m = delta_m.add_(old_m)
    denom = delta_v.add_(old_v).sqrt_().add_(eps)
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    param.add_(on_support(-step_size * m.div_(denom)))


@register(
    names={},  # not in the lab's by-name list: its tasks give dense gradients, which SparseAdam refuses
    lr_bounds=(1e-5, 1e-1), default_lr=1e-3, reference=torch.optim.SparseAdam, complex="rejected", checks={},
    matrix_exempt="needs sparse gradients (the generic matrix gives dense ones); parity, semantics and torch's "
                  "OptimizerInfo inputs in tests/optim/test_torch_extras_parity.py",
    graph_breaks="torch.compile does not support sparse tensors (fullgraph=True refuses the sparse gradients)",
)
class SparseAdam(OptimlabOptimizer):
    r"""Adam for sparse gradients: moments and parameters change only where the gradient has entries
    (module docstring).

    Same arguments, defaults and state (``step`` as a Python int, ``exp_avg``, ``exp_avg_sq``) as
    ``torch.optim.SparseAdam``: dense, real parameters; every gradient must be sparse (a dense one raises
    ``RuntimeError``, use Adam for those).

    Args:
        params: parameters, named parameters or param-group dicts.
        lr: learning rate :math:`\eta` (> 0). Default 1e-3.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1). Default (0.9, 0.999).
        eps: :math:`\epsilon` (> 0). Default 1e-8.
        maximize: ascend the objective. Default False.
    """

    supports_sparse = True

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, maximize: bool = False) -> None:
        check_lr(lr)
        if not as_float(lr) > 0.0:
            raise ValueError(f"Invalid learning rate: {as_float(lr)} (accepted range: > 0)")
        if not eps > 0.0:
            raise ValueError(f"Invalid epsilon value: {eps} (accepted range: > 0)")
        check_betas(betas)
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "maximize": maximize})
        positions = [(g, i, p) for g, group in enumerate(self.param_groups) for i, p in enumerate(group["params"])]
        sparse = [[g, i] for g, i, p in positions if p.is_sparse]
        if sparse:
            raise ValueError(f"Sparse params at indices {sparse}: SparseAdam requires dense parameter tensors")
        complex_ = [[g, i] for g, i, p in positions if p.is_complex()]
        if complex_:
            raise ValueError(f"Complex params at indices {complex_}: SparseAdam does not support complex parameters")

    def _init_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """``step`` 0 (a Python int, as torch), ``exp_avg`` and ``exp_avg_sq`` zeros."""
        for param in params:
            state = self.state[param]
            if not state:
                state["step"] = 0
                state["exp_avg"] = zeros_state(param)
                state["exp_avg_sq"] = zeros_state(param)

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        if any(not grad.is_sparse for grad in grads):
            raise RuntimeError("SparseAdam does not support dense gradients, please consider Adam instead")
        beta1, beta2 = group["betas"]
        for param, grad, state in zip(params, grads, states):
            state["step"] += 1
            _sparse_adam_tensor(param, grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                                lr=scalar_hyperparameter(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                                maximize=group["maximize"])
