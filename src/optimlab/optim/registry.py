"""A registry of optimizers by name: optimlab's own and torch's, plus named presets.

Names are lower-case. ``"adamw"`` is optimlab's AdamW, ``"torch.adamw"`` is ``torch.optim.AdamW``,
and presets such as ``"sgd-momentum"`` are a class with fixed keyword arguments. Each entry carries
the learning-rate bounds the benchmark lab searches (log-uniform) and a default learning rate.

Entries point at classes by import path and are resolved on first use, so registering costs nothing
at import time and a name can be listed before its module is imported.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["OptimizerSpec", "register_optimizer", "get_spec", "list_optimizers", "create_optimizer"]


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


_REGISTRY: dict[str, OptimizerSpec] = {}


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


def _register_torch_optimizers() -> None:
    bounds = {
        "sgd": ((1e-4, 1.0), 1e-2),
        "adagrad": ((1e-4, 1.0), 1e-2),
        "adadelta": ((1e-2, 10.0), 1.0),
    }
    for class_name in ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam", "Adadelta"):
        key = class_name.lower()
        lr_bounds, default_lr = bounds.get(key, ((1e-5, 1e-1), 1e-3))
        register_optimizer(
            f"torch.{key}",
            f"torch.optim:{class_name}",
            lr_bounds=lr_bounds,
            default_lr=default_lr,
            description=f"torch.optim.{class_name} (PyTorch's implementation)",
        )
    register_optimizer(
        "torch.sgd-momentum",
        "torch.optim:SGD",
        preset={"momentum": 0.9},
        lr_bounds=(1e-4, 1.0),
        default_lr=1e-2,
        description="torch.optim.SGD with momentum 0.9",
    )


_register_torch_optimizers()


def _register_optimlab_optimizers() -> None:
    # name, "module:Class", preset, lr_bounds, default_lr, description
    table: list[tuple[str, str, dict[str, Any], tuple[float, float], float, str]] = [
        ("sgd", "optimlab.optim.sgd:SGD", {}, (1e-4, 1.0), 1e-2, "SGD (Robbins & Monro 1951)"),
        ("sgd-momentum", "optimlab.optim.sgd:SGD", {"momentum": 0.9}, (1e-4, 1.0), 1e-2,
         "SGD with heavy-ball momentum 0.9 (Polyak 1964)"),
        ("sgd-nesterov", "optimlab.optim.sgd:SGD", {"momentum": 0.9, "nesterov": True}, (1e-4, 1.0), 1e-2,
         "SGD with Nesterov momentum 0.9 (Nesterov 1983; Sutskever et al. 2013)"),
        ("adam", "optimlab.optim.adam:Adam", {}, (1e-5, 1e-1), 1e-3, "Adam (Kingma & Ba 2014)"),
        ("amsgrad", "optimlab.optim.adam:Adam", {"amsgrad": True}, (1e-5, 1e-1), 1e-3, "Adam with AMSGrad (Reddi et al. 2018)"),
        ("adamw", "optimlab.optim.adam:AdamW", {}, (1e-5, 1e-1), 1e-3, "AdamW (Loshchilov & Hutter 2019)"),
        ("adam-bf16", "optimlab.optim.adam:Adam", {"state_dtype": "bfloat16"}, (1e-5, 1e-1), 1e-3,
         "Adam with both moments stored in bfloat16 (4 B/param)"),
        ("adam-int8", "optimlab.optim.adam:Adam", {"state_dtype": "int8"}, (1e-5, 1e-1), 1e-3,
         "Adam with 8-bit block-wise quantised moments (Dettmers et al. 2022; ~2 B/param)"),
        ("adamw-bf16", "optimlab.optim.adam:AdamW", {"state_dtype": "bfloat16"}, (1e-5, 1e-1), 1e-3,
         "AdamW with both moments stored in bfloat16 (4 B/param)"),
        ("adamw-int8", "optimlab.optim.adam:AdamW", {"state_dtype": "int8"}, (1e-5, 1e-1), 1e-3,
         "AdamW with 8-bit block-wise quantised moments (Dettmers et al. 2022; ~2 B/param)"),
        ("adagrad", "optimlab.optim.adagrad:Adagrad", {}, (1e-4, 1.0), 1e-2, "AdaGrad (Duchi et al. 2011)"),
        ("rmsprop", "optimlab.optim.rmsprop:RMSprop", {}, (1e-5, 1e-1), 1e-3, "RMSprop (Tieleman & Hinton 2012)"),
        ("adamax", "optimlab.optim.adamax:Adamax", {}, (1e-5, 1e-1), 2e-3, "Adamax (Kingma & Ba 2014)"),
        ("nadam", "optimlab.optim.nadam:NAdam", {}, (1e-5, 1e-1), 2e-3, "NAdam (Dozat 2016)"),
        ("radam", "optimlab.optim.radam:RAdam", {}, (1e-5, 1e-1), 1e-3, "RAdam (Liu et al. 2019)"),
        ("adadelta", "optimlab.optim.adadelta:Adadelta", {}, (1e-2, 10.0), 1.0, "Adadelta (Zeiler 2012)"),
        ("lion", "optimlab.optim.lion:Lion", {}, (1e-6, 1e-2), 1e-4, "Lion (Chen et al. 2023)"),
        ("lion-bf16", "optimlab.optim.lion:Lion", {"state_dtype": "bfloat16"}, (1e-6, 1e-2), 1e-4,
         "Lion with its momentum stored in bfloat16 (2 B/param)"),
        ("lion-int8", "optimlab.optim.lion:Lion", {"state_dtype": "int8"}, (1e-6, 1e-2), 1e-4,
         "Lion with 8-bit block-wise quantised momentum (Dettmers et al. 2022; ~1 B/param)"),
        ("lamb", "optimlab.optim.lamb:LAMB", {}, (1e-5, 1e-1), 1e-3, "LAMB (You et al. 2020)"),
        ("lars", "optimlab.optim.lars:LARS", {}, (1e-2, 1e2), 1.0, "LARS, momentum 0.9 (You et al. 2017)"),
        ("adafactor", "optimlab.optim.adafactor:Adafactor", {}, (1e-4, 1.0), 1e-2,
         "Adafactor, factored second moments (Shazeer & Stern 2018)"),
        ("muon", "optimlab.optim.muon:MuonWithAdamW", {}, (1e-4, 1.0), 2e-2,
         "Muon for 2-D weights + AdamW for the rest (Jordan et al. 2024)"),
        ("schedule-free-adamw", "optimlab.optim.schedule_free:ScheduleFreeAdamW", {}, (1e-5, 1e-1), 2.5e-3,
         "Schedule-Free AdamW (Defazio et al. 2024); call train()/eval()"),
    ]
    for name, target, preset, lr_bounds, default_lr, description in table:
        register_optimizer(name, target, preset=preset, lr_bounds=lr_bounds, default_lr=default_lr,
                           description=description)


_register_optimlab_optimizers()
