r"""Weight averaging, as ``torch.optim.swa_utils``: :class:`AveragedModel` (SWA or EMA of a model's weights),
:class:`~optimlab.schedules.SWALR` (anneal to a constant SWA learning rate) and :func:`update_bn` (recompute
BatchNorm statistics for averaged weights).

Each call of ``averaged.update_parameters(model)`` adds the model's current weights :math:`w` to the average
:math:`\bar w` (the first call copies them, :math:`n` counts the calls before this one):

* SWA, the default (Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
  UAI 2018): the running mean :math:`\bar w \leftarrow \bar w + (w - \bar w)/(n + 1)`;
* EMA (``multi_avg_fn=get_ema_multi_avg_fn(decay)``; Polyak averaging with exponential weights):
  :math:`\bar w \leftarrow \text{decay}\,\bar w + (1 - \text{decay})\, w`.

With ``use_buffers=True`` the buffers (BatchNorm running statistics, counters) are averaged too; otherwise they
are copied from the model at every update. Same arguments, state (the ``n_averaged`` buffer) and arithmetic
as torch 2.13 (on the CPU the running mean is computed per tensor, on CUDA float weights are blended with
``lerp``; integer buffers are averaged and truncated), so results are identical; tested against
``torch.optim.swa_utils``.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from optimlab.schedules.swa import SWALR

__all__ = ["AveragedModel", "SWALR", "update_bn", "get_ema_multi_avg_fn", "get_swa_multi_avg_fn", "get_ema_avg_fn",
           "get_swa_avg_fn"]

TensorList = Sequence[Tensor]
MultiAvgFn = Callable[[TensorList, TensorList, Any], None]
AvgFn = Callable[[Tensor, Tensor, Any], Tensor]


def _check_decay(decay: float) -> None:
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"Invalid decay value {decay} provided. Please provide a value in [0,1] range.")


def _is_float(tensor: Tensor) -> bool:
    return torch.is_floating_point(tensor) or torch.is_complex(tensor)


def get_ema_multi_avg_fn(decay: float = 0.999) -> MultiAvgFn:
    r"""In-place EMA over lists of one device and dtype: :math:`\bar w \leftarrow \bar w + (1 - d)(w - \bar w)`
    (``lerp``) for float tensors, :math:`\bar w \leftarrow d\,\bar w + (1 - d)\,w` (truncated) for integers."""
    _check_decay(decay)

    @torch.no_grad()
    def ema_update(averaged: TensorList, current: TensorList, _n_averaged: Any) -> None:
        if _is_float(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1 - decay)
        else:
            for avg, cur in zip(averaged, current, strict=True):
                avg.copy_(avg * decay + cur * (1 - decay))

    return ema_update


def get_swa_multi_avg_fn() -> MultiAvgFn:
    r"""In-place running mean over lists of one device and dtype: :math:`\bar w \leftarrow \bar w + (w -
    \bar w)/(n + 1)` (``lerp`` by :math:`1/(n+1)` for float tensors, integer division for integer ones)."""

    @torch.no_grad()
    def swa_update(averaged: TensorList, current: TensorList, n_averaged: Tensor | int) -> None:
        if _is_float(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1 / (n_averaged + 1))
            return
        differences = torch._foreach_sub(current, averaged)
        if isinstance(n_averaged, Tensor):
            torch._foreach_addcdiv_(averaged, differences, [n_averaged + 1] * len(averaged))
        else:
            torch._foreach_add_(averaged, differences, alpha=1.0 / (n_averaged + 1))

    return swa_update


def get_ema_avg_fn(decay: float = 0.999) -> AvgFn:
    r"""Per-tensor EMA, returning :math:`d\,\bar w + (1 - d)\,w` (for ``avg_fn``)."""
    _check_decay(decay)

    @torch.no_grad()
    def ema_update(averaged: Tensor, current: Tensor, _n_averaged: Any) -> Tensor:
        return decay * averaged + (1 - decay) * current

    return ema_update


def get_swa_avg_fn() -> AvgFn:
    r"""Per-tensor running mean, returning :math:`\bar w + (w - \bar w)/(n + 1)` (for ``avg_fn``)."""

    @torch.no_grad()
    def swa_update(averaged: Tensor, current: Tensor, n_averaged: Tensor | int) -> Tensor:
        return averaged + (current - averaged) / (n_averaged + 1)

    return swa_update


#: Devices where torch's default SWA update uses the multi-tensor ``lerp`` (elsewhere: the per-tensor mean).
_FOREACH_DEVICES = ("cuda", "xpu")


def _by_device_and_dtype(averaged: list[Tensor], current: list[Tensor]) -> dict[tuple, tuple[list[Tensor], list[Tensor]]]:
    groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
    for avg, cur in zip(averaged, current):
        lists = groups.setdefault((avg.device, avg.dtype), ([], []))
        lists[0].append(avg)
        lists[1].append(cur)
    return groups


class AveragedModel(nn.Module):
    r"""A copy of ``model`` (on ``device`` if given) holding a running average of its weights (module
    docstring); call ``update_parameters(model)`` after optimizer steps, evaluate with ``averaged(x)``.

    Args:
        model: the model whose weights are averaged (deep-copied; the copy is ``averaged.module``).
        device: where the copy lives (default: where the model is).
        avg_fn: per-tensor rule ``avg_fn(averaged, current, n_averaged) -> new averaged``.
        multi_avg_fn: in-place rule over lists of one device and dtype, e.g. :func:`get_ema_multi_avg_fn`.
            At most one of ``avg_fn`` / ``multi_avg_fn``; neither means SWA (the running mean).
        use_buffers: average the buffers too (otherwise they are copied from ``model`` at each update).

    The rules are not saved in ``state_dict()``; ``n_averaged`` is (a buffer), so a checkpoint resumes exactly.
    """

    n_averaged: Tensor

    def __init__(self, model: nn.Module, device: int | torch.device | None = None, avg_fn: AvgFn | None = None,
                 multi_avg_fn: MultiAvgFn | None = None, use_buffers: bool = False) -> None:
        super().__init__()
        if avg_fn is not None and multi_avg_fn is not None:
            raise ValueError("Only one of avg_fn and multi_avg_fn should be provided (avg_fn: per tensor, "
                             "multi_avg_fn: in place over lists)")
        self.module = copy.deepcopy(model)
        if device is not None:
            self.module = self.module.to(device)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=device))
        self.avg_fn = avg_fn
        self.multi_avg_fn = multi_avg_fn
        self.use_buffers = use_buffers

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The averaged model's forward pass."""
        return self.module(*args, **kwargs)

    def _pairs(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """(averaged, model) tensors to average: parameters, and buffers with ``use_buffers``."""
        ours: Iterable[Tensor] = self.module.parameters()
        theirs: Iterable[Tensor] = model.parameters()
        if self.use_buffers:
            ours = itertools.chain(ours, self.module.buffers())
            theirs = itertools.chain(theirs, model.buffers())
        averaged, current = [], []
        for avg, cur in zip(ours, theirs):
            averaged.append(avg.detach())
            current.append(cur.detach().to(avg.device))
        return averaged, current

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """Add ``model``'s current weights to the average (the first call copies them)."""
        averaged, current = self._pairs(model)
        if self.n_averaged == 0:
            for avg, cur in zip(averaged, current):
                avg.copy_(cur)
        elif self.avg_fn is not None:
            for avg, cur in zip(averaged, current):
                avg.copy_(self.avg_fn(avg, cur, self.n_averaged.to(avg.device)))
        else:
            for (device, dtype), (avg_list, cur_list) in _by_device_and_dtype(averaged, current).items():
                n_averaged = self.n_averaged.to(device)
                if self.multi_avg_fn is not None:
                    self.multi_avg_fn(avg_list, cur_list, n_averaged)
                elif device.type in _FOREACH_DEVICES and (dtype.is_floating_point or dtype.is_complex):
                    get_swa_multi_avg_fn()(avg_list, cur_list, n_averaged)
                else:  # as torch: the per-tensor running mean on the CPU (and for integer buffers, where
                    # torch's multi-tensor integer path fails)
                    mean = get_swa_avg_fn()
                    for avg, cur in zip(avg_list, cur_list):
                        avg.copy_(mean(avg, cur, n_averaged))
        if not self.use_buffers:
            for ours, theirs in zip(self.module.buffers(), model.buffers(), strict=True):
                ours.detach().copy_(theirs.detach().to(ours.device))
        self.n_averaged += 1


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LazyBatchNorm1d,
                nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)


@torch.no_grad()
def update_bn(loader: Iterable[Any], model: nn.Module, device: int | torch.device | None = None) -> None:
    r"""Recompute every BatchNorm layer's running mean and variance with one pass over ``loader``, as an equal
    average over its batches (the statistics of averaged weights are not the average of the statistics).

    Each batch is a tensor, or a list/tuple whose first element is the model input; it is moved to ``device``
    if given. The model's training mode and the layers' ``momentum`` are restored afterwards; a model
    without BatchNorm is left untouched (no pass over the data).
    """
    momenta = {module: module.momentum for module in model.modules() if isinstance(module, _BATCH_NORMS)}
    if not momenta:
        return
    for module in momenta:
        module.reset_running_stats()
        module.momentum = None  # None: a cumulative (equal-weight) average over the batches
    was_training = model.training
    model.train()
    for batch in loader:
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        model(inputs.to(device) if device is not None else inputs)
    for module, momentum in momenta.items():
        module.momentum = momentum
    model.train(was_training)
