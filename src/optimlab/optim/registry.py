"""A registry of optimizers by name: optimlab's own and torch's, plus named presets.

Names are lower-case. ``"adamw"`` is optimlab's AdamW, ``"torch.adamw"`` is ``torch.optim.AdamW``,
and presets such as ``"sgd-momentum"`` are a class with fixed keyword arguments. Each entry carries
the learning-rate bounds the benchmark lab searches (log-uniform) and a default learning rate.

optimlab's classes register themselves where they are defined, with the :func:`register` class
decorator, which records a :class:`Registration` (names, learning-rate bounds, reference, state bytes,
fused and complex support, the configurations the test matrix checks) and derives the registry entries
from it: one per name, plus ``"torch.<name>"`` for a ``torch.optim`` reference. The test matrix in
``tests/optim/`` is generated from :func:`registrations`. :func:`register_optimizer` adds a single entry
by import path (for classes defined elsewhere).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch

__all__ = [
    "OptimizerSpec",
    "Preset",
    "Registration",
    "create_optimizer",
    "get_registration",
    "get_spec",
    "list_optimizers",
    "needs_closure",
    "preset",
    "register",
    "register_optimizer",
    "registrations",
]


@dataclass(frozen=True)
class OptimizerSpec:
    """One registry entry.

    Attributes:
        name: registry key (lower-case).
        target: ``"module:ClassName"`` import path of the optimizer class.
        preset: keyword arguments fixed by this entry (e.g. ``{"momentum": 0.9}``).
        lr_bounds: (low, high) learning-rate range for log-uniform tuning.
        default_lr: the learning rate used when none is given.
        description: one line for listings.
    """

    name: str
    target: str
    preset: dict[str, Any] = field(default_factory=dict)
    lr_bounds: tuple[float, float] = (1e-5, 1e-1)
    default_lr: float = 1e-3
    description: str = ""

    def resolve(self) -> type[torch.optim.Optimizer]:
        """Import and return the optimizer class."""
        module_name, _, class_name = self.target.partition(":")
        return getattr(importlib.import_module(module_name), class_name)

    def accepted_kwargs(self) -> set[str] | None:
        """The constructor's keyword names (``None`` when it takes ``**kwargs``, i.e. any keyword)."""
        parameters = inspect.signature(self.resolve().__init__).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return None
        return {p.name for p in parameters}


@dataclass(frozen=True)
class Preset:
    """A registry name for a class with fixed keyword arguments (see :func:`preset`)."""

    description: str
    kwargs: dict[str, Any]
    torch: bool = False


def preset(description: str, *, torch: bool = False, **kwargs: Any) -> Preset:
    """A named preset for :func:`register`'s ``names``: ``description`` for listings, ``kwargs`` fixed by
    the name; ``torch=True`` also registers ``"torch.<name>"``, the reference class with the same kwargs."""
    return Preset(description, dict(kwargs), torch)


ComplexSupport = Literal["supported", "rejected"]


@dataclass(frozen=True)
class Registration:
    """What an optimizer class declares about itself with :func:`register` (see its arguments)."""

    cls: type[torch.optim.Optimizer]
    names: dict[str, Preset]
    lr_bounds: tuple[float, float]
    default_lr: float
    reference: type | str | None
    state_bytes: float | None
    fused: bool | None
    complex: ComplexSupport | None
    checks: dict[str, dict[str, Any]]
    fused_check: dict[str, Any] | None
    matrices_only: bool
    matrix_exempt: str | None
    graph_breaks: str | None = None
    needs_closure: bool = False

    @property
    def accepts_fused(self) -> bool:
        """Whether the constructor takes a ``fused`` argument (torch's signature)."""
        return "fused" in inspect.signature(self.cls.__init__).parameters

    def resolve_reference(self) -> type | None:
        """The reference class (a ``"module:Class"`` string is imported now), or ``None``."""
        if isinstance(self.reference, str):
            module_name, _, class_name = self.reference.partition(":")
            return getattr(importlib.import_module(module_name), class_name)
        return self.reference


_REGISTRY: dict[str, OptimizerSpec] = {}
_REGISTRATIONS: dict[type, Registration] = {}

OptimizerT = TypeVar("OptimizerT", bound=type)


def register(
    *,
    names: Mapping[str, str | Preset],
    lr_bounds: tuple[float, float],
    default_lr: float,
    checks: Mapping[str, Mapping[str, Any]],
    reference: type | str | None = None,
    state_bytes: float | None = None,
    fused: bool | None = None,
    complex: ComplexSupport | None = None,
    fused_check: Mapping[str, Any] | None = None,
    matrices_only: bool = False,
    matrix_exempt: str | None = None,
    graph_breaks: str | None = None,
    needs_closure: bool = False,
) -> Callable[[OptimizerT], OptimizerT]:
    """Class decorator: register an optimizer class and everything the registry and the tests derive from it.

    Args:
        names: registry name -> description (the class with its defaults) or :func:`preset` (fixed kwargs).
            May be empty for a class reachable only by import (it still gets the generated tests).
        lr_bounds: (low, high) learning-rate range the benchmark lab searches, log-uniform.
        default_lr: the learning rate :func:`create_optimizer` uses when none is given.
        checks: named constructor configurations (everything but ``params``) that the generated test
            matrix runs: generic behaviour, and parity with ``reference`` when there is one.
        reference: a class taking the same kwargs that must give the same results (``torch.optim.X``, which
            also registers ``"torch.<first name>"``, or ``"module:Class"`` of another package), or ``None``.
        state_bytes: bytes of per-parameter state per parameter element (``optimlab.optim.state_bytes_per_param``)
            after one step on a float32 (32, 16) matrix with the default options and ``default_lr``.
        fused: ``True`` when ``fused=True`` runs a compiled step (compared with the reference path on
            ``fused_check``), ``False`` when the class refuses it; required when the constructor takes ``fused``.
        complex: ``"supported"`` (a complex parameter moves like its real view, ``torch.view_as_real``, as a
            real parameter: torch's convention) or ``"rejected"`` (sets ``cls.supports_complex = False``, so
            ``step`` raises torch's ``RuntimeError("<Class> does not support complex parameters")`` before
            any parameter or state changes).
        fused_check: the configuration whose fused step is compared with the per-tensor path (default: the
            first of ``checks``). Pick one that turns on every option the compiled rule branches on.
        matrices_only: the class takes only 2-D parameters (the generated tests then use matrices).
        matrix_exempt: why the generic matrix (``checks``) does not apply, and which test file covers the
            class instead; required when ``checks`` is empty.
        graph_breaks: why ``torch.compile(opt.step)`` still breaks the graph (a known gap, checked to be still
            true); ``None`` (the default): the step must trace into one graph, which the tests check.
        needs_closure: ``step`` must be given a closure that clears the gradients, recomputes the loss and calls
            ``backward()`` (it may call it several times: SAM twice); the bench's trial loop and the trainer
            pass one for such a class (:func:`needs_closure`).
    """
    low, high = lr_bounds
    if not (0 < low <= default_lr <= high):
        raise ValueError(f"Invalid lr_bounds/default_lr: {lr_bounds}, {default_lr} (need 0 < low <= default <= high)")

    def decorate(cls: OptimizerT) -> OptimizerT:
        entries = {key.lower(): value if isinstance(value, Preset) else Preset(value, {}) for key, value in names.items()}
        first_check = next(iter(checks.values()), None)
        registration = Registration(
            cls, entries, (float(low), float(high)), float(default_lr), reference, state_bytes, fused, complex,
            {key: dict(value) for key, value in checks.items()},
            dict(fused_check) if fused_check is not None else (dict(first_check) if first_check is not None else None),
            matrices_only, matrix_exempt, graph_breaks, needs_closure,
        )
        _REGISTRATIONS[cls] = registration
        if complex == "rejected":
            cls.supports_complex = False  # OptimlabOptimizer.step then raises before any update
        target = f"{cls.__module__}:{cls.__qualname__}"
        for name, entry in entries.items():
            register_optimizer(name, target, preset=entry.kwargs, lr_bounds=lr_bounds, default_lr=default_lr,
                               description=entry.description)
        if isinstance(reference, type) and reference.__module__.startswith("torch.optim") and entries:
            _register_torch_reference(reference, registration)
        return cls

    return decorate


def _register_torch_reference(reference: type, registration: Registration) -> None:
    # "torch.<first name>" for the reference itself, "torch.<preset>" for presets marked torch=True
    class_name = reference.__name__
    target = f"torch.optim:{class_name}"
    first = next(iter(registration.names))
    register_optimizer(f"torch.{first}", target, lr_bounds=registration.lr_bounds, default_lr=registration.default_lr,
                       description=f"torch.optim.{class_name} (PyTorch's implementation)")
    for name, entry in registration.names.items():
        if entry.torch:
            options = ", ".join(f"{key}={value}" for key, value in entry.kwargs.items())
            register_optimizer(f"torch.{name}", target, preset=entry.kwargs, lr_bounds=registration.lr_bounds,
                               default_lr=registration.default_lr,
                               description=f"torch.optim.{class_name} with {options}")


def registrations() -> list[Registration]:
    """Every class registered with :func:`register`, in definition order."""
    return list(_REGISTRATIONS.values())


def get_registration(cls: type) -> Registration:
    """The :class:`Registration` of ``cls``; ``KeyError`` when it was not registered with :func:`register`."""
    try:
        return _REGISTRATIONS[cls]
    except KeyError:
        raise KeyError(f"{cls.__qualname__} is not registered (decorate it with optimlab.optim.registry.register)") from None


def needs_closure(optimizer: str | torch.optim.Optimizer | type) -> bool:
    """Whether ``optimizer`` (a registry name, an optimizer or its class) declared ``needs_closure`` when it was
    registered, or is the ``reference`` of a class that did (``torch.optim.LBFGS``): its ``step`` must be given
    a closure. Other classes, registered or not, say ``False``."""
    if isinstance(optimizer, str):
        cls: type = get_spec(optimizer).resolve()
    else:
        cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    return any(registration.needs_closure and cls in (registration.cls, registration.reference)
               for registration in _REGISTRATIONS.values())


def register_optimizer(
    name: str,
    target: str,
    *,
    preset: dict[str, Any] | None = None,
    lr_bounds: tuple[float, float] = (1e-5, 1e-1),
    default_lr: float = 1e-3,
    description: str = "",
) -> OptimizerSpec:
    """Add an entry to the registry (re-registering the same name replaces it) and return it."""
    key = name.lower()
    low, high = lr_bounds
    if not (0 < low < high):
        raise ValueError(f"Invalid lr_bounds for {name!r}: {lr_bounds} (need 0 < low < high)")
    spec = OptimizerSpec(key, target, dict(preset or {}), (float(low), float(high)), float(default_lr), description)
    _REGISTRY[key] = spec
    return spec


def _unknown_name_error(name: str) -> KeyError:
    close = difflib.get_close_matches(name.lower(), _REGISTRY, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return KeyError(f"Unknown optimizer {name!r}.{hint} Valid names: {', '.join(sorted(_REGISTRY))}")


def get_spec(name: str) -> OptimizerSpec:
    """Return the registry entry for ``name``; an unknown name raises ``KeyError`` listing close matches."""
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise _unknown_name_error(name) from None


def list_optimizers(source: str | None = None) -> list[str]:
    """Sorted registry names; ``source="optimlab"`` or ``"torch"`` filters by where the class lives."""
    names = sorted(_REGISTRY)
    if source == "torch":
        return [n for n in names if _REGISTRY[n].target.startswith("torch.")]
    if source == "optimlab":
        return [n for n in names if not _REGISTRY[n].target.startswith("torch.")]
    if source is not None:
        raise ValueError(f"Invalid source: {source!r} (accepted: None, 'optimlab', 'torch')")
    return names


def _check_kwargs(cls: type, name: str, kwargs: dict[str, Any]) -> None:
    signature = inspect.signature(cls.__init__)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    if accepts_any:
        return
    valid = [p for p in signature.parameters if p not in ("self", "params")]
    for key in kwargs:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=2, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise TypeError(
                f"Unknown keyword argument {key!r} for optimizer {name!r} ({cls.__qualname__}).{hint} "
                f"Valid arguments: {', '.join(valid)}"
            )


def create_optimizer(
    params: torch.nn.Module | Iterable[Any],
    name: str,
    lr: float | None = None,
    weight_decay: float | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build an optimizer by registry name.

    Args:
        params: a module (its ``parameters()`` are used), an iterable of tensors, or param-group dicts.
        name: a name from :func:`list_optimizers`, e.g. ``"adamw"``, ``"torch.adamw"``, ``"sgd-momentum"``.
        lr: learning rate; the entry's ``default_lr`` when omitted.
        weight_decay: passed through when given.
        **kwargs: further constructor arguments; unknown ones raise ``TypeError`` naming close matches.

    Example:
        >>> opt = create_optimizer(model, "adamw", lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    """
    spec = get_spec(name)
    cls = spec.resolve()
    options: dict[str, Any] = {**spec.preset, **kwargs}
    options["lr"] = spec.default_lr if lr is None else lr
    if weight_decay is not None:
        options["weight_decay"] = weight_decay
    _check_kwargs(cls, spec.name, options)
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    return cls(params, **options)
