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
import torch.distributed as dist
from torch import Tensor

from optimlab.clip import per_tensor_norms as clip_norms
from optimlab.optim._base import loop_pieces
from optimlab.optim._dtensor import counted_once, has_dtensor, local, reduce_over_shards

__all__ = ["combine_norms", "effective_lr_summary", "per_tensor_norms", "state_tensor_norms", "to_floats"]


def per_tensor_norms(tensors: Sequence[Tensor], ord: float = 2.0, like: Sequence[Tensor] | None = None) -> list[Tensor]:
    """``ord``-norm of each tensor (``-inf`` gives the min-abs), in the order given; one multi-tensor
    kernel per (device, dtype) (:func:`optimlab.clip.per_tensor_norms`, on detached views: parameters too take
    the multi-tensor kernel).

    Sharded tensors (DTensors, e.g. under FSDP2) count whole: the norms of this rank's shards are all-reduced
    across the ranks (one collective; every rank must call it). ``like[i]``, when given, is the DTensor whose
    layout ``tensors[i]`` (a plain tensor shaped like its local shard, e.g. a parameter update) has.
    """
    if not tensors:
        return []
    return clip_norms([t.detach() for t in tensors], ord, like=None if like is None else list(like))


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
    return {key: per_tensor_norms([v if v.dtype in (torch.float32, torch.float64) else v.float() for v in values],
                                  like=values)
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
def effective_lr_summary(group: dict[str, Any], params: Sequence[Tensor], states: Sequence[dict[str, Any]]
                         ) -> tuple[Tensor, Tensor, Tensor] | None:
    r"""``(mean, min, max)`` of :math:`\eta / (\sqrt{\hat v} + \epsilon)` over every coordinate of the group's
    Adam-family parameters, or ``None`` when the group has no Adam-family state. Sharded (DTensor) states count
    whole: the sum, the count and the extremes of the shards are all-reduced across the ranks (every rank must
    call it).

    The map :math:`v \mapsto \eta/(\sqrt{v/b}+\epsilon)` is decreasing, so the min and max come from
    ``aminmax`` over :math:`v`; the mean needs the full map. A large CPU moment is taken in slices
    (:func:`optimlab.optim._base.loop_pieces`), each mapped, summed and scanned for its extremes while it is in
    cache, so :math:`v` is read from memory once instead of once per operation; small moments are mapped
    together with multi-tensor kernels.
    """
    moments, sqrt_bias_corrections, counts, layouts = [], [], 0, []
    for param, state in zip(params, states):
        found = _adam_second_moment(group, param, state)
        if found is None:
            continue
        moment, bias_correction = found
        layouts.append(moment)
        moment = local(moment)
        moments.append(moment)
        sqrt_bias_corrections.append(math.sqrt(bias_correction))
        counts += moment.numel() if counted_once(layouts[-1]) else 0
    if not moments:
        return None
    lr, eps = float(group["lr"]), float(group["eps"])
    sums: list[Tensor] = []
    extremes: list[tuple[Tensor, Tensor, float]] = []  # (min, max) of v over a piece, and its bias correction

    def add(pieces: list[Tensor], corrections: list[float], counted: list[bool]) -> None:
        # 1/(sqrt(v)/c + eps) = c / (sqrt(v) + c*eps): three in-place passes over each piece, no division pass
        buffers = [torch.sqrt(piece) for piece in pieces]
        torch._foreach_add_(buffers, [eps * c for c in corrections])
        torch._foreach_reciprocal_(buffers)
        sums.extend(b.sum().to(torch.float64) * c * once for b, c, once in zip(buffers, corrections, counted))
        extremes.extend((*torch.aminmax(piece), c) for piece, c in zip(pieces, corrections) if piece.numel())

    whole: tuple[list[Tensor], list[float], list[bool]] = ([], [], [])
    for moment, c, layout in zip(moments, sqrt_bias_corrections, layouts):
        pieces = [piece for piece, in loop_pieces(moment)]
        if len(pieces) == 1:
            for batch, value in zip(whole, (moment, c, counted_once(layout))):
                batch.append(value)  # type: ignore[attr-defined]
            continue
        for piece in pieces:
            add([piece], [c], [counted_once(layout)])
    if whole[0]:
        add(*whole)
    total = torch.stack(sums).sum()
    if extremes:
        smallest = torch.stack([lo.to(torch.float64) / c ** 2 for lo, _, c in extremes]).min()
        largest = torch.stack([hi.to(torch.float64) / c ** 2 for _, hi, c in extremes]).max()
    else:  # only empty shards here
        smallest, largest = total.new_tensor(math.inf), total.new_tensor(0.0)
    if has_dtensor(layouts):  # sharded: sum and count over the ranks, the extremes' max (smallest negated)
        reduced = reduce_over_shards(torch.stack([total, total.new_tensor(float(counts))]), dist.ReduceOp.SUM, layouts)
        extreme = reduce_over_shards(torch.stack([largest, -smallest]), dist.ReduceOp.MAX, layouts)
        total, counts, largest, smallest = reduced[0], reduced[1], extreme[0], -extreme[1]
    return (lr * total / counts, lr / (largest.sqrt() + eps), lr / (smallest.sqrt() + eps))
