r"""SOAP: ShampoO with Adam in the Preconditioner's eigenbasis (Vyas et al., "SOAP: Improving and
Stabilizing Shampoo using Adam", ICLR 2025; arXiv 2409.11321, 2024).

For a parameter viewed as a tensor of order :math:`k` (dimensions larger than
``max_precondition_dim`` are left unrotated, and with ``merge_dims`` adjacent small dimensions are
merged first), SOAP keeps one Shampoo factor :math:`L_i` per rotated dimension and runs Adam in the
basis of their eigenvectors :math:`Q_i`. Writing :math:`\mathcal{P}(X) = X \times_1 Q_1^\top \cdots
\times_k Q_k^\top` (projection; :math:`Q_i = I` for an unrotated dimension) and :math:`\mathcal{P}^{-1}`
its inverse (:math:`Q_i` instead of :math:`Q_i^\top`), at the parameter's step :math:`t` (Algorithm 3
of the paper):

.. math::
    t = 0:&\quad L_i = (1-\beta_s)\, G_{(i)} G_{(i)}^\top,\quad Q_i = \operatorname{eigvecs}(L_i)
        \text{ (descending eigenvalues); no parameter update} \\
    G' &= \mathcal{P}(G_t), \qquad m_t = \beta_1 m_{t-1} + (1-\beta_1) G_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2)\, G'^{\,2} \\
    N_t &= \mathcal{P}^{-1}\!\big(\mathcal{P}(m_t) / (\sqrt{v_t} + \epsilon)\big), \qquad
    \theta_t = \theta_{t-1} - \eta\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\, N_t, \qquad
    \theta_t \leftarrow \theta_t (1 - \eta\lambda) \\
    L_i &\leftarrow \beta_s L_i + (1-\beta_s)\, G_{(i)} G_{(i)}^\top, \qquad
    \text{every } f \text{ steps: } Q_i \leftarrow \operatorname{QR}(L_i Q_i)

where :math:`G_{(i)} G_{(i)}^\top` contracts every dimension but :math:`i`, :math:`\beta_s` is
``shampoo_beta`` (default :math:`\beta_2`) and :math:`f` = ``precondition_frequency``. The eigenbasis
refresh is one step of power iteration followed by QR; its columns are ordered by the estimated
eigenvalues :math:`\operatorname{diag}(Q_i^\top L_i Q_i)` (descending), and :math:`v` is permuted with
them. The momentum :math:`m` of the paper lives in the original space and is projected with the current
basis each step; since the projection is linear and the bases orthogonal, ``exp_avg`` holds
:math:`\mathcal{P}(m_t)` directly (updated with :math:`\mathcal{P}(G_t)`, which the second moment needs
anyway) and is rotated into the new basis exactly when the basis changes (back with the old, forward
with the new, or in one contraction by :math:`Q_{old}^\top Q_{new}` when the factors are small beside the
tensor): the same iterates with one projection fewer per step. The update uses the factors of the previous step (the current
gradient enters :math:`L_i` after the update, as in the paper). ``normalize_gradient`` divides
:math:`N_t` by its RMS (plus :math:`\epsilon`).

Fallbacks: 1-D parameters are not rotated unless ``precondition_1d`` (then Adam, exactly), 0-dim ones
never; a dimension larger than ``max_precondition_dim`` keeps the identity (one-sided
preconditioning for a matrix with one large side, plain Adam when both are large), so no factor is
ever larger than ``max_precondition_dim`` squared. Factors, eigendecompositions and QR run in the
parameter's dtype, at least float32; if an eigendecomposition or QR fails or returns non-finite
values, the previous basis is kept (the identity on the first step).

Steps are counted per parameter (the authors' code), so a parameter that first receives a gradient
later starts with its own preconditioner-only step. pytorch-optimizer's ``SOAP`` counts steps per
param group, runs its QR in float32 and merges dimensions with another rule
(``merge_small_dims``); it is the same algorithm otherwise (the parity tests say how close).

On sharded (FSDP2, DTensor) parameters each parameter's rule runs once, unchanged, on its owner rank, on the
gathered parameter, gradient and state, and the results are scattered back; the state stays sharded
(:func:`optimlab.optim._dtensor.owner_update`); equal to the unsharded run bit for bit.

State per parameter: ``step`` (gradients seen, the first included), ``exp_avg`` (in the current basis), ``exp_avg_sq`` and, for
each rotated dimension ``i`` of the view, ``GG<i>`` (the factor) and ``Q<i>`` (its eigenbasis): for a
shape :math:`(n_1, \dots, n_k)`, 2 values per element plus :math:`2 \sum_i n_i^2` values.
"""

from __future__ import annotations

import functools
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

__all__ = ["SOAP", "factor_outer", "load_pytorch_optimizer_state", "merged_shape", "project"]


def merged_shape(shape: tuple[int, ...], max_dim: int) -> list[int]:
    """Merge adjacent dimensions while their product stays <= ``max_dim`` (the authors' ``merge_dims``):
    e.g. ``(64, 3, 3, 3)`` with 10000 becomes ``[1728]``, ``(4096, 3, 3)`` with 1024 becomes ``[4096, 9]``."""
    merged: list[int] = []
    current = 1
    for size in shape:
        if current * size > max_dim:
            if current > 1:
                merged.append(current)
                current = size
            else:
                merged.append(size)
                current = 1
        else:
            current *= size
    if current > 1 or not merged:
        merged.append(current)
    return merged


def project(tensor: Tensor, bases: list[Tensor | None], *, back: bool = False) -> Tensor:
    r"""Rotate every dimension of ``tensor`` by its basis: :math:`X \times_i Q_i^\top` (``back``:
    :math:`X \times_i Q_i`); a ``None`` basis leaves its dimension as it is. Each contraction moves the
    processed dimension to the end, so after all of them the order is the original one. A matrix takes
    two plain matrix products instead (:math:`Q_1^\top X Q_2`; no permuted copies)."""
    if tensor.dim() == 2:
        left, right = bases
        if left is not None:
            tensor = (left if back else left.T) @ tensor
        if right is not None:
            tensor = tensor @ (right.T if back else right)
        return tensor
    for basis in bases:
        if basis is None:
            tensor = tensor.permute(*range(1, tensor.dim()), 0)
        else:
            tensor = torch.tensordot(tensor, basis, dims=([0], [1 if back else 0]))
    return tensor


def factor_outer(grad: Tensor, dim: int) -> Tensor:
    """:math:`G_{(i)} G_{(i)}^\\top`: ``grad`` contracted with itself over every dimension but ``dim``."""
    if grad.dim() == 2:
        return grad @ grad.T if dim == 0 else grad.T @ grad
    others = [j for j in range(grad.dim()) if j != dim]
    return torch.tensordot(grad, grad, dims=(others, others))


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _finite_basis(basis: Tensor) -> bool:
    """Whether an orthonormal ``basis`` (entries bounded by 1 in magnitude) is finite: its sum is finite exactly
    then (no overflow is possible), and one reduction is much cheaper than ``isfinite`` on LAPACK's
    column-major output."""
    return bool(torch.isfinite(basis.sum()))


def _eigenbasis(factor: Tensor) -> Tensor | None:
    """Eigenvectors of the symmetric ``factor`` ordered by descending eigenvalue, or ``None`` on failure."""
    try:
        _, vectors = torch.linalg.eigh(factor.to(_work_dtype(factor.dtype)))
    except RuntimeError:  # LAPACK did not converge
        return None
    vectors = vectors.flip(-1)
    # row-major, as a basis gathered from shards is: products with it then take the same kernels (bits) either way
    return vectors.to(factor.dtype).contiguous() if _finite_basis(vectors) else None


@register(
    names={"soap": "SOAP, Adam in Shampoo's eigenbasis (Vyas et al. 2024)"},
    lr_bounds=(1e-5, 1e-1), default_lr=3e-3, state_bytes=28, complex="rejected",  # 8 + 2 * 4 (32^2 + 16^2) / 512
    checks={"default": {"lr": 0.01}, "frequent-merge-1d": {"lr": 0.01, "precondition_frequency": 2, "merge_dims": True,
                                                           "precondition_1d": True, "weight_decay": 0.0},
            "one-sided-normalized-maximize": {"lr": 0.01, "max_precondition_dim": 4, "normalize_gradient": True,
                                              "shampoo_beta": 0.9, "maximize": True}},
    graph_breaks="a Python branch on a tensor value (soap.py, the preconditioner update)",
)
class SOAP(OptimlabOptimizer):
    r"""SOAP (Vyas et al. 2024): Adam in the eigenbasis of Shampoo's preconditioner (module docstring).

    Args:
        params: parameters or param-group dicts (real floating point).
        lr: :math:`\eta` (>= 0). Default 3e-3.
        betas: :math:`(\beta_1, \beta_2)` of Adam, each in [0, 1). Default (0.95, 0.95) (the authors').
        shampoo_beta: decay :math:`\beta_s` of the factors in [0, 1), ``None`` for :math:`\beta_2`.
        eps: :math:`\epsilon` (>= 0). Default 1e-8.
        weight_decay: decoupled decay :math:`\lambda` (>= 0), applied after the step. Default 0.01.
        precondition_frequency: steps between eigenbasis refreshes (>= 1). Default 10.
        max_precondition_dim: larger dimensions are not rotated (>= 1). Default 10000.
        merge_dims: merge adjacent small dimensions (up to ``max_precondition_dim``) first. Default False.
        precondition_1d: rotate 1-D parameters too (one factor). Default False.
        correct_bias: Adam's bias correction in the step size. Default True.
        normalize_gradient: divide the step by its RMS. Default False.
        maximize: ascend the objective instead.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precondition_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        correct_bias: bool = True,
        normalize_gradient: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        check_lr(lr)
        check_betas(betas)
        if shampoo_beta is not None:
            check_in_range("shampoo_beta", shampoo_beta, 0.0, 1.0)
        check_non_negative("eps", eps)
        check_non_negative("weight_decay", weight_decay)
        check_positive_int("precondition_frequency", precondition_frequency)
        check_positive_int("max_precondition_dim", max_precondition_dim)
        defaults = dict(lr=lr, betas=tuple(betas), shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                        precondition_frequency=precondition_frequency, max_precondition_dim=max_precondition_dim,
                        merge_dims=merge_dims, precondition_1d=precondition_1d, correct_bias=correct_bias,
                        normalize_gradient=normalize_gradient, maximize=maximize)
        super().__init__(params, defaults)

    @staticmethod
    def _view_shape(param: Tensor, group: dict[str, Any]) -> list[int]:
        """The shape the rule sees: the parameter's, or its merged dimensions with ``merge_dims``."""
        if param.dim() > 1 and group["merge_dims"]:
            return merged_shape(tuple(param.shape), group["max_precondition_dim"])
        return list(param.shape)

    @staticmethod
    def _rotated(size: int, order: int, group: dict[str, Any]) -> bool:
        if order == 1 and not group["precondition_1d"]:
            return False
        return size <= group["max_precondition_dim"]

    def _init_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        for param in params:
            state = self.state[param]
            if state:
                continue
            shape = self._view_shape(param, group)
            state["step"] = new_step_tensor()
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
            for dim, size in enumerate(shape):
                if self._rotated(size, len(shape), group):
                    state[f"GG{dim}"] = state_zeros(param, size, size)

    @staticmethod
    def _bases(state: dict[str, Any], order: int) -> list[Tensor | None]:
        """The eigenbasis of each dimension of the view (``Q<dim>``), ``None`` where it is not rotated."""
        return [state.get(f"Q{dim}") for dim in range(order)]

    def _update_preconditioner(self, grad: Tensor, state: dict[str, Any], step: int, group: dict[str, Any]) -> None:
        """Accumulate the factors ``GG<dim>`` with ``grad`` (the view), then refresh the bases ``Q<dim>``:
        the eigenvectors at ``step`` 0 (the first gradient), one QR power-iteration step every
        ``precondition_frequency`` steps."""
        shampoo_beta = group["betas"][1] if group["shampoo_beta"] is None else group["shampoo_beta"]
        dims = [dim for dim in range(grad.dim()) if f"GG{dim}" in state]
        for dim in dims:
            state[f"GG{dim}"].lerp_(factor_outer(grad, dim), 1 - as_float(shampoo_beta))
        if step == 0:
            for dim in dims:
                factor = state[f"GG{dim}"]
                basis = _eigenbasis(factor)  # eigh failed: start from the identity
                state[f"Q{dim}"] = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device) \
                    if basis is None else basis
        elif step % group["precondition_frequency"] == 0:
            self._refresh_bases(state, dims, grad.shape)

    def _refresh_bases(self, state: dict[str, Any], dims: list[int], shape: torch.Size) -> None:
        r"""One power-iteration step and QR per factor, columns sorted by estimated eigenvalue (descending),
        ``exp_avg_sq`` permuted along; a failed or non-finite QR keeps that factor's previous basis. ``exp_avg``
        moves from the old bases to the new ones: back with the old and forward with the new, or, when cheaper
        (:math:`\sum_i n_i^3 < n \sum_i n_i` for the rotated sizes :math:`n_i` of a tensor of :math:`n` values:
        factors small beside the tensor), in one contraction by :math:`Q_{i,\text{old}}^\top Q_{i,\text{new}}`."""
        old_bases = self._bases(state, len(shape))
        exp_avg_sq = state["exp_avg_sq"].view(shape)
        for dim in dims:
            factor, basis = state[f"GG{dim}"], state[f"Q{dim}"]
            product = factor @ basis
            order = torch.argsort((basis * product).sum(dim=0), descending=True)
            try:
                new_basis, _ = torch.linalg.qr(product[:, order].to(_work_dtype(factor.dtype)))
            except RuntimeError:
                continue
            if not _finite_basis(new_basis):
                continue
            exp_avg_sq = exp_avg_sq.index_select(dim, order)
            state[f"Q{dim}"] = new_basis.to(factor.dtype).contiguous()  # row-major, as in _eigenbasis
        state["exp_avg_sq"].copy_(exp_avg_sq.reshape(state["exp_avg_sq"].shape))
        new_bases = self._bases(state, len(shape))
        momentum = state["exp_avg"].view(shape)
        sizes = [shape[dim] for dim in dims]
        if sum(size**3 for size in sizes) < momentum.numel() * sum(sizes):
            rotations = [None if old is None or old is new else old.T @ new for old, new in zip(old_bases, new_bases)]
            momentum = project(momentum, rotations)
        else:
            momentum = project(project(momentum, old_bases, back=True), new_bases)
        state["exp_avg"].copy_(momentum.reshape(state["exp_avg"].shape))

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        if has_dtensor(params):  # sharded (FSDP2): each parameter's whole-matrix rule once, on its owner rank
            owner_update(functools.partial(self._update_group, group), params, grads, states)
            return
        beta1, beta2 = (as_float(beta) for beta in group["betas"])
        lr, eps = as_float(group["lr"]), group["eps"]
        for param, grad, state in zip(params, grads, states):
            shape = self._view_shape(param, group)
            grad = (-grad if group["maximize"] else grad).reshape(shape)
            state["step"] += 1
            step = int(state["step"].item()) - 1  # Adam's step count: the first gradient only builds the bases
            if step == 0:
                self._update_preconditioner(grad, state, 0, group)
                continue
            bases = self._bases(state, len(shape))
            exp_avg, exp_avg_sq = state["exp_avg"].view(shape), state["exp_avg_sq"].view(shape)
            rotated = project(grad, bases)
            exp_avg.lerp_(rotated, 1 - beta1)  # the momentum in the current basis: P(m) = beta1 P(m) + (1-beta1) P(g)
            # squared in place only when rotated: unrotated, ``rotated`` is (a view of) the caller's gradient
            exp_avg_sq.lerp_(rotated.square_() if any(basis is not None for basis in bases) else rotated.square(),
                             1 - beta2)
            direction = project(exp_avg / exp_avg_sq.sqrt().add_(eps), bases, back=True)
            if group["normalize_gradient"]:
                direction.div_(direction.square().mean().sqrt().add_(eps))
            step_size = lr
            if group["correct_bias"]:
                step_size *= math.sqrt(1 - beta2**step) / (1 - beta1**step)
            param.add_(direction.reshape(param.shape), alpha=-step_size)
            if group["weight_decay"] != 0:
                param.mul_(1 - lr * group["weight_decay"])
            self._update_preconditioner(grad, state, step, group)


def load_pytorch_optimizer_state(optimizer: SOAP, state_dict: dict[str, Any]) -> None:
    """Load a state_dict of pytorch-optimizer's ``SOAP`` into ``optimizer`` (built on the same parameters, in
    the same groups), so a run started there continues here.

    Its layout differs: the step count is in each param group (here: per parameter; equal when every
    parameter had a gradient at every step), the factors and bases are lists ``GG``/``Q`` with ``[]`` for an
    unrotated dimension (here: ``GG<i>``/``Q<i>`` per rotated one), and ``exp_avg`` is in the parameter's
    space (here: in the eigenbasis, so it is projected). The group hyperparameters it saved replace the
    optimizer's, as ``load_state_dict`` does. Refused (``ValueError``): a checkpoint with ``merge_dims``
    (its ``merge_small_dims`` rule merges differently from the authors' ``merge_dims`` used here)."""
    theirs_groups = state_dict["param_groups"]
    if len(theirs_groups) != len(optimizer.param_groups):
        raise ValueError(f"state_dict: {len(theirs_groups)} param groups, the optimizer has "
                         f"{len(optimizer.param_groups)}")
    groups, state = [], {}
    for ours, theirs in zip(optimizer.param_groups, theirs_groups):
        if theirs.get("merge_dims"):
            raise ValueError("state_dict: merge_dims=True is not accepted (pytorch-optimizer merges dimensions "
                             "with another rule); only checkpoints with merge_dims=False load")
        groups.append({**{key: value for key, value in ours.items() if key != "params"},
                       **{key: theirs[key] for key in ours if key in theirs and key != "params"},
                       "params": list(theirs["params"])})
        for index in theirs["params"]:
            saved = state_dict["state"].get(index)
            if not saved:
                continue
            bases = [basis if len(basis) > 0 else None for basis in saved["Q"]]
            state[index] = {"step": new_step_tensor(float(theirs.get("step", 0))),
                            "exp_avg": project(saved["exp_avg"], bases).reshape(saved["exp_avg"].shape),
                            "exp_avg_sq": saved["exp_avg_sq"].clone()}
            for dim, (factor, basis) in enumerate(zip(saved["GG"], saved["Q"])):
                if len(factor) > 0:
                    state[index][f"GG{dim}"], state[index][f"Q{dim}"] = factor.clone(), basis.clone()
    optimizer.load_state_dict({"state": state, "param_groups": groups})
