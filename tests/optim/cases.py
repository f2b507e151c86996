"""The optimizer test matrix as data: one row per optimizer x constructor configuration.

Every row in :data:`ALL_CASES` gets the generic property tests (``test_matrix.py``); rows with a
``reference`` class also get the parity tests against it (``test_parity_torch.py``). Adding an
optimizer to the matrix is adding rows here (or in a sibling table joined into ``ALL_CASES``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from optimlab.optim import SGD, Adadelta, Adagrad, Adam, Adamax, AdamW, NAdam, RAdam, RMSprop


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
            gradient and state (true for all classic optimizers); the param-group and missing-grad
            tests rely on it.
    """

    id: str
    optimizer: type[torch.optim.Optimizer]
    kwargs: dict[str, Any] = field(default_factory=dict)
    reference: type[torch.optim.Optimizer] | None = None
    tolerance: float = 1e-10
    float32_tolerance: float = 1e-5
    per_parameter: bool = True


def _lr(value: float) -> torch.Tensor:
    """A 0-dim float64 tensor learning rate (float64 so that it carries the same value as the float)."""
    return torch.tensor(value, dtype=torch.float64)


def _classic(optimizer: type[torch.optim.Optimizer], rows: dict[str, dict[str, Any]]) -> list[Case]:
    reference = getattr(torch.optim, optimizer.__name__)
    return [Case(f"{optimizer.__name__.lower()}-{name}", optimizer, kwargs, reference) for name, kwargs in rows.items()]


CLASSIC_CASES: list[Case] = [
    *_classic(SGD, {
        "plain": {"lr": 0.1},
        "momentum": {"lr": 0.05, "momentum": 0.9},
        "dampening": {"lr": 0.05, "momentum": 0.9, "dampening": 0.5},
        "nesterov": {"lr": 0.05, "momentum": 0.9, "nesterov": True},
        "nesterov-wd": {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.1},
        "wd-maximize": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.05, "maximize": True},
        "tensor-lr": {"lr": _lr(0.05), "momentum": 0.5},
    }),
    *_classic(Adam, {
        "default": {"lr": 0.01},
        "amsgrad": {"lr": 0.01, "amsgrad": True},
        "wd": {"lr": 0.01, "weight_decay": 0.1},
        "decoupled": {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
        "amsgrad-wd-maximize": {"lr": 0.01, "amsgrad": True, "weight_decay": 0.05, "maximize": True},
        "betas-eps": {"lr": 0.02, "betas": (0.8, 0.9), "eps": 1e-3},
        "tensor-lr": {"lr": _lr(0.01), "amsgrad": True},
    }),
    *_classic(AdamW, {
        "default": {"lr": 0.01},
        "amsgrad": {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1},
        "maximize": {"lr": 0.01, "weight_decay": 0.2, "maximize": True},
        "tensor-lr": {"lr": _lr(0.01), "betas": (0.85, 0.99)},
    }),
    *_classic(Adagrad, {
        "default": {"lr": 0.1},
        "lr-decay": {"lr": 0.1, "lr_decay": 0.05},
        "initial-accumulator": {"lr": 0.1, "initial_accumulator_value": 0.5, "eps": 1e-6},
        "wd-maximize": {"lr": 0.1, "weight_decay": 0.1, "maximize": True, "lr_decay": 0.01},
        "tensor-lr": {"lr": _lr(0.1)},
    }),
    *_classic(RMSprop, {
        "default": {"lr": 0.01},
        "centered": {"lr": 0.01, "centered": True},
        "momentum": {"lr": 0.01, "momentum": 0.9},
        "centered-momentum-wd": {"lr": 0.01, "centered": True, "momentum": 0.5, "weight_decay": 0.1},
        "alpha-maximize": {"lr": 0.01, "alpha": 0.9, "eps": 1e-4, "maximize": True},
        "tensor-lr": {"lr": _lr(0.01), "centered": True},
    }),
    *_classic(Adamax, {
        "default": {"lr": 0.02},
        "wd": {"lr": 0.02, "weight_decay": 0.1},
        "betas-maximize": {"lr": 0.02, "betas": (0.8, 0.95), "maximize": True},
        "tensor-lr": {"lr": _lr(0.02), "eps": 1e-4},
    }),
    *_classic(NAdam, {
        "default": {"lr": 0.02},
        "momentum-decay": {"lr": 0.02, "momentum_decay": 0.05},
        "wd": {"lr": 0.02, "weight_decay": 0.1},
        "decoupled": {"lr": 0.02, "weight_decay": 0.1, "decoupled_weight_decay": True},
        "maximize": {"lr": 0.02, "betas": (0.8, 0.99), "maximize": True},
        "tensor-lr": {"lr": _lr(0.02)},
    }),
    *_classic(RAdam, {
        "default": {"lr": 0.02},
        "beta2-0.99": {"lr": 0.02, "betas": (0.9, 0.99)},
        "wd": {"lr": 0.02, "betas": (0.9, 0.99), "weight_decay": 0.1},
        "decoupled": {"lr": 0.02, "weight_decay": 0.1, "decoupled_weight_decay": True},
        "maximize": {"lr": 0.02, "betas": (0.85, 0.98), "maximize": True},
        "tensor-lr": {"lr": _lr(0.02), "betas": (0.9, 0.95)},
    }),
    *_classic(Adadelta, {
        "default": {},
        "rho-eps": {"lr": 0.5, "rho": 0.95, "eps": 1e-4},
        "wd": {"lr": 1.0, "weight_decay": 0.1},
        "maximize": {"lr": 1.0, "maximize": True},
        "tensor-lr": {"lr": _lr(2.0), "rho": 0.8},
    }),
]

from .cases_modern import MODERN_CASES  # noqa: E402  (imports Case from this module, defined above)

ALL_CASES: list[Case] = CLASSIC_CASES + MODERN_CASES

REFERENCE_CASES: list[Case] = [case for case in ALL_CASES if case.reference is not None]
