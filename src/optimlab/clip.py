r"""Gradient clipping: by total norm, by value, by a percentile of the recent norms, and unit-wise (AGC).

Functions (drop-in for ``torch.nn.utils``, written here):

* :func:`clip_grad_norm_` — scale all gradients by :math:`\min(1, c / (\lVert g \rVert_p + 10^{-6}))`.
* :func:`clip_grad_value_` — clamp every gradient entry to :math:`[-c, c]`.
* :func:`total_grad_norm` — :math:`\lVert g \rVert_p` of all gradients viewed as one vector.
* :func:`adaptive_grad_clip_` — unit-wise adaptive gradient clipping (Brock et al. 2021).

Stateful clippers, one call per optimizer step (after ``backward``, before ``optimizer.step``). Each
returns a :class:`ClipResult` from ``step()`` and has ``state_dict()`` / ``load_state_dict()`` so that
it resumes with training:

* :class:`NoClip`, :class:`NormClipper`, :class:`ValueClipper`, :class:`AGCClipper` (stateless),
* :class:`AdaptiveClipper` — clip to the :math:`(100 - p)`-th percentile of a window of recent norms,
* :class:`AutoClip` — Seetharaman et al. 2020: clip to the :math:`p`-th percentile of all norms so far.

Clipping by a configuration string (the bench lab and the trainer use this)::

    clipper = make_clipper("norm:1.0", model.parameters())
    ...
    loss.backward()
    result = clipper.step()          # ClipResult(clipped=True, norm=3.2, threshold=1.0)
    optimizer.step()

Accepted specs (see :data:`CLIP_SPECS`): ``"none"``, ``"norm:MAX_NORM"``, ``"value:CLIP_VALUE"``,
``"adaptive:PERCENTILE"`` (clip the top ``PERCENTILE`` % of norms), ``"autoclip:PERCENTILE"`` (clip at
the ``PERCENTILE``-th percentile), ``"agc:CLIPPING"``. ``ClipResult.norm`` is always the total L2 norm
of the gradients *before* clipping; ``threshold`` is the max norm, the clip value, the current
percentile threshold (``None`` until enough history), or the AGC clipping ratio.
"""

from __future__ import annotations

import math
import types
import warnings
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from optimlab import _compat
from optimlab.optim._base import group_by_device_and_dtype
from optimlab.optim._dtensor import has_dtensor, local, whole_norms

__all__ = [
    "CLIP_SPECS",
    "AGCClipper",
    "AdaptiveClipper",
    "AutoClip",
    "ClipResult",
    "Clipper",
    "NoClip",
    "NormClipper",
    "ValueClipper",
    "adaptive_grad_clip_",
    "clip_grad_norm_",
    "clip_grad_value_",
    "make_clipper",
    "total_grad_norm",
]

TensorOrTensors = Tensor | Iterable[Tensor]

#: The clipping specs :func:`make_clipper` accepts, with what they mean.
CLIP_SPECS: dict[str, str] = {
    "none": "no clipping (the norm is still measured)",
    "norm:MAX_NORM": "clip the total L2 norm to MAX_NORM > 0 (clip_grad_norm_)",
    "value:CLIP_VALUE": "clamp each gradient entry to [-CLIP_VALUE, CLIP_VALUE], CLIP_VALUE > 0",
    "adaptive:PERCENTILE": "AdaptiveClipper: clip to the (100 - PERCENTILE)-th percentile of the last 1000 norms",
    "autoclip:PERCENTILE": "AutoClip: clip to the PERCENTILE-th percentile of all norms so far",
    "agc:CLIPPING": "unit-wise adaptive gradient clipping with ratio CLIPPING > 0 (NFNets)",
}

_NORM_CLIP_EPS = 1e-6  # torch.nn.utils adds this to the norm in the clipping coefficient
_AGC_GRAD_EPS = 1e-6  # floor of a unit's gradient norm in AGC, to avoid dividing by zero


def _as_list(parameters: TensorOrTensors) -> list[Tensor]:
    """A list of tensors from a single tensor or an iterable (a generator is consumed once)."""
    if isinstance(parameters, Tensor):
        return [parameters]
    is_generator = isinstance(parameters, types.GeneratorType)
    params = list(parameters)
    if is_generator and not params:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    return params


def _grads_of(parameters: Iterable[Tensor]) -> list[Tensor]:
    return [p.grad for p in parameters if p.grad is not None]


def _use_foreach(foreach: bool | None, device: torch.device, tensors: list[Tensor]) -> bool:
    """Whether to use the ``torch._foreach_*`` kernels for ``tensors`` on ``device``.

    ``None`` picks them when the device has them (CPU, CUDA, the private-use backend) and every
    tensor is a plain ``Tensor``; ``True`` demands them and raises ``RuntimeError`` where they are missing.
    """
    device_ok = device.type in ("cpu", "cuda", _compat.privateuse1_backend_name()) and not (
        torch.jit.is_scripting()
    )
    if foreach is None:
        return device_ok and all(type(t) is Tensor for t in tensors)
    if foreach and not device_ok:
        raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
    return bool(foreach)


def _grouped(tensors: list[Tensor]) -> list[tuple[torch.device, list[Tensor]]]:
    """``tensors`` split by (device, dtype), so that one multi-tensor kernel sees one kind. Sharded (DTensor)
    gradients are replaced by this rank's shards, which in-place operations update."""
    return [(device, device_tensors) for (device, _), ([device_tensors], _) in
            group_by_device_and_dtype([[local(t) for t in tensors]]).items()]


def per_tensor_norms(tensors: list[Tensor], norm_type: float = 2.0, foreach: bool | None = None,
                     like: list[Tensor] | None = None) -> list[Tensor]:
    """The ``norm_type``-norm of each tensor, in order (``-inf``: the smallest absolute value), one multi-tensor
    kernel per (device, dtype) where ``foreach`` allows (:func:`_use_foreach`). Of a DTensor (an FSDP2 gradient),
    the norm of the whole tensor: its shards' norms all-reduced across the ranks
    (:func:`optimlab.optim._dtensor.whole_norms`; every rank must call it). ``like[i]``, when given, is the
    DTensor whose layout ``tensors[i]`` (a plain tensor shaped like its local shard, e.g. an update) has."""
    layouts = tensors if like is None else like
    shards = [local(t) for t in tensors]
    norms: list[Tensor | None] = [None] * len(shards)
    for (device, _), ([device_tensors], indices) in group_by_device_and_dtype([shards]).items():
        if _use_foreach(foreach, device, device_tensors):
            device_norms = torch._foreach_norm(device_tensors, norm_type)
        else:
            device_norms = [torch.linalg.vector_norm(t, norm_type) for t in device_tensors]
        for index, norm in zip(indices, device_norms):
            norms[index] = norm
    return whole_norms(norms, layouts, norm_type) if has_dtensor(layouts) else norms  # type: ignore[arg-type]


@torch.no_grad()
def total_grad_norm(
    tensors: TensorOrTensors, norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach: bool | None = None
) -> Tensor:
    r"""The p-norm of ``tensors`` viewed as one concatenated vector.

    .. math:: \lVert g \rVert_p = \Big\lVert \big(\lVert g_1 \rVert_p, \dots, \lVert g_n \rVert_p\big) \Big\rVert_p

    (for :math:`p = \infty` the max of the per-tensor max-abs values). ``tensors`` are the gradients
    themselves (not the parameters). Sharded gradients (DTensors, e.g. under FSDP2) count as whole tensors:
    their shards' norms are all-reduced, so every rank gets the same total. Returns a 0-dim tensor on the first tensor's device;
    ``tensor(0.)`` for no tensors. With ``error_if_nonfinite`` a NaN/inf norm raises ``RuntimeError``.
    """
    tensor_list = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    norm_type = float(norm_type)
    if not tensor_list:
        return torch.tensor(0.0)
    first_device = tensor_list[0].device
    norms = per_tensor_norms(tensor_list, norm_type, foreach)
    total = torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), norm_type)
    if error_if_nonfinite and bool(torch.logical_or(total.isnan(), total.isinf())):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    return total


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not (value > 0.0) or math.isinf(value):
        raise ValueError(f"Invalid {name}: {value} (accepted range: a finite value > 0)")
    return value


@torch.no_grad()
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    r"""Clip the gradients of ``parameters`` in place so that their total norm is at most ``max_norm``.

    .. math:: g \leftarrow g \cdot \min\Big(1, \frac{c}{\lVert g \rVert_p + 10^{-6}}\Big)

    Same signature, return value and results as ``torch.nn.utils.clip_grad_norm_``: ``norm_type`` may be
    any p (1, 2, ``inf``, fractional such as 0.5); parameters without a gradient are skipped; no
    parameters returns ``tensor(0.)``. Returns the total norm *before* clipping (a 0-dim tensor).
    Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural networks", 2013.
    """
    params = _as_list(parameters)
    grads = _grads_of(params)
    total = total_grad_norm(grads, norm_type, error_if_nonfinite, foreach)
    if not grads:
        return total
    coefficient = torch.clamp(float(max_norm) / (total + _NORM_CLIP_EPS), max=1.0)
    for device, device_grads in _grouped(grads):
        device_coefficient = coefficient.to(device)
        if _use_foreach(foreach, device, device_grads):
            torch._foreach_mul_(device_grads, device_coefficient)
        else:
            for grad in device_grads:
                grad.mul_(device_coefficient)
    return total


@torch.no_grad()
def clip_grad_value_(parameters: TensorOrTensors, clip_value: float, foreach: bool | None = None) -> None:
    r"""Clamp every gradient entry of ``parameters`` in place: :math:`g_i \leftarrow \max(-c, \min(c, g_i))`.

    Same signature and results as ``torch.nn.utils.clip_grad_value_`` (returns ``None``).
    """
    clip_value = float(clip_value)
    grads = _grads_of([parameters] if isinstance(parameters, Tensor) else parameters)
    if not grads:
        return
    for device, device_grads in _grouped(grads):
        if _use_foreach(foreach, device, device_grads):
            torch._foreach_clamp_min_(device_grads, -clip_value)
            torch._foreach_clamp_max_(device_grads, clip_value)
        else:
            for grad in device_grads:
                grad.clamp_(min=-clip_value, max=clip_value)


def _unitwise_norm(tensor: Tensor) -> Tensor:
    """Norm per output unit: over all dims but the first for matrices/kernels, of the whole tensor for
    vectors and scalars (biases, gains) — the unit convention of Brock et al. 2021 in torch's layout."""
    if tensor.dim() <= 1:
        return torch.linalg.vector_norm(tensor)
    return torch.linalg.vector_norm(tensor, dim=tuple(range(1, tensor.dim())), keepdim=True)


@torch.no_grad()
def adaptive_grad_clip_(parameters: TensorOrTensors, clipping: float = 0.01, eps: float = 1e-3) -> int:
    r"""Unit-wise adaptive gradient clipping (AGC), in place; returns how many units were clipped.

    For every output unit :math:`i` of every parameter :math:`W` (a row of a weight matrix, an output
    channel of a conv kernel; a whole vector for biases), with :math:`\lambda` = ``clipping``:

    .. math::
        G_i \leftarrow \begin{cases} \lambda \dfrac{\max(\lVert W_i \rVert, \epsilon)}{\lVert G_i \rVert} G_i
        & \text{if } \dfrac{\lVert G_i \rVert}{\max(\lVert W_i \rVert, \epsilon)} > \lambda \\ G_i & \text{otherwise}
        \end{cases}

    Brock, De, Smith & Simonyan, "High-Performance Large-Scale Image Recognition Without Normalization", 2021.
    """
    clipping = _check_positive("clipping", clipping)
    eps = float(eps)
    if not (eps >= 0.0):
        raise ValueError(f"Invalid eps: {eps} (accepted range: >= 0)")
    params = _as_list(parameters)
    if has_dtensor(params):
        raise NotImplementedError("adaptive_grad_clip_ (agc) does not support sharded (DTensor) parameters, e.g. "
                                  "under FSDP2, yet: clip by global norm (norm:C) instead")
    clipped_units = 0
    for param in params:
        if param.grad is None:
            continue
        max_grad_norm = _unitwise_norm(param.detach()).clamp(min=eps).mul_(clipping)
        grad_norm = _unitwise_norm(param.grad)
        too_large = grad_norm > max_grad_norm
        scale = torch.where(too_large, max_grad_norm / grad_norm.clamp(min=_AGC_GRAD_EPS), 1.0)
        param.grad.mul_(scale.to(param.grad.dtype))
        clipped_units += int(too_large.sum())
    return clipped_units


@dataclass(frozen=True)
class ClipResult:
    """What one clipping step did: whether it changed any gradient, the total L2 gradient norm before
    clipping, and the threshold in force (``None`` when there is none yet)."""

    clipped: bool
    norm: float
    threshold: float | None


class Clipper(Protocol):
    """The interface every clipper offers: one ``step()`` per optimizer step, and resumable state."""

    def step(self) -> ClipResult: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class _StatelessClipper:
    """Shared plumbing of the clippers without state: keep the parameters, measure the L2 norm."""

    def __init__(self, parameters: TensorOrTensors) -> None:
        self.parameters = _as_list(parameters)

    def _norm(self) -> float:
        return float(total_grad_norm(_grads_of(self.parameters)))

    def state_dict(self) -> dict[str, Any]:
        """Empty: nothing to resume."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore (accepts the empty dict from :meth:`state_dict`)."""

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in vars(self).items() if k != "parameters")
        return f"{type(self).__name__}({settings})"


class NoClip(_StatelessClipper):
    """Measures the total L2 gradient norm and leaves the gradients alone."""

    def step(self) -> ClipResult:
        """Return ``ClipResult(False, norm, None)``."""
        return ClipResult(False, self._norm(), None)


class NormClipper(_StatelessClipper):
    r"""Total-norm clipping: :math:`g \leftarrow g \min(1, c / (\lVert g \rVert_2 + 10^{-6}))` (Pascanu et al. 2013)."""

    def __init__(self, parameters: TensorOrTensors, max_norm: float) -> None:
        super().__init__(parameters)
        self.max_norm = _check_positive("max_norm", max_norm)

    def step(self) -> ClipResult:
        """Clip in place; ``clipped`` is whether the scale factor was below 1."""
        norm = float(clip_grad_norm_(self.parameters, self.max_norm))
        return ClipResult(norm + _NORM_CLIP_EPS > self.max_norm, norm, self.max_norm)


class ValueClipper(_StatelessClipper):
    r"""Value clipping: :math:`g_i \leftarrow \max(-c, \min(c, g_i))`."""

    def __init__(self, parameters: TensorOrTensors, clip_value: float) -> None:
        super().__init__(parameters)
        self.clip_value = _check_positive("clip_value", clip_value)

    def step(self) -> ClipResult:
        """Clamp in place; ``clipped`` is whether any entry exceeded the clip value."""
        grads = _grads_of(self.parameters)
        norm = self._norm()
        largest = float(total_grad_norm(grads, math.inf)) if grads else 0.0
        clip_grad_value_(self.parameters, self.clip_value)
        return ClipResult(largest > self.clip_value, norm, self.clip_value)


class AGCClipper(_StatelessClipper):
    """:func:`adaptive_grad_clip_` as a clipper; ``threshold`` reports the clipping ratio."""

    def __init__(self, parameters: TensorOrTensors, clipping: float = 0.01, eps: float = 1e-3) -> None:
        super().__init__(parameters)
        self.clipping = _check_positive("clipping", clipping)
        self.eps = float(eps)

    def step(self) -> ClipResult:
        """Clip unit-wise in place; ``clipped`` is whether any unit was rescaled."""
        norm = self._norm()
        clipped_units = adaptive_grad_clip_(self.parameters, self.clipping, self.eps)
        return ClipResult(clipped_units > 0, norm, self.clipping)


class AdaptiveClipper:
    r"""Clip the total gradient norm to a high percentile of the recently seen norms.

    Each ``step()`` measures :math:`n_t = \lVert g_t \rVert_2`, appends it to a window of the last
    ``history_size`` finite norms (all of them when ``history_size`` is ``None``), and once the window
    holds at least ``min_history`` norms clips to

    .. math:: \tau_t = \operatorname{percentile}_{100 - p}(n_{t-H+1}, \dots, n_t)

    (numpy's linear-interpolation percentile, current norm included), i.e. it clips the largest
    ``percentile`` % of the norms. Non-finite norms are neither recorded nor clipped (leave those
    steps to :class:`optimlab.guard.NonFiniteGuard`). The window is in :meth:`state_dict`.
    """

    def __init__(
        self,
        parameters: TensorOrTensors,
        percentile: float = 10.0,
        history_size: int | None = 1000,
        min_history: int = 10,
    ) -> None:
        percentile = float(percentile)
        if not (0.0 <= percentile < 100.0):
            raise ValueError(f"Invalid percentile: {percentile} (accepted range: [0, 100))")
        if history_size is not None and (not isinstance(history_size, int) or history_size < 1):
            raise ValueError(f"Invalid history_size: {history_size} (accepted: an int >= 1, or None for unbounded)")
        if not isinstance(min_history, int) or min_history < 1:
            raise ValueError(f"Invalid min_history: {min_history} (accepted range: an int >= 1)")
        if history_size is not None and min_history > history_size:
            raise ValueError(f"Invalid min_history: {min_history} (accepted range: [1, history_size={history_size}])")
        self.parameters = _as_list(parameters)
        self.percentile = percentile
        self.history_size = history_size
        self.min_history = min_history
        self.history: deque[float] = deque(maxlen=history_size)

    @property
    def clip_percentile(self) -> float:
        """The percentile of the window that the norm is clipped to: ``100 - percentile``."""
        return 100.0 - self.percentile

    def threshold(self) -> float | None:
        """The current clipping threshold, or ``None`` while the window holds fewer than ``min_history`` norms."""
        if len(self.history) < self.min_history:
            return None
        return float(np.percentile(np.asarray(self.history, dtype=np.float64), self.clip_percentile))

    def step(self) -> ClipResult:
        """Record this step's norm, then clip to the window's threshold once there is enough history."""
        grads = _grads_of(self.parameters)
        norm = float(total_grad_norm(grads))
        if not math.isfinite(norm):
            return ClipResult(False, norm, self.threshold())
        self.history.append(norm)
        threshold = self.threshold()
        if threshold is None or norm <= threshold:
            return ClipResult(False, norm, threshold)
        clip_grad_norm_(self.parameters, threshold)
        return ClipResult(True, norm, threshold)

    def state_dict(self) -> dict[str, Any]:
        """The settings and the window of norms (plain Python floats, safe for ``weights_only`` loading)."""
        return {
            "percentile": self.percentile,
            "history_size": self.history_size,
            "min_history": self.min_history,
            "history": list(self.history),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the settings and the window saved by :meth:`state_dict`."""
        self.percentile = float(state_dict["percentile"])
        self.history_size = state_dict["history_size"]
        self.min_history = int(state_dict["min_history"])
        self.history = deque((float(n) for n in state_dict["history"]), maxlen=self.history_size)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(percentile={self.percentile}, history_size={self.history_size}, "
                f"min_history={self.min_history}, seen={len(self.history)})")


class AutoClip(AdaptiveClipper):
    r"""AutoClip: clip to the ``clip_percentile``-th percentile of *all* gradient norms seen so far.

    .. math:: \tau_t = \operatorname{percentile}_{p}(n_1, \dots, n_t)

    Seetharaman, Wichern, Pardo & Le Roux, "AutoClip: Adaptive Gradient Clipping for Source Separation
    Networks", 2020. A preset of :class:`AdaptiveClipper` (unbounded window, clipping from the first step).
    """

    def __init__(self, parameters: TensorOrTensors, clip_percentile: float = 10.0) -> None:
        clip_percentile = float(clip_percentile)
        if not (0.0 < clip_percentile <= 100.0):
            raise ValueError(f"Invalid clip_percentile: {clip_percentile} (accepted range: (0, 100])")
        super().__init__(parameters, percentile=100.0 - clip_percentile, history_size=None, min_history=1)


def _spec_error(spec: str, reason: str) -> ValueError:
    forms = "; ".join(f"{form!r}: {meaning}" for form, meaning in CLIP_SPECS.items())
    return ValueError(f"Invalid clipping spec {spec!r}: {reason}. Valid forms: {forms}")


def make_clipper(spec: str, parameters: TensorOrTensors) -> Clipper:
    """Build a clipper from a spec string such as ``"norm:1.0"`` (see :data:`CLIP_SPECS` and the module docstring).

    Raises ``ValueError`` listing the valid forms for an unknown kind or a bad value.
    """
    if not isinstance(spec, str):
        raise _spec_error(repr(spec), "expected a string")
    kind, _, argument = spec.strip().lower().partition(":")
    if kind == "none":
        if argument:
            raise _spec_error(spec, "'none' takes no value")
        return NoClip(parameters)
    builders = {
        "norm": NormClipper,
        "value": ValueClipper,
        "adaptive": lambda params, value: AdaptiveClipper(params, percentile=value),
        "autoclip": lambda params, value: AutoClip(params, clip_percentile=value),
        "agc": lambda params, value: AGCClipper(params, clipping=value),
    }
    if kind not in builders:
        raise _spec_error(spec, f"unknown kind {kind!r}")
    try:
        value = float(argument)
    except ValueError:
        raise _spec_error(spec, f"{kind!r} needs a number after ':'") from None
    try:
        return builders[kind](parameters, value)
    except ValueError as err:
        raise _spec_error(spec, str(err)) from None
