r"""Shampoo (Gupta, Koren & Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization", ICML 2018)
with the practical recipe of Anil et al. ("Scalable Second Order Optimization for Deep Learning", 2020)
and Distributed Shampoo (Shi et al. 2023): blocking, grafting, a start-preconditioning step and
inverse roots recomputed every ``precondition_frequency`` steps.

A parameter of order :math:`k \ge 2` (optionally with adjacent small dimensions merged,
``merge_dims``) is cut into blocks of at most ``block_size`` along every dimension; each block
:math:`B` keeps one factor per dimension. At the parameter's step :math:`t`, with gradient :math:`G`,
:math:`\beta_s` = ``shampoo_beta`` (default :math:`\beta_2`; 1 sums, as AdaGrad) and
:math:`p = 2k` (or ``inverse_exponent_override``):

.. math::
    L_{B,i} &\leftarrow \beta_s L_{B,i} + (1-\beta_s)\, G_{B(i)} G_{B(i)}^\top \quad (\beta_s = 1:\ L_{B,i} + G_{B(i)} G_{B(i)}^\top) \\
    P_{B,i} &= (L_{B,i} + \epsilon I)^{-1/p} \quad \text{when } t \ge t_0 \text{ and } (t - t_0) \bmod f = 0 \\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1) G, \qquad \hat m = m_t / (1 - \beta_1^t) \quad (\beta_1 = 0:\ \hat m = G) \\
    A &= \hat m / (\sqrt{\hat v} + \epsilon_g) \quad\text{(grafting: Adam } \hat v = v_t/(1-\beta_2^t),\
        v_t = \beta_2 v_{t-1} + (1-\beta_2) G^2; \text{ AdaGrad } \hat v = \textstyle\sum G^2) \\
    S_B &= \hat m_B \times_1 P_{B,1} \cdots \times_k P_{B,k}, \qquad
    D_B = S_B\, \frac{\|A_B\|}{\|S_B\|} \quad (t \ge t_0; \text{ before: } D = A) \\
    \theta_t &= \theta_{t-1}(1 - \eta\lambda) - \eta D

(:math:`t_0` = ``start_preconditioning_step``, :math:`f` = ``precondition_frequency``). Grafting
(Agarwal et al. 2020) keeps the layer-wise step size of the simpler optimizer (Adam or AdaGrad, per
block as in Distributed Shampoo) and takes only the direction from Shampoo; with ``grafting="none"``
:math:`A = \hat m` and :math:`D_B = S_B`. The factors see the raw gradient; the preconditioner is
applied to the filtered one (Distributed Shampoo). The factors are not bias-corrected: grafting fixes
the step's norm, so a constant factor scale only shifts the relative weight of :math:`\epsilon`.

Inverse roots are computed in float64 (stored in the parameter's dtype): by ``torch.linalg.eigh``,
:math:`P = Q \operatorname{diag}((\lambda + \epsilon)^{-1/p}) Q^\top`, or by the coupled Newton
iteration of Guo & Higham (2006) as in Anil et al. (``root_method="newton"``, matrix products only).
A decomposition that raises, returns non-finite values, or (Newton) does not converge leaves the
previous root in place; a block without a root yet uses the grafting direction.

Fallbacks: 0-dim and 1-D parameters take the grafting direction (Adam or AdaGrad; SGD with
momentum for ``grafting="none"``), never a factor. No factor exceeds ``block_size`` squared, so a
50k x 50k matrix costs 49 x 49 blocks of at most 1024 x 1024 factors, never one 50k x 50k
eigendecomposition.

On sharded (FSDP2, DTensor) parameters each parameter's rule runs once, unchanged, on its owner rank, on the
gathered parameter, gradient and state, and the results are scattered back; the state stays sharded
(:func:`optimlab.optim._dtensor.owner_update`); equal to the unsharded run bit for bit.

State per parameter: ``step``, ``exp_avg`` (when :math:`\beta_1 > 0`), ``graft_sq`` (unless
``grafting="none"``), and for block number ``b`` (in :func:`block_slices` order) and dimension ``i``
the factor ``L<b>_<i>`` and, once computed, its inverse root ``P<b>_<i>``: one value per element for
each of the first two, plus :math:`2 \sum_B \sum_i b_{B,i}^2` values for the factors and roots.
"""

from __future__ import annotations

import functools
import itertools
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
)
from optimlab.optim._dtensor import has_dtensor, owner_update, state_zeros
from optimlab.optim.registry import register
from optimlab.optim.soap import factor_outer, merged_shape, project

__all__ = ["Shampoo", "inverse_root", "block_slices"]

GRAFTINGS = ("adam", "adagrad", "none")
ROOT_METHODS = ("eigh", "newton")
NEWTON_MAX_ITERATIONS = 100
POWER_ITERATIONS = 30
NEWTON_TOLERANCE = 1e-10
"""The coupled Newton iteration stops once :math:`\\max|M_j - I| \\le` this (float64)."""
NEWTON_ACCEPT = 1e-6
"""A Newton root whose :math:`\\max|M_j - I|` stays above this is treated as a failed decomposition."""


def block_slices(shape: list[int] | tuple[int, ...], block_size: int) -> list[tuple[slice, ...]]:
    """The blocks of a tensor of ``shape``: every dimension cut into chunks of at most ``block_size``."""
    ranges = [[slice(start, min(start + block_size, size)) for start in range(0, size, block_size)] for size in shape]
    return list(itertools.product(*ranges))


def _newton_inverse_root(matrix: Tensor, p: int) -> Tensor | None:
    r"""Coupled Newton iteration for :math:`A^{-1/p}` (Guo & Higham 2006; Anil et al. 2020):
    :math:`M_0 = zA,\ X_0 = z^{1/p} I` with :math:`z = (1+p) / (2\lambda_{\max})` (:math:`\lambda_{\max}` by
    :data:`POWER_ITERATIONS` steps of power iteration), then
    :math:`T = \frac{p+1}{p} I - \frac1p M_j,\ X_{j+1} = X_j T,\ M_{j+1} = T^p M_j`, stopping when
    :math:`\max|M_j - I|` is below :data:`NEWTON_TOLERANCE` or grows by more than 1.2x (Anil et al.'s
    divergence test; the last iterate is kept). ``None`` unless it reached :data:`NEWTON_ACCEPT`."""
    identity = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    vector = torch.ones(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    for _ in range(POWER_ITERATIONS):  # the largest eigenvalue, by power iteration (no decomposition)
        vector = matrix @ vector
        vector = vector / vector.norm().clamp(min=torch.finfo(matrix.dtype).tiny)
    largest = vector @ matrix @ vector
    if not (largest > 0):
        return None
    z = (1 + p) / (2 * largest)
    m, x = z * matrix, identity * z ** (1 / p)
    error = (m - identity).abs().max()
    for _ in range(NEWTON_MAX_ITERATIONS):
        if error <= NEWTON_TOLERANCE:
            break
        t = identity * ((p + 1) / p) - m / p
        new_m = torch.linalg.matrix_power(t, p) @ m
        new_error = (new_m - identity).abs().max()
        if not (new_error <= 1.2 * error):  # diverging (Anil et al.'s test): keep the last iterate
            break
        x, m, error = x @ t, new_m, new_error
    return x if error <= NEWTON_ACCEPT and torch.isfinite(x).all() else None


def inverse_root(factor: Tensor, p: int, epsilon: float, method: str = "eigh") -> Tensor | None:
    r""":math:`(L + \epsilon I)^{-1/p}` in float64 (returned in ``factor``'s dtype), or ``None`` when the
    decomposition fails (raises, non-finite, or the Newton iteration does not converge). With ``eigh``
    the eigenvalues of :math:`L` are clamped at 0 before :math:`\epsilon` is added (a PSD factor
    accumulated in float32 has slightly negative ones), so :math:`\epsilon = 0` with a singular factor
    is a failed decomposition (an infinite root), never a NaN step."""
    matrix = factor.to(torch.float64)
    if method == "newton":
        identity = torch.eye(matrix.shape[0], dtype=torch.float64, device=matrix.device)
        root = _newton_inverse_root(matrix + epsilon * identity, p)
    else:
        try:
            eigenvalues, vectors = torch.linalg.eigh(matrix)
        except RuntimeError:  # LAPACK did not converge
            return None
        # a PSD factor accumulated in float32 has rounding-negative eigenvalues: clamp before the ridge
        root = (vectors * (eigenvalues.clamp(min=0) + epsilon).pow(-1.0 / p)) @ vectors.T
    if root is None or not torch.isfinite(root).all():
        return None
    return root.to(factor.dtype)


@register(
    names={"shampoo": "Shampoo with Adam grafting and blocking (Gupta et al. 2018; Anil et al. 2020)"},
    # after one step: 8 + 4 (32^2 + 16^2) / 512; the roots (as much again as the factors, 28 in all) appear at
    # start_preconditioning_step
    lr_bounds=(1e-5, 1e-1), default_lr=1e-3, state_bytes=18, complex="rejected",
    checks={"default": {"lr": 0.01, "precondition_frequency": 2, "start_preconditioning_step": 2},
            "adagrad-blocked-newton": {"lr": 0.01, "grafting": "adagrad", "block_size": 3, "root_method": "newton",
                                       "epsilon": 1e-4, "precondition_frequency": 1, "start_preconditioning_step": 1,
                                       "weight_decay": 0.01},
            "no-graft-sum-maximize": {"lr": 1e-3, "grafting": "none", "shampoo_beta": 1.0, "betas": (0.0, 0.99),
                                      "epsilon": 1e-3, "precondition_frequency": 3, "merge_dims": True,
                                      "maximize": True}},
    graph_breaks="the preconditioner's matrix root (eigendecomposition) runs outside the graph",
)
class Shampoo(OptimlabOptimizer):
    r"""Shampoo (Gupta et al. 2018; Anil et al. 2020): blocked Kronecker-factored preconditioning with grafting.

    Args:
        params: parameters or param-group dicts (real floating point).
        lr: :math:`\eta` (>= 0). Default 1e-3 (with Adam grafting the step has Adam's size).
        betas: :math:`(\beta_1, \beta_2)`: the gradient filter and Adam grafting's second moment, in [0, 1).
        shampoo_beta: factor decay :math:`\beta_s` in [0, 1]; ``None`` for :math:`\beta_2`; 1 sums (AdaGrad).
        epsilon: :math:`\epsilon` (>= 0) added to each factor before its inverse root. Default 1e-12.
        weight_decay: decoupled decay :math:`\lambda` (>= 0). Default 0.
        precondition_frequency: steps between inverse-root computations (>= 1). Default 10.
        start_preconditioning_step: :math:`t_0` (>= 1): the grafting direction is used before it;
            ``None`` for ``precondition_frequency``.
        block_size: largest factor side (>= 1); larger dimensions are cut into blocks. Default 1024.
        grafting: ``"adam"`` (default), ``"adagrad"`` or ``"none"``.
        graft_eps: :math:`\epsilon_g` (>= 0) of the grafting direction. Default 1e-8.
        root_method: ``"eigh"`` (float64 eigendecomposition, default) or ``"newton"`` (coupled Newton).
        inverse_exponent_override: use :math:`p` for every factor instead of :math:`2k` (>= 1).
        merge_dims: merge adjacent dimensions while their product stays <= ``block_size``. Default False.
        maximize: ascend the objective instead.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        shampoo_beta: float | None = None,
        epsilon: float = 1e-12,
        weight_decay: float = 0.0,
        precondition_frequency: int = 10,
        start_preconditioning_step: int | None = None,
        block_size: int = 1024,
        grafting: str = "adam",
        graft_eps: float = 1e-8,
        root_method: str = "eigh",
        inverse_exponent_override: int | None = None,
        merge_dims: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        check_lr(lr)
        check_betas(betas)
        if shampoo_beta is not None:
            check_in_range("shampoo_beta", shampoo_beta, 0.0, 1.0, high_inclusive=True)
        check_non_negative("epsilon", epsilon)
        check_non_negative("weight_decay", weight_decay)
        check_non_negative("graft_eps", graft_eps)
        start = precondition_frequency if start_preconditioning_step is None else start_preconditioning_step
        check_positive_int("precondition_frequency", precondition_frequency)
        check_positive_int("block_size", block_size)
        check_positive_int("start_preconditioning_step", start)
        if inverse_exponent_override is not None:
            check_positive_int("inverse_exponent_override", inverse_exponent_override)
        if grafting not in GRAFTINGS:
            raise ValueError(f"Invalid grafting: {grafting!r} (accepted: {', '.join(GRAFTINGS)})")
        if root_method not in ROOT_METHODS:
            raise ValueError(f"Invalid root_method: {root_method!r} (accepted: {', '.join(ROOT_METHODS)})")
        defaults = dict(lr=lr, betas=tuple(betas), shampoo_beta=shampoo_beta, epsilon=epsilon,
                        weight_decay=weight_decay, precondition_frequency=precondition_frequency,
                        start_preconditioning_step=start, block_size=block_size, grafting=grafting,
                        graft_eps=graft_eps, root_method=root_method,
                        inverse_exponent_override=inverse_exponent_override, merge_dims=merge_dims, maximize=maximize)
        super().__init__(params, defaults)

    @staticmethod
    def _view_shape(param: Tensor, group: dict[str, Any]) -> list[int] | None:
        """The shape whose blocks are preconditioned, or ``None`` for the grafting-only fallback (order < 2)."""
        if param.dim() < 2:
            return None
        if group["merge_dims"]:
            return merged_shape(tuple(param.shape), group["block_size"])
        return list(param.shape)

    def _init_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        for param in params:
            state = self.state[param]
            if state:
                continue
            state["step"] = new_step_tensor()
            if group["betas"][0] > 0:
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group["grafting"] != "none":
                state["graft_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            shape = self._view_shape(param, group)
            if shape is not None:
                for number, block in enumerate(block_slices(shape, group["block_size"])):
                    for dim, chunk in enumerate(block):
                        size = chunk.stop - chunk.start
                        state[f"L{number}_{dim}"] = state_zeros(param, size, size)

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        if has_dtensor(params):  # sharded (FSDP2): each parameter's blocked rule once, on its owner rank
            owner_update(functools.partial(self._update_group, group), params, grads, states)
            return
        beta1, beta2 = (as_float(beta) for beta in group["betas"])
        shampoo_beta = beta2 if group["shampoo_beta"] is None else group["shampoo_beta"]
        lr, grafting = as_float(group["lr"]), group["grafting"]
        for param, grad, state in zip(params, grads, states):
            grad = -grad if group["maximize"] else grad
            state["step"] += 1
            t = int(state["step"].item())
            filtered = grad
            if beta1 > 0:
                state["exp_avg"].lerp_(grad, 1 - beta1)
                filtered = state["exp_avg"] / (1 - beta1**t)
            if grafting == "adam":
                state["graft_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                graft = filtered / (state["graft_sq"] / (1 - beta2**t)).sqrt_().add_(group["graft_eps"])
            elif grafting == "adagrad":
                state["graft_sq"].addcmul_(grad, grad)
                graft = filtered / state["graft_sq"].sqrt().add_(group["graft_eps"])
            else:
                graft = filtered
            direction = graft
            shape = self._view_shape(param, group)
            if shape is not None:
                direction = self._precondition(state, grad.reshape(shape), filtered.reshape(shape),
                                               graft.reshape(shape), t, shampoo_beta, group).reshape(param.shape)
            if group["weight_decay"] != 0:
                param.mul_(1 - lr * group["weight_decay"])
            param.add_(direction, alpha=-lr)

    def _precondition(self, state: dict[str, Any], grad: Tensor, filtered: Tensor, graft: Tensor, t: int,
                      shampoo_beta: float, group: dict[str, Any]) -> Tensor:
        """Update every block's factors with ``grad``, refresh the roots when due, and return the step
        direction: per block the Shampoo direction of ``filtered`` grafted to ``graft``'s norm (or
        ``graft`` itself before :math:`t_0` and for a block without roots)."""
        start, frequency = group["start_preconditioning_step"], group["precondition_frequency"]
        refresh = t >= start and (t - start) % frequency == 0
        p = group["inverse_exponent_override"] or 2 * grad.dim()
        direction = graft.clone()
        for number, block in enumerate(block_slices(list(grad.shape), group["block_size"])):
            block_grad = grad[block]
            for dim in range(grad.dim()):
                factor = state[f"L{number}_{dim}"]
                outer = factor_outer(block_grad, dim)
                if shampoo_beta == 1.0:
                    factor.add_(outer)
                else:
                    factor.lerp_(outer, 1 - shampoo_beta)
                if refresh:
                    root = inverse_root(factor, p, group["epsilon"], group["root_method"])
                    if root is not None:  # else: keep the previous root
                        state[f"P{number}_{dim}"] = root
            roots = [state.get(f"P{number}_{dim}") for dim in range(grad.dim())]
            if t < start or any(root is None for root in roots):
                continue
            shampoo = project(filtered[block], roots)
            if group["grafting"] != "none":  # a tensor-valued choice: no host synchronisation per block
                shampoo_norm = shampoo.norm()
                shampoo = shampoo * torch.where(shampoo_norm > 0, graft[block].norm() / shampoo_norm, 0.0)
            direction[block] = shampoo
        return direction
