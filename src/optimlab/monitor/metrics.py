r"""The quantities :class:`~optimlab.monitor.OptimizerMonitor` records, computed with multi-tensor kernels.

Per param group :math:`G` (and optionally per parameter), with :math:`\theta^-`/:math:`\theta^+` the
parameters before/after the step and :math:`g` the gradients the step used:

.. math::
    \lVert g \rVert_G = \Big(\sum_{p\in G} \lVert g_p \rVert_2^2\Big)^{1/2}, \quad
    \lVert \Delta \rVert_G = \lVert \theta^+ - \theta^- \rVert_G, \quad
    r_G = \lVert \Delta \rVert_G / \lVert \theta^+ \rVert_G

the norm of every floating state tensor (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``, ...), and for
Adam-family state (``exp_avg_sq`` with ``betas``/``eps`` in the group, Kingma & Ba 2015) the effective
per-coordinate learning rate

.. math:: \eta^{\text{eff}}_i = \frac{\eta}{\sqrt{\hat v_i} + \epsilon}, \qquad \hat v = \frac{v}{1 - \beta_2^t}

(``max_exp_avg_sq`` in place of :math:`v` with ``amsgrad``), summarised by its mean, min and max.
Every function returns 0-dim tensors; the monitor converts them to floats with few device syncs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from optimlab.optim._base import group_by_device_and_dtype

__all__ = ["combine_norms", "effective_lr_summary", "per_tensor_norms", "state_tensor_norms", "to_floats"]


def per_tensor_norms(tensors: Sequence[Tensor], ord: float = 2.0) -> list[Tensor]:
    """``ord``-norm of each tensor (``-inf`` gives the min-abs), in the order given; one multi-tensor
    kernel per (device, dtype)."""
    tensors = list(tensors)
    if not tensors:
        return []
    norms: list[Tensor | None] = [None] * len(tensors)
    for (device, _), ([group], indices) in group_by_device_and_dtype([tensors]).items():
        if device.type in ("cpu", "cuda"):
            group_norms = torch._foreach_norm(group, ord)
        else:
            group_norms = [torch.linalg.vector_norm(t, ord) for t in group]
        for index, norm in zip(indices, group_norms):
            norms[index] = norm
    return norms  # type: ignore[return-value]


def combine_norms(norms: Sequence[float]) -> float:
    """The L2 norm of the concatenation, from the per-tensor L2 norms: :math:`(\\sum_i n_i^2)^{1/2}`."""
    return math.sqrt(sum(n * n for n in norms))


def to_floats(tensors: Sequence[Tensor]) -> list[float]:
    """0-dim tensors to Python floats, with one device sync when they share a device."""
    if not tensors:
        return []
    if len({t.device for t in tensors}) == 1:
        return torch.stack([t.to(torch.float64) for t in tensors]).tolist()
    return [float(t) for t in tensors]


def _is_moment(value: Any, param: Tensor) -> bool:
    return torch.is_tensor(value) and value.is_floating_point() and value.dim() > 0 and value.numel() > 0 and (
        value.numel() <= param.numel())


def state_tensor_norms(params: Sequence[Tensor], states: Sequence[dict[str, Any]]) -> dict[str, list[Tensor]]:
    """For every state key holding a floating, non-scalar tensor (moments, factored rows/columns, momentum
    buffers), the per-tensor L2 norms across ``params``. Quantised (integer) storage and scalar counters
    are left out."""
    by_key: dict[str, list[Tensor]] = {}
    for param, state in zip(params, states):
        for key, value in state.items():
            if _is_moment(value, param):
                by_key.setdefault(key, []).append(value)
    return {key: per_tensor_norms([v if v.dtype in (torch.float32, torch.float64) else v.float() for v in values])
            for key, values in by_key.items()}


def _adam_second_moment(group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> tuple[Tensor, float] | None:
    """``(v, 1 - beta2^t)`` for an Adam-family parameter state, or ``None`` when the state is not one."""
    key = "max_exp_avg_sq" if group.get("amsgrad") and "max_exp_avg_sq" in state else "exp_avg_sq"
    second_moment = state.get(key)
    betas = group.get("betas")
    if ("eps" not in group or betas is None or "step" not in state or not torch.is_tensor(second_moment)
            or not second_moment.is_floating_point() or second_moment.shape != param.shape):
        return None
    step = float(state["step"])
    if step <= 0:
        return None
    return second_moment, 1.0 - float(betas[1]) ** step


@torch.no_grad()
def effective_lr_summary(group: dict[str, Any], params: Sequence[Tensor], states: Sequence[dict[str, Any]],
                         scratch: Sequence[Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor] | None:
    r"""``(mean, min, max)`` of :math:`\eta / (\sqrt{\hat v} + \epsilon)` over every coordinate of the group's
    Adam-family parameters, or ``None`` when the group has no Adam-family state.

    The map :math:`v \mapsto \eta/(\sqrt{v/b}+\epsilon)` is decreasing, so the min and max come from one
    ``aminmax`` pass over :math:`v`; the mean needs the full map, computed in place in ``scratch`` (tensors
    shaped like ``params``, e.g. the monitor's parameter buffers) when given, else in fresh memory.
    """
    moments, sqrt_bias_corrections, buffers, counts = [], [], [], 0
    for index, (param, state) in enumerate(zip(params, states)):
        found = _adam_second_moment(group, param, state)
        if found is None:
            continue
        moment, bias_correction = found
        moments.append(moment)
        sqrt_bias_corrections.append(math.sqrt(bias_correction))
        candidate = scratch[index] if scratch is not None else None
        usable = candidate is not None and candidate.shape == moment.shape and candidate.dtype == moment.dtype and (
            candidate.device == moment.device)
        buffers.append(candidate if usable else torch.empty_like(moment))
        counts += moment.numel()
    if not moments:
        return None
    lr, eps = float(group["lr"]), float(group["eps"])
    # 1/(sqrt(v)/c + eps) = c / (sqrt(v) + c*eps): three in-place passes, no division pass
    for moment, buffer in zip(moments, buffers):
        torch.sqrt(moment, out=buffer)
    torch._foreach_add_(buffers, [eps * c for c in sqrt_bias_corrections])
    torch._foreach_reciprocal_(buffers)
    total = torch.stack([b.sum().to(torch.float64) * c for b, c in zip(buffers, sqrt_bias_corrections)]).sum()
    extremes = [torch.aminmax(m) for m in moments]
    smallest_moment = torch.stack([lo.to(torch.float64) / c ** 2 for (lo, _), c in zip(extremes, sqrt_bias_corrections)])
    largest_moment = torch.stack([hi.to(torch.float64) / c ** 2 for (_, hi), c in zip(extremes, sqrt_bias_corrections)])
    return (lr * total / counts, lr / (largest_moment.max().sqrt() + eps), lr / (smallest_moment.min().sqrt() + eps))
