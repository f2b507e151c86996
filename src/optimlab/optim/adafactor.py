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

With ``cautious=True``, :math:`\alpha_t M_t` is masked to the components whose sign agrees with
:math:`G` and rescaled (:mod:`optimlab.optim.cautious`, Liang et al. 2024).

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
from optimlab.optim._fused import fused_step, resolve_fused, split_by_value
from optimlab.optim.cautious import cautious_
from optimlab.optim.registry import register

__all__ = ["Adafactor", "adafactor_step", "adafactor_step_fused", "adafactor_tensor"]


def _rms(tensor: Tensor) -> Tensor:
    r"""Root mean square :math:`\sqrt{\mathrm{mean}(x^2)}` as a 0-dim tensor (no host synchronisation)."""
    return tensor.square().mean().sqrt()


def _layout(param: Tensor) -> str:
    """``"vector"`` (fewer than 2 dimensions: a full second moment), ``"matrix"`` (one factored matrix,
    including shapes such as ``(1, m, n)``) or ``"batched"`` (a batch of ``L >= 2`` matrices in the
    last two dimensions)."""
    if param.dim() < 2:
        return "vector"
    return "matrix" if param.numel() == param.shape[-2] * param.shape[-1] else "batched"


def _matrix_views(param: Tensor, grad: Tensor, row_var: Tensor | None, col_var: Tensor | None,
                  exp_avg: Tensor | None, batched: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """A factored parameter's tensors as matrices ``(m, n)``, ``(m, 1)``, ``(1, n)``, or batches of them.

    The fused path hands the rule contiguous tensors flattened to 1-D (:mod:`optimlab.optim._fused`).
    Their sizes follow from the element counts, which stay symbolic, so one compiled graph serves
    every shape of a layout: a matrix has ``m = numel(row_var)``, ``n = numel(col_var)``; a batch of
    ``L`` matrices has ``m = numel / numel(col_var)`` and ``n = numel / numel(row_var)``. Tensors that
    keep their shape (the reference path) are returned as they are: the rule reduces over dimensions
    -1 and -2.
    """
    if row_var is None or col_var is None:
        raise ValueError("Invalid state: a factored Adafactor parameter needs row_var and col_var")
    if param.dim() > 1:
        return param, grad, row_var, col_var, exp_avg
    if batched:
        rows, cols = param.numel() // col_var.numel(), param.numel() // row_var.numel()
        shape, row_shape, col_shape = (-1, rows, cols), (-1, rows, 1), (-1, 1, cols)
    else:
        rows, cols = row_var.numel(), col_var.numel()
        shape, row_shape, col_shape = (rows, cols), (rows, 1), (1, cols)
    return (param.view(shape), grad.view(shape), row_var.view(row_shape), col_var.view(col_shape),
            None if exp_avg is None else exp_avg.view(shape))


def adafactor_tensor(
    param: Tensor,
    grad: Tensor,
    row_var: Tensor | None,
    col_var: Tensor | None,
    variance: Tensor | None,
    exp_avg: Tensor | None = None,
    *,
    lr: float | Tensor,
    rho: float | Tensor,
    beta2_weight: float | Tensor,
    eps2: float | Tensor,
    d: float | Tensor,
    beta1: float | Tensor | None = None,
    eps1: float | None,
    weight_decay: float,
    scale_parameter: bool,
    maximize: bool,
    layout: str,
    cautious: bool = False,
) -> None:
    r"""The Adafactor rule (module docstring) for one tensor, in place.

    What :func:`adafactor_step` loops over and the fused path compiles (:mod:`optimlab.optim._fused`,
    where the float arguments arrive as 0-dim tensors, so the rule computes with tensors only).
    ``row_var``/``col_var`` are given for a factored parameter (``layout`` ``"matrix"`` or ``"batched"``,
    as :func:`_layout` tells), ``variance`` for a ``"vector"``; ``exp_avg`` and ``beta1`` when there is a
    first moment. ``rho`` is :math:`\rho_t` and ``beta2_weight`` is :math:`1 - \hat\beta_{2,t} = t^{c}`;
    ``eps1=None`` means the dtype's epsilon.
    """
    step_size = torch.clamp(_rms(param), min=eps2) * rho if scale_parameter else rho  # RMS before decay
    grad = prepare_grad(param, grad, maximize=maximize, weight_decay=weight_decay, lr=lr, decoupled=True)
    eps_floor = torch.finfo(param.dtype).eps if eps1 is None else eps1
    if layout != "vector":
        param, grad, row_var, col_var, exp_avg = _matrix_views(param, grad, row_var, col_var, exp_avg,
                                                               batched=layout == "batched")
        row_var.lerp_(grad.square().mean(dim=-1, keepdim=True), beta2_weight)
        col_var.lerp_(grad.square().mean(dim=-2, keepdim=True), beta2_weight)
        # R C / mean(R): the outer product of an (m, 1) and a (1, n) factor, broadcast (= R @ C)
        var_estimate = (row_var * col_var).div_(row_var.mean(dim=-2, keepdim=True).clamp(min=eps_floor))
    else:
        assert variance is not None  # created by Adafactor._init_group for every tensor of fewer than 2 dimensions
        var_estimate = variance.lerp_(grad.square(), beta2_weight)
    update = var_estimate.clamp(min=eps_floor * eps_floor).rsqrt_().mul_(grad)
    update.div_(torch.clamp(_rms(update) / d, min=1.0))
    if beta1 is not None:
        if exp_avg is None:
            raise ValueError("Invalid state: beta1 is set but the parameter has no exp_avg (beta1 was None when "
                             "its state was created)")
        update = exp_avg.lerp_(update, 1 - beta1)
    update = update * step_size
    if cautious:
        cautious_(update, grad)
    param.sub_(update)


def _static_and_scalars(step: float, *, lr: float, beta2_decay: float, eps1: float | None, eps2: float, d: float,
                        weight_decay: float, beta1: float | None, relative_step: bool, scale_parameter: bool,
                        maximize: bool, cautious: bool) -> tuple[dict[str, Any], dict[str, float]]:
    """The keyword arguments of :func:`adafactor_tensor` at step ``step``: compile-time constants and data."""
    static = {"eps1": eps1, "weight_decay": weight_decay, "scale_parameter": scale_parameter, "maximize": maximize,
              **({"cautious": True} if cautious else {})}
    if not relative_step:
        rho = lr
    elif isinstance(step, Tensor):  # under torch.compile: no Python min() on a tensor (a data-dependent guard)
        rho = torch.clamp(1 / step.sqrt(), max=lr)
    else:
        rho = min(lr, 1 / math.sqrt(step))
    scalars = {"lr": lr, "rho": rho,
               "beta2_weight": step**beta2_decay, "eps2": eps2, "d": d}
    if beta1 is not None:
        scalars["beta1"] = beta1
    return static, scalars


def adafactor_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict[str, Any]],
    steps: Sequence[float],
    **options: Any,
) -> None:
    """Per-tensor reference path: :func:`adafactor_tensor` on each parameter. ``states`` hold
    ``row_var``/``col_var`` (factored) or ``variance``, and ``exp_avg`` when ``beta1`` is set; ``steps``
    are the already incremented step counts; ``options`` are the group's settings (``lr``,
    ``beta2_decay``, ``eps1``, ``eps2``, ``d``, ``weight_decay``, ``beta1``, ``relative_step``,
    ``scale_parameter``, ``maximize``, ``cautious``)."""
    for param, grad, state, step in zip(params, grads, states, steps):
        static, scalars = _static_and_scalars(step, **options)
        adafactor_tensor(param, grad, *(state.get(key) for key in _STATE_KEYS), **static, **scalars,
                         layout=_layout(param))


_STATE_KEYS = ("row_var", "col_var", "variance", "exp_avg")  # the optional tensors of adafactor_tensor, in order


def adafactor_step_fused(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict[str, Any]],
    steps: Sequence[float],
    **options: Any,
) -> None:
    r"""Fused path of the same rule: :func:`adafactor_tensor` compiled by :mod:`optimlab.optim._fused`
    (``elementwise=False``: the rule reduces over rows, columns and whole tensors), called once per
    distinct step count and layout (vectors, matrices, batches of matrices: one graph each), with the
    step-dependent :math:`\rho_t` and :math:`1 - \hat\beta_{2,t}` passed as data.

    Each compiled call takes one tensor (``chunk_size=1``): the rule passes over a tensor several times
    (parameter RMS, row and column means, update RMS, update), which stay in cache for one tensor but
    not for a chunk of eight; on CPU one tensor per call measured twice as fast (and compiles a graph
    an eighth the size)."""
    for step, (part_params, part_grads, part_states) in split_by_value([params, grads, states], steps):
        static, scalars = _static_and_scalars(step, **options)
        layouts: dict[str, list[int]] = {}
        for index, param in enumerate(part_params):
            if param.dim() >= 2 and 1 in param.shape[-2:]:
                # a factored dimension of length 1: Inductor (torch 2.13) fails to generate the C++ for
                # a reduction over that specialised size-1 dimension, so the rule runs uncompiled
                adafactor_tensor(param, part_grads[index], *(part_states[index].get(key) for key in _STATE_KEYS),
                                 **static, **scalars, layout=_layout(param))
            else:
                layouts.setdefault(_layout(param), []).append(index)
        for layout, chosen in layouts.items():
            columns = [[part_states[i].get(key) for i in chosen] for key in _STATE_KEYS]
            lists = [[part_params[i] for i in chosen], [part_grads[i] for i in chosen],
                     *(None if column[0] is None else column for column in columns)]
            fused_step(adafactor_tensor, {**static, "layout": layout}, 1, elementwise=False)(lists, scalars)


@register(
    names={"adafactor": "Adafactor, factored second moments (Shazeer & Stern 2018)"},
    lr_bounds=(1e-4, 1.0), default_lr=1e-2, state_bytes=0.375, fused=True, complex="rejected",  # 4(m+n)/mn
    checks={
        "default": {"lr": 0.05},
        "momentum-wd": {"lr": 0.05, "beta1": 0.9, "weight_decay": 0.1, "d": 1.5},
        "absolute-step-maximize": {"lr": 0.01, "relative_step": False, "scale_parameter": False, "maximize": True},
        "cautious-momentum": {"lr": 0.05, "beta1": 0.9, "cautious": True},
    },
    fused_check={"lr": 5e-2, "beta1": 0.9, "weight_decay": 0.1, "d": 1.5},
)
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
        foreach: accepted as in ``torch.optim.Adafactor``; optimlab's Adafactor has one unfused path (the
            per-tensor rule), which every value runs.
        maximize: ascend the objective instead.
        fused: the compiled step (:mod:`optimlab.optim._fused`): the per-tensor rule
            :func:`adafactor_tensor` with its row/column reductions, update clipping and parameter
            update in one compiled call per tensor; ``None`` (default) means off. Kept in ``defaults``,
            so a param group may override it.
        cautious: mask the step to the components whose sign agrees with the gradient, rescaled
            (:mod:`optimlab.optim.cautious`, Liang et al. 2024). Default False.

    Memory: :math:`4(m + n)` bytes for an :math:`m \times n` float32 matrix instead of Adam's
    :math:`8mn`. The update needs per-tensor reductions, so there is no multi-tensor path: the
    per-tensor reference or the fused step.
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
        foreach: bool | None = None,
        maximize: bool = False,
        beta1: float | None = None,
        relative_step: bool = True,
        scale_parameter: bool = True,
        fused: bool | None = None,
        cautious: bool = False,
    ) -> None:
        check_lr(lr, torch_phrase="Learning rate should be >= 0 but is: {value}")
        if not (beta2_decay <= 0.0):
            raise ValueError(f"beta2_decay should be <= 0 but is: {beta2_decay} (accepted range: <= 0)")
        if len(eps) != 2:
            raise ValueError(f"Invalid eps: {eps!r} (expected a pair (eps1 or None, eps2))")
        if eps[0] is not None:
            check_non_negative("eps[0] (eps1)", eps[0], torch_phrase="epsilon1 should be >= 0 but is: {value}")
        check_non_negative("eps[1] (eps2)", eps[1], torch_phrase="epsilon2 should be >= 0 but is: {value}")
        if not (d >= 1.0):
            raise ValueError(f"Clipping threshold d should be >= 1 but is: {d} (accepted range: >= 1)")
        check_non_negative("weight_decay", weight_decay, torch_phrase="weight_decay should be >= 0 but is: {value}")
        if beta1 is not None:
            check_in_range("beta1", beta1, 0.0, 1.0)
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=tuple(eps), d=d, weight_decay=weight_decay, beta1=beta1,
                        relative_step=relative_step, scale_parameter=scale_parameter, maximize=maximize, foreach=foreach,
                        fused=fused, cautious=bool(cautious))
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
        rule = adafactor_step_fused if resolve_fused(group["fused"], params, type(self).__name__) else adafactor_step
        rule(params, grads, states, increment_steps(states), lr=as_float(group["lr"]), beta2_decay=group["beta2_decay"],
             eps1=eps1, eps2=eps2, d=group["d"], weight_decay=group["weight_decay"], beta1=group["beta1"],
             relative_step=group["relative_step"], scale_parameter=group["scale_parameter"],
             maximize=group["maximize"], cautious=group["cautious"])
