"""The optimizer test matrix, generated from the registry: one row per registered class x configuration.

Every class decorated with :func:`optimlab.optim.registry.register` contributes a row per entry of its
``checks``; every row gets the generic property tests (``test_matrix.py``), and rows of a class with a
``reference`` also get the parity tests against it (``test_parity_torch.py``) where the reference takes
every keyword of the row (not, e.g., optimlab's ``state_dtype``), plus one row with a 0-dim tensor
learning rate (the last such configuration with ``lr`` as a float64 tensor). Nothing here names an
optimizer: registering a class is what puts it in the matrix.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

import optimlab.optim  # noqa: F401  (imports every optimizer module, which registers its classes)
from optimlab.optim.registry import Registration, registrations


@dataclass(frozen=True)
class Case:
    """One optimizer configuration.

    Attributes:
        id: test id, ``<class>-<what is special>``.
        optimizer: the optimlab class under test.
        kwargs: constructor keyword arguments (everything but the params).
        reference: a class taking the same kwargs whose results must match (``torch.optim.<Cls>``),
            or ``None`` when there is none.
        tolerance: largest relative deviation (``max|a-b| / max|b|`` per tensor) allowed in float64,
            for parameters and every state tensor.
        float32_tolerance: the same in float32.
        per_parameter: whether the update of each parameter depends only on that parameter's own
            gradient and state (true for all registered optimizers so far); the param-group and
            missing-grad tests rely on it.
    """

    id: str
    optimizer: type[torch.optim.Optimizer]
    kwargs: dict[str, Any] = field(default_factory=dict)
    reference: type[torch.optim.Optimizer] | None = None
    tolerance: float = 1e-10
    float32_tolerance: float = 1e-5
    per_parameter: bool = True


def _accepts(reference: type | None, kwargs: dict[str, Any]) -> bool:
    return reference is not None and set(kwargs) <= set(inspect.signature(reference.__init__).parameters)


def _cases(registration: Registration) -> list[Case]:
    name = registration.cls.__name__.lower()
    reference = registration.resolve_reference()
    # a class sets per_parameter_update = False when one parameter's update depends on the others' gradients
    per_parameter = getattr(registration.cls, "per_parameter_update", True)
    cases = [Case(f"{name}-{check}", registration.cls, kwargs, reference if _accepts(reference, kwargs) else None,
                  per_parameter=per_parameter)
             for check, kwargs in registration.checks.items()]
    with_reference = [case for case in cases if case.reference is not None]
    if with_reference:
        last = with_reference[-1].kwargs
        lr = torch.tensor(float(last.get("lr", registration.default_lr)), dtype=torch.float64)
        cases.append(Case(f"{name}-tensor-lr", registration.cls, {**last, "lr": lr}, reference))
    return cases


ALL_CASES: list[Case] = [case for registration in registrations() for case in _cases(registration)]

REFERENCE_CASES: list[Case] = [case for case in ALL_CASES if case.reference is not None]
