"""Shared machinery for optimlab's optimizers: argument validation, the step skeleton, tensor grouping.

Every optimizer in :mod:`optimlab.optim` subclasses :class:`OptimlabOptimizer`, which is a plain
:class:`torch.optim.Optimizer`. A subclass supplies two things:

* ``_state_keys(group)``: the per-parameter state entries (the same keys, in the same order, as
  ``torch.optim``), which the default ``_init_group`` creates lazily: ``step`` and the 0-dim entries of
  ``scalar_state_init`` as scalar tensors, every other key as a zero buffer shaped like the parameter
  (optimizers whose state starts otherwise override ``_init_group`` instead), and
* ``_update_group(group, params, grads, states)``: apply the update rule to the parameters of one
  param group that have a gradient, either through its per-tensor reference path or its multi-tensor
  (``torch._foreach_*``) path, chosen by :meth:`OptimlabOptimizer._use_foreach`.

Everything else (closures, sparse-gradient checks, state_dict and hooks) is handled here or by
``torch.optim.Optimizer`` itself. The helpers below are shared by every update rule so that no rule
re-implements them: :func:`prepare_grad` / :func:`prepare_grads` (``maximize`` and coupled or
decoupled weight decay), :func:`increment_steps` (the ``step`` counters), :func:`real_views` (complex
parameters as real pairs), :func:`zeros_state` (lazy moment buffers) and :func:`foreach_groups`
(multi-tensor batches of one device and dtype); :func:`default_foreach` is the path ``foreach=None``
takes and :func:`loop_pieces` the slices the per-tensor path updates a large tensor in. ``lr`` may be a float or a 0-dim tensor;
:func:`as_float` reads either.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from optimlab import _compat
from optimlab.optim._dtensor import check_dtensor_support

__all__ = [
    "OptimlabOptimizer",
    "ParamsT",
    "check_betas",
    "check_differentiable",
    "check_in_range",
    "check_lr",
    "check_non_negative",
    "check_positive_int",
    "reject_unsupported",
    "group_by_device_and_dtype",
    "foreach_groups",
    "default_foreach",
    "FOREACH_CPU_MAX_MEAN_NUMEL",
    "LOOP_CHUNK_NUMEL",
    "loop_pieces",
    "as_float",
    "scalar_hyperparameter",
    "new_step_tensor",
    "increment_steps",
    "prepare_grad",
    "prepare_grads",
    "real_views",
    "zeros_state",
]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]

#: device types of optimlab's fused (compiled) path (:mod:`optimlab.optim._fused`)
FUSED_DEVICE_TYPES = ("cpu", "cuda")


def as_float(value: float | Tensor) -> float:
    """Return ``value`` as a Python float (0-dim tensors allowed). Under ``torch.compile`` a tensor stays a
    tensor (float64, the precision of a Python float): ``.item()`` would break the graph, as torch.optim's
    ``_get_value`` avoids too."""
    if isinstance(value, Tensor):
        return value.to(torch.float64) if torch.compiler.is_compiling() else float(value.item())  # type: ignore[return-value]
    return float(value)


def scalar_hyperparameter(value: float | Tensor) -> float | Tensor:
    """A hyperparameter as torch's rules use it: a Python number unchanged, a 1-element tensor as a 0-dim
    tensor (so its arithmetic, e.g. float32 rounding of a float32 ``lr``, is torch's)."""
    return value.squeeze() if isinstance(value, Tensor) and value.dim() != 0 else value


#: torch.optim's name for an argument in its error messages, where it differs from the argument's name
_TORCH_LABELS = {"eps": "epsilon"}


def _invalid(name: str, value: Any, accepted: str, torch_phrase: str | None = None) -> ValueError:
    """``ValueError`` whose message starts with torch's phrase (so that code matching torch.optim's errors
    keeps working) and names the argument and the accepted range."""
    phrase = torch_phrase or f"Invalid {_TORCH_LABELS.get(name, name)} value: {value}"
    argument = "" if f" {name} " in f" {phrase} " else f"{name}; "
    return ValueError(f"{phrase} ({argument}accepted range: {accepted})")


def _number(name: str, value: Any) -> float:
    """``value`` as a float; a ``TypeError`` naming ``name`` unless it is a real number or a one-element tensor."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element (Invalid {name}: got shape {tuple(value.shape)})")
        if value.is_complex():
            raise TypeError(f"Invalid {name}: a complex tensor; accepted: a real number or a one-element tensor")
        return as_float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name}: {value!r} (a {type(value).__name__}); accepted: a float or a "
                        "one-element tensor")
    return float(value)


def check_lr(lr: float | Tensor, name: str = "lr", *, torch_phrase: str = "Invalid learning rate: {value}") -> None:
    """Raise unless ``lr`` is a finite float >= 0 or a one-element tensor holding one (``TypeError`` for
    other types, e.g. a string; ``ValueError`` for a bad value, starting with torch's ``torch_phrase``)."""
    value = _number(name, lr)
    if not (value >= 0.0) or math.isinf(value):
        raise _invalid(name, value, "a finite value >= 0", torch_phrase.format(value=value))


def check_non_negative(name: str, value: float, *, torch_phrase: str | None = None) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` >= 0 (NaN is rejected too); ``torch_phrase``
    replaces torch's usual ``"Invalid <name> value: <value>"`` where the torch class words it otherwise."""
    value = _number(name, value)
    if not (value >= 0.0):
        raise _invalid(name, value, ">= 0", torch_phrase and torch_phrase.format(value=value))


def check_positive_int(name: str, value: int) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer >= 1 (``bool`` is rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (accepted: an integer >= 1)")


def check_in_range(
    name: str, value: float, low: float, high: float, *, low_inclusive: bool = True, high_inclusive: bool = False,
    torch_phrase: str | None = None,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` lies in the interval [low, high) (bounds
    configurable); ``torch_phrase`` as in :func:`check_non_negative`."""
    value = _number(name, value)
    above = value >= low if low_inclusive else value > low
    below = value <= high if high_inclusive else value < high
    if not (above and below):
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        raise _invalid(name, value, f"{left}{low}, {high}{right}", torch_phrase and torch_phrase.format(value=value))


def check_betas(betas: Sequence[float], names: tuple[str, ...] = ("beta1", "beta2")) -> None:
    """Validate a tuple of betas: each in [0, 1). Names the failing entry (``betas[0]``/``beta1``) after
    torch's phrase (``Invalid beta parameter at index 0: ...``)."""
    if len(betas) != len(names):
        raise ValueError(f"Invalid betas: expected {len(names)} values, got {len(betas)}")
    for index, (beta, label) in enumerate(zip(betas, names)):
        value = _number(f"betas[{index}]", beta)
        check_in_range(f"betas[{index}] ({label})", value, 0.0, 1.0,
                       torch_phrase=f"Invalid beta parameter at index {index}: {{value}}")


def reject_unsupported(class_name: str, **flags: bool | None) -> None:
    """Raise ``NotImplementedError`` for each flag that is set but not implemented by optimlab.

    torch.optim accepts ``capturable``, ``differentiable`` and ``fused``; optimlab keeps the same
    constructor signature so that imports can be swapped, and refuses loudly rather than ignoring a
    flag the caller relies on.
    """
    for name, value in flags.items():
        if value:
            raise NotImplementedError(
                f"{class_name}({name}=True) is not supported by optimlab yet; pass {name}=False "
                f"(or use torch.optim.{class_name} for that feature)"
            )


def check_differentiable(differentiable: bool, *, foreach: bool | None = None, fused: bool | None = None) -> None:
    """``differentiable=True`` (gradients flow through the update, for meta-learning) runs the per-tensor
    path under autograd: the multi-tensor and fused paths refuse it, with torch's errors."""
    if differentiable and fused:
        raise RuntimeError("`fused` does not support `differentiable` (pass fused=None with differentiable=True)")
    if differentiable and foreach:
        raise RuntimeError("`foreach` does not support `differentiable`: _foreach ops don't support autograd "
                           "(pass foreach=None or False with differentiable=True)")


def group_by_device_and_dtype(tensor_lists: list[list[Tensor | None]]) -> dict:
    """Group parallel tensor lists by (device, dtype) so each multi-tensor kernel sees one kind.

    Returns ``{(device, dtype): (lists, indices)}`` like torch's internal helper, which it wraps
    (through :mod:`optimlab._compat`); ``indices`` are the positions of the group's tensors in the input
    lists. An empty input list (e.g. no ``max_exp_avg_sq`` without AMSGrad) stays empty in every group.
    """
    return _compat.group_tensors_by_device_and_dtype(tensor_lists)


def foreach_groups(
    tensor_lists: list[list[Tensor]], per_tensor: Sequence[Sequence[Any]] = ()
) -> Iterator[tuple[list[list[Tensor]], list[list[Any]]]]:
    """Yield ``(tensor_lists, per_tensor_values)`` batches that share one device and dtype.

    ``per_tensor`` holds parallel lists that are not grouped by torch (Python floats such as step
    counts, or 0-dim CPU tensors such as NAdam's ``mu_product``); each batch gets the entries at
    its tensors' positions, so per-parameter values stay aligned with their tensors.
    """
    for lists, indices in group_by_device_and_dtype(tensor_lists).values():  # type: ignore[arg-type]
        yield [list(tensors) for tensors in lists], [[values[i] for i in indices] for values in per_tensor]


def zeros_state(param: Tensor) -> Tensor:
    """A zero buffer shaped, typed and strided like ``param`` (torch.optim's lazy moment init)."""
    return torch.zeros_like(param, memory_format=torch.preserve_format)


def increment_steps(states: Sequence[dict[str, Any]]) -> list[float]:
    """Add one to each state's ``step`` counter (a 0-dim tensor, as in torch.optim) and return the
    new counts as floats, :math:`t \\leftarrow t + 1`, which the update rules use for bias corrections."""
    counters = [state["step"] for state in states]
    torch._foreach_add_(counters, 1)
    return [as_float(counter) for counter in counters]


def real_views(tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Complex tensors as real views with a trailing dimension of 2 (``torch.view_as_real``).

    Every classic rule is element-wise, so it treats the real and imaginary parts of a complex
    parameter as two real parameters, as torch.optim does; the views share memory with the state.
    """
    return [torch.view_as_real(t) if t is not None and t.is_complex() else t for t in tensors]


def _check_sparse_weight_decay(grad: Tensor, weight_decay: float) -> None:
    if grad.is_sparse and weight_decay != 0:
        raise RuntimeError(
            f"weight_decay={weight_decay} is not compatible with sparse gradients (accepted: weight_decay=0)"
        )


def prepare_grad(
    param: Tensor,
    grad: Tensor,
    *,
    maximize: bool,
    weight_decay: float,
    lr: float = 0.0,
    decoupled: bool = False,
) -> Tensor:
    r"""The direction an update rule consumes, per tensor (the reference path).

    .. math::
        g \leftarrow egin{cases} -
abla f & 	ext{maximize} \ 
abla f & 	ext{otherwise} \end{cases},
        \qquad
        egin{cases} 	heta \leftarrow 	heta\,(1 - \eta\lambda) & 	ext{decoupled (Loshchilov \& Hutter 2019)} \
                      g \leftarrow g + \lambda	heta & 	ext{coupled (L2 penalty)} \end{cases}

    ``param.grad`` is never modified: a new tensor is returned whenever ``g`` differs from it.
    """
    if maximize:
        grad = -grad
    if weight_decay != 0:
        if decoupled:
            param.mul_(1 - lr * weight_decay)
        else:
            _check_sparse_weight_decay(grad, weight_decay)
            grad = grad.add(param, alpha=weight_decay)
    return grad


def prepare_grads(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    maximize: bool,
    weight_decay: float,
    lr: float = 0.0,
    decoupled: bool = False,
) -> list[Tensor]:
    """Multi-tensor form of :func:`prepare_grad` (same rule, ``torch._foreach_*`` kernels)."""
    if maximize:
        grads = list(torch._foreach_neg(grads))
    if weight_decay != 0:
        if decoupled:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        elif maximize:  # the negated copies are ours to modify
            torch._foreach_add_(grads, params, alpha=weight_decay)
        else:
            grads = list(torch._foreach_add(grads, params, alpha=weight_decay))
    return grads


def new_step_tensor(value: float = 0.0) -> Tensor:
    """A fresh ``step`` counter (or other scalar state such as NAdam's ``mu_product``) in torch.optim's
    format: a 0-dim CPU tensor holding ``value``, float64 when the default dtype is float64 and float32
    otherwise (so state_dicts move between torch.optim and optimlab)."""
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(value, dtype=dtype)


FOREACH_CPU_MAX_MEAN_NUMEL = 1 << 15
"""On CPU, ``foreach=None`` takes the multi-tensor path only when a group's tensors hold at most this many
values on average (see :func:`default_foreach`)."""


def default_foreach(params: Sequence[Tensor]) -> bool:
    """The path ``foreach=None`` takes: multi-tensor (True) or the per-tensor loop (False).

    * CUDA: multi-tensor, as torch.optim (one kernel launch per operation for the whole list);
    * CPU: the per-tensor loop unless the tensors are small (at most :data:`FOREACH_CPU_MAX_MEAN_NUMEL`
      values on average). torch.optim always loops on CPU; here a multi-tensor kernel streams the whole
      list through memory once per operation, which for large tensors is slower than looping over
      tensors that stay in cache between operations (AdamW at 20M parameters in 100 tensors, 2 threads:
      foreach about 3x slower than the loop), while for many small tensors its lower per-tensor
      dispatch cost wins (AdamW at 10,000 tensors of 64 values: foreach about 1.4x faster);
    * other devices (and TorchScript): the per-tensor loop.

    The per-tensor loop updates a CPU tensor of more than :data:`LOOP_CHUNK_NUMEL` values in slices
    (:func:`loop_pieces`): the same operations as torch.optim's loop, bit for bit, with the slice in cache
    across them.

    The compiled step (``fused=True``) is never a default: its first step compiles for seconds (see
    docs/perf.md for cold and warm compile times), and torch.optim does not default to fused either.
    """
    if not params or torch.jit.is_scripting():
        return False
    devices = {p.device.type for p in params}
    if not devices <= {"cpu", "cuda"}:
        return False
    if devices == {"cuda"}:
        return True
    return sum(p.numel() for p in params) <= FOREACH_CPU_MAX_MEAN_NUMEL * len(params)


LOOP_CHUNK_NUMEL = 1 << 20
"""The per-tensor path updates a CPU tensor of more values than this in consecutive slices of this many values
(see :func:`loop_pieces`): 4 MB per float32 slice, so a rule's half-dozen slices and temporaries stay in the
last-level cache between its operations."""


def loop_pieces(*tensors: Tensor | None) -> list[tuple[Tensor | None, ...]]:
    """The pieces in which the per-tensor path applies an *elementwise* rule to one parameter's tensors
    (parameter, gradient, state buffers; ``None`` for an absent buffer): the tensors whole, or, for a CPU
    tensor of more than :data:`LOOP_CHUNK_NUMEL` values, consecutive 1-D slices of that many values of each.

    An elementwise rule gives every element the same operations whatever slice it is in, so updating the
    slices in turn equals updating the whole tensors bit for bit (tested against torch.optim's loop). What
    changes is the memory traffic: a whole-tensor rule streams the tensor through memory once per operation
    and allocates each temporary (``sqrt``, a quotient) at full size, which for tensors of tens of MB means
    fresh pages every step; a slice stays in cache across the rule's operations and its temporaries are
    reused by the allocator. Slicing applies only to plain dense contiguous CPU tensors of one size with
    autograd off (``differentiable=True`` keeps whole tensors), outside ``torch.compile``; anything else is
    returned whole.
    """
    first = tensors[0]
    assert first is not None
    numel = first.numel()
    if (numel <= LOOP_CHUNK_NUMEL or first.device.type != "cpu" or torch.is_grad_enabled()
            or torch.compiler.is_compiling()):  # under torch.compile the compiler fuses the rule: no slices to unroll
        return [tensors]
    for tensor in tensors:
        if tensor is not None and (type(tensor) not in (Tensor, torch.nn.Parameter) or tensor.layout != torch.strided
                                   or not tensor.is_contiguous() or tensor.numel() != numel):
            return [tensors]
    flats = [None if tensor is None else tensor.view(-1) for tensor in tensors]
    return [tuple(None if flat is None else flat[begin:begin + LOOP_CHUNK_NUMEL] for flat in flats)
            for begin in range(0, numel, LOOP_CHUNK_NUMEL)]


def _fresh_state_tensors(states: Sequence[dict[str, Any]]) -> None:
    """Replace every state tensor but ``step`` by a clone (``differentiable=True``): the rules update state in
    place, and an earlier step's autograd graph may have saved the tensor being updated; the clone keeps the
    graph (its gradient is the identity) while the saved version stays intact."""
    for state in states:
        for key, value in state.items():
            if key != "step" and torch.is_tensor(value) and value.requires_grad:
                state[key] = value.clone()


class OptimlabOptimizer(torch.optim.Optimizer):
    """Base class: the ``step`` skeleton shared by every optimlab optimizer.

    Subclasses implement :meth:`_state_keys` (or, for state that does not start at zero,
    :meth:`_init_group`) and :meth:`_update_group`. The skeleton

    1. evaluates the closure (with grad enabled) and keeps its loss,
    2. for each param group collects the parameters that have a gradient,
    3. rejects sparse gradients unless the subclass sets ``supports_sparse = True``,
    4. initialises missing state, then
    5. hands the group to the update rule and returns the closure's loss.
    """

    supports_sparse: bool = False
    #: whether the rule updates sharded (DTensor, FSDP2) parameters correctly (:mod:`optimlab.optim._dtensor`);
    #: when False, adding DTensor parameters raises, naming the optimizer
    supports_dtensor: bool = True
    #: whether the rule handles complex parameters (as their real views); when False, ``step`` raises before
    #: any update (set by ``optimlab.optim.registry.register(complex="rejected")``)
    supports_complex: bool = True
    #: 0-dim CPU state entries besides ``step`` and their initial values (e.g. NAdam's ``mu_product``
    #: starts at 1), kept in the scalar dtype.
    scalar_state_init: Mapping[str, float] = MappingProxyType({})

    #: ``step`` and ``scalar_state_init`` as one plain dict (set per subclass): under torch.compile, reading a
    #: mapping proxy after the state dict was mutated (a second param group) breaks the graph
    _scalar_init: Mapping[str, float] = {"step": 0.0}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._scalar_init = {"step": 0.0, **cls.scalar_state_init}

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        self._register_load_fixup()

    def _register_load_fixup(self) -> None:
        # first of the load-state-dict post-hooks, so that user hooks see the fixed-up state
        self.register_load_state_dict_post_hook(type(self)._after_load_state_dict, prepend=True)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim`` semantics, plus two checks torch leaves to ``step``: every parameter is a
        floating-point or complex tensor, and ``fused=True`` only meets tensors the fused path can take
        (torch's error)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_dtensor_support(self, group)
        except NotImplementedError:
            self.param_groups.pop()
            raise
        for param in group["params"]:
            if not (param.is_floating_point() or param.is_complex()):
                self.param_groups.pop()
                raise ValueError(f"Invalid params: {type(self).__name__} updates floating-point or complex tensors, "
                                 f"got a {param.dtype} tensor of shape {tuple(param.shape)}")
        if group.get("fused"):
            for param in group["params"]:
                if param.device.type not in FUSED_DEVICE_TYPES:
                    self.param_groups.pop()
                    raise RuntimeError(
                        "`fused=True` requires all the params to be floating point Tensors of supported devices: "
                        f"{list(FUSED_DEVICE_TYPES)} (got a {param.dtype} tensor on {param.device.type}; pass fused=None)")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if not self._optimizer_load_state_dict_post_hooks:
            self._register_load_fixup()  # unpickled or deep-copied: torch dropped the hooks
        # defaults missing from a group (older checkpoints) are filled in, except "differentiable", which
        # torch's __setstate__ adds to every optimizer's defaults: not a group key of a class without it
        fill = dict(self.defaults)
        if "differentiable" not in inspect.signature(type(self).__init__).parameters:
            fill.pop("differentiable", None)
        for group in self.param_groups:
            for key, value in fill.items():
                group.setdefault(key, value)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                for key in ("step", *self.scalar_state_init):
                    value = p_state.get(key)
                    if value is not None and not torch.is_tensor(value):
                        p_state[key] = new_step_tensor(float(value))

    def _after_load_state_dict(self) -> None:
        """Run right after ``load_state_dict`` loads, before any user post-hook: the 0-dim entries named in
        ``scalar_state_init`` go back to the scalar-state dtype (torch casts every state entry but ``step``
        to the parameter's dtype, which would change e.g. NAdam's ``mu_product`` from float32 to float64 and
        the trajectory with it). Entries of ``state`` that are not per-parameter dicts are left alone.
        Subclasses extend it (calling ``super()``) for their own state."""
        scalar_dtype = new_step_tensor().dtype
        for p_state in self.state.values():
            if not isinstance(p_state, dict):
                continue
            for key in self.scalar_state_init:
                if torch.is_tensor(p_state.get(key)):
                    p_state[key] = p_state[key].to(device="cpu", dtype=scalar_dtype)

    @staticmethod
    def _use_foreach(group: dict[str, Any], params: list[Tensor]) -> bool:
        """``foreach=True`` takes the multi-tensor path, ``foreach=False`` the per-tensor reference, and
        ``foreach=None`` (the default) what :func:`default_foreach` picks for these tensors. Sparse
        gradients and ``differentiable=True`` always take the reference path (foreach kernels are dense only and
        not differentiable)."""
        if group.get("differentiable") or any(p.grad is not None and p.grad.is_sparse for p in params):
            return False  # autograd (differentiable=True) and sparse gradients run through the per-tensor path
        foreach = group.get("foreach")
        if foreach is None and torch.compiler.is_compiling():
            return False  # under torch.compile the per-tensor loop (step counts stay tensors; the compiler fuses)
        return default_foreach(params) if foreach is None else bool(foreach)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The state entries of each parameter in ``group``, in creation order (torch.optim's order,
        so state_dicts match); options such as AMSGrad or a centered RMSprop decide which appear."""
        raise NotImplementedError

    def _init_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Create the state of each parameter that has none: the keys of :meth:`_state_keys`, with
        ``step`` (0) and the ``scalar_state_init`` entries as 0-dim scalar tensors (:func:`new_step_tensor`)
        and every other key as a zero buffer (:func:`zeros_state`)."""
        keys = self._state_keys(group)
        scalar_init = self._scalar_init
        for param in params:
            state = self.state[param]
            if not state:
                for key in keys:
                    state[key] = new_step_tensor(scalar_init[key]) if key in scalar_init else zeros_state(param)

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        raise NotImplementedError

    def _reject_complex(self) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None and param.is_complex():
                    raise RuntimeError(
                        f"{type(self).__name__} does not support complex parameters (got one of shape "
                        f"{tuple(param.shape)}); pass torch.view_as_real(param) as a real parameter instead"
                    )

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; returns the closure's loss when a closure is given. The update runs
        without autograd, or under it with ``differentiable=True`` (torch's semantics: gradients then flow
        through the update to the parameters, gradients and state it was computed from)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):
            self._step_groups()
        return loss

    def _step_groups(self) -> None:
        if not self.supports_complex:
            self._reject_complex()
        flat_groups = self.__dict__.get("_flat_groups", ())  # set by optimlab.optim.flat.flatten_parameters
        for index, group in enumerate(self.param_groups):
            if index < len(flat_groups) and flat_groups[index] is not None:
                flat_groups[index].step(self, group, index)
                continue
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if not self.supports_sparse and any(p.grad.is_sparse for p in params):
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients; "
                    "use optimlab.optim.Adagrad or SGD, or torch.optim.SparseAdam"
                )
            self._init_group(group, params)
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            if group.get("differentiable"):
                _fresh_state_tensors(states)
            self._update_group(group, params, grads, states)
            if not all(states):  # a rule without state (SGD without momentum): no empty entries, as in torch
                for param, state in zip(params, states):
                    if not state:
                        del self.state[param]
