"""Shared pieces of the fused-path tests: a parity case, the parameter layout, and running the fused
path and the per-tensor reference (``foreach=False``) side by side on identical parameters.

A case may bring its own parameter layout (``groups``): rules that need matrices (Muon) or that
reduce over a tensor (LAMB's trust ratio, Adafactor's factored moments) pick shapes that exercise them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from optimlab.optim._fused import fused_unavailable_reason
from optimlab.optim.registry import get_registration

STEPS = 20

needs_compiler = pytest.mark.skipif(fused_unavailable_reason("cpu") is not None,
                                    reason=f"no fused path here: {fused_unavailable_reason('cpu')}")


@dataclass(frozen=True)
class FusedCase:
    id: str
    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float64
    rtol: float = 1e-12
    skip_grads: bool = False  # one parameter has no gradient on some steps (its step count falls behind)
    groups: Callable[[torch.dtype, torch.Generator], list[dict[str, Any]]] | None = None  # default: param_groups


def fused_check(cls: type) -> dict[str, Any]:
    """The configuration ``cls`` declares for its fused path (``register(fused_check=...)``): every option its
    compiled rule branches on. The fused test files run it with their own layouts, dtypes and schedules."""
    check = get_registration(cls).fused_check
    assert check is not None, f"{cls.__name__} declares no fused_check"
    return dict(check)


def param_groups(dtype: torch.dtype, generator: torch.Generator) -> list[dict[str, Any]]:
    """Two groups (different lr): 2-D and 1-D contiguous tensors (compiled), a 0-dim and a transposed
    one (the same rule, uncompiled)."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype)

    return [
        {"params": [randn(7, 5), randn(13), randn(), randn(6, 4).t()]},
        {"params": [randn(3, 3), randn(4)], "lr_scale": 0.5},
    ]


def build(case: FusedCase, fused: bool, seed: int = 0) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    groups = (case.groups or param_groups)(case.dtype, torch.Generator().manual_seed(seed))
    lr = case.kwargs["lr"]
    for group in groups:
        group["lr"] = lr * group.pop("lr_scale", 1.0)
    if fused:
        options = dict(case.kwargs, fused=True)
    else:  # the per-tensor reference (classes without a foreach path have only that one)
        accepts_foreach = "foreach" in inspect.signature(case.cls.__init__).parameters
        options = dict(case.kwargs, foreach=False) if accepts_foreach else dict(case.kwargs)
    optimizer = case.cls(groups, **options)
    return optimizer, [p for group in optimizer.param_groups for p in group["params"]]


def set_grads(params: list[torch.Tensor], step: int, skip: bool) -> None:
    generator = torch.Generator().manual_seed(1000 + step)
    for index, param in enumerate(params):
        grad = torch.randn(param.shape, generator=generator, dtype=param.dtype)
        param.grad = None if (skip and index == 1 and step % 3 == 1) else grad


def max_relative_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    return max(((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item() for a, e in zip(actual, expected))


def state_tensors(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [value for p in params for key, value in sorted(optimizer.state[p].items()) if torch.is_tensor(value)]


def assert_matches_reference(fused: Any, fused_params: list[torch.Tensor], reference: Any,
                             reference_params: list[torch.Tensor], rtol: float, *, param_rtol: float | None = None
                             ) -> None:
    """Parameters within ``param_rtol`` (default ``rtol``) and every state tensor within ``rtol`` of the
    reference, relative to each tensor's largest value; both optimizers hold the same, non-empty state."""
    assert max_relative_error(fused_params, reference_params) <= (rtol if param_rtol is None else param_rtol)
    fused_state, reference_state = state_tensors(fused, fused_params), state_tensors(reference, reference_params)
    assert len(fused_state) == len(reference_state) > 0
    assert max_relative_error(fused_state, reference_state) <= rtol


def run_pair(case: FusedCase, steps: int = STEPS) -> tuple[Any, list[torch.Tensor], Any, list[torch.Tensor]]:
    fused, fused_params = build(case, fused=True)
    reference, reference_params = build(case, fused=False)
    for step in range(steps):
        set_grads(fused_params, step, case.skip_grads)
        set_grads(reference_params, step, case.skip_grads)
        fused.step()
        reference.step()
    return fused, fused_params, reference, reference_params


def cross_load_and_continue(case: FusedCase, before: int = 5, after: int = 5
                            ) -> tuple[Any, list[torch.Tensor], Any, list[torch.Tensor]]:
    """``before`` steps on each path, then each path's ``state_dict`` (and parameter values) loaded into a
    fresh optimizer of the other path, then ``after`` more steps; returns the continued fused optimizer
    and parameters, then the continued reference ones.

    torch.optim semantics: a loaded param group's settings (``fused`` and ``foreach`` included) replace
    the optimizer's own, which is checked; each continued optimizer is then switched back to its path.
    """
    fused, fused_params, reference, reference_params = run_pair(case, steps=before)
    continued_reference, continued_reference_params = build(case, fused=False)
    continued_fused, continued_fused_params = build(case, fused=True)
    with torch.no_grad():
        for target, source in zip(continued_reference_params, fused_params):
            target.copy_(source)
        for target, source in zip(continued_fused_params, reference_params):
            target.copy_(source)
    continued_reference.load_state_dict(fused.state_dict())
    continued_fused.load_state_dict(reference.state_dict())
    assert all(group["fused"] is True for group in continued_reference.param_groups)
    assert all(not group["fused"] for group in continued_fused.param_groups)
    for group in continued_reference.param_groups:
        group["fused"] = None
        if "foreach" in group:
            group["foreach"] = False
    for group in continued_fused.param_groups:
        group["fused"] = True
    for step in range(before, before + after):
        for optimizer, params in ((continued_reference, continued_reference_params),
                                  (continued_fused, continued_fused_params)):
            set_grads(params, step, case.skip_grads)
            optimizer.step()
    assert continued_fused.state_dict()["param_groups"][0]["fused"] is True
    return continued_fused, continued_fused_params, continued_reference, continued_reference_params
