"""The fused (torch.compile) step of RMSprop and Adadelta: parity with the per-tensor reference
(``foreach=False``) for params and every state tensor, no recompiles under 50 scheduled learning rates
(and, for RMSprop, a cycled momentum), state_dicts that move between the fused and the reference path, and
the foreach fallback under ``OPTIMLAB_DISABLE_FUSED``.

Compiling costs seconds per graph, so the flags are combined into four constant configurations: each rule
with every flag on (RMSprop centered + momentum + L2 + maximize, with a parameter that skips steps; Adadelta
L2 + maximize) in float64, and with every flag off in float32. The schedule and state_dict tests reuse
those graphs.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from optimlab.optim import Adadelta, RMSprop
from optimlab.optim import _fused

from .fused_harness import (FusedCase, assert_matches_reference, build, cross_load_and_continue, fused_check,
                            max_relative_error, needs_compiler, run_pair, set_grads, state_tensors)


def layout(dtype: torch.dtype, generator: torch.Generator, *, with_complex: bool = False,
           **second: float) -> list[dict[str, Any]]:
    """Two groups exercising every way the fused path applies a rule: small tensors (2-D, 1-D, 0-dim and a
    transposed one) packed into one compiled call, a contiguous tensor above ``_fused.PACK_NUMEL`` values in a
    compiled chunk, and a transposed one above it updated by the same rule uncompiled.

    ``with_complex``: the second group's 1-D tensor is complex (the rules see its real view). ``second``:
    hyperparameters of the second group (besides its halved lr), so that every scalar the compiled rule receives
    takes two values, which a graph that kept its first call's value would get wrong."""
    large = _fused.PACK_NUMEL + 77

    def randn(*shape: int, complex_: bool = False) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype.to_complex() if complex_ else dtype)

    return [
        {"params": [randn(7, 5), randn(13), randn(), randn(6, 4).t(), randn(large)]},
        {"params": [randn(3, 3), randn(4, complex_=with_complex), randn(large // 64 + 1, 64).t()], "lr_scale": 0.5,
         **second},
    ]


# few constant configurations (each compiles its own graphs): every flag of each rule on in float64, off in float32
RMSPROP_ALL = FusedCase("rmsprop-centered-momentum-l2-maximize-f64", RMSprop,
                        fused_check(RMSprop), skip_grads=True,
                        groups=functools.partial(layout, with_complex=True, alpha=0.99, eps=1e-4, momentum=0.5))
RMSPROP_F32 = FusedCase("rmsprop-plain-f32", RMSprop, {"lr": 1e-2}, torch.float32, 1e-6,
                        groups=functools.partial(layout, alpha=0.95, eps=1e-6))
ADADELTA_ALL = FusedCase("adadelta-l2-maximize-f64", Adadelta,
                         fused_check(Adadelta),
                         groups=functools.partial(layout, with_complex=True, rho=0.95, eps=1e-3))
ADADELTA_F32 = FusedCase("adadelta-plain-f32", Adadelta, {"lr": 1.0}, torch.float32, 1e-6,
                         groups=functools.partial(layout, rho=0.95, eps=1e-5))

CASES = [RMSPROP_ALL, RMSPROP_F32, ADADELTA_ALL, ADADELTA_F32]
RULES = {RMSprop: "_rmsprop_tensor", Adadelta: "_adadelta_tensor"}


def compiles(cls: type) -> int:
    """Graphs compiled so far for ``cls``'s per-tensor rule, over every constant configuration."""
    return int(_fused.compile_stats().get(RULES[cls], {}).get("compiles", 0))


def all_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


@needs_compiler
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_fused_matches_per_tensor_reference(case: FusedCase) -> None:
    """20 steps: params and every state tensor within the case's tolerance (1e-12 float64, 1e-6 float32)."""
    fused, fused_params, reference, reference_params = run_pair(case)
    assert max_relative_error(fused_params, reference_params) <= case.rtol
    fused_state, reference_state = state_tensors(fused, fused_params), state_tensors(reference, reference_params)
    assert all(set(fused.state[f]) == set(reference.state[r]) for f, r in zip(fused_params, reference_params))
    assert len(fused_state) == len(reference_state) > len(fused_params)
    assert max_relative_error(fused_state, reference_state) <= case.rtol
    # the parameters really moved, the skipped parameter's step count fell behind, and the rule was compiled
    initial, _ = build(case, fused=False)
    assert max_relative_error(fused_params, all_params(initial)) > 1e-3
    steps = [int(fused.state[p]["step"]) for p in fused_params]
    assert steps[1] == (13 if case.skip_grads else 20) and steps[0] == 20
    assert compiles(case.cls) > 0


@needs_compiler
@pytest.mark.parametrize("case", [RMSPROP_ALL, RMSPROP_F32, ADADELTA_F32], ids=lambda case: case.id)
def test_schedule_causes_no_recompilation(case: FusedCase) -> None:
    """50 steps, each with a new learning rate (and with RMSprop's momentum a new momentum, cycled by OneCycleLR):
    the graphs compiled on the first step serve them all (no parameter skips a step here), and the fused path
    follows the reference within the case's tolerance."""
    fused, fused_params = build(case, fused=True)
    reference, reference_params = build(case, fused=False)
    cycled_momentum = case.kwargs.get("momentum", 0) > 0
    if cycled_momentum:
        schedulers: list[Any] = [torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=51,
                                                                     base_momentum=0.5, max_momentum=0.95)
                                 for opt in (fused, reference)]
    else:
        schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50) for opt in (fused, reference)]
    compiles_after_first_step = None
    lrs, momenta = set(), set()
    for step in range(50):
        set_grads(fused_params, step, False)
        set_grads(reference_params, step, False)
        fused.step()
        reference.step()
        if compiles_after_first_step is None:
            compiles_after_first_step = compiles(case.cls)
        lrs.add(fused.param_groups[0]["lr"])
        momenta.add(fused.param_groups[0].get("momentum"))
        for scheduler in schedulers:
            scheduler.step()
    assert len(lrs) == 50
    assert len(momenta) == (50 if cycled_momentum else 1)
    assert compiles_after_first_step >= 1
    assert compiles(case.cls) == compiles_after_first_step
    assert_matches_reference(fused, fused_params, reference, reference_params, case.rtol)


@needs_compiler
@pytest.mark.parametrize("case", [RMSPROP_F32, ADADELTA_F32], ids=lambda case: case.id)
def test_state_dict_moves_between_fused_and_reference(case: FusedCase) -> None:
    """5 steps on each path, then each path's state_dict loaded into the other, then 5 more steps: the
    continued runs agree (1e-6, float32) and keep the loaded ``fused`` setting (torch.optim semantics)."""
    continued_fused, continued_fused_params, continued_reference, continued_reference_params = (
        cross_load_and_continue(case))
    assert all(int(continued_fused.state[p]["step"]) == 10 for p in continued_fused_params)
    assert_matches_reference(continued_fused, continued_fused_params, continued_reference, continued_reference_params, case.rtol)


@pytest.mark.parametrize("case", [RMSPROP_ALL, ADADELTA_ALL], ids=lambda case: case.id)
def test_disabled_by_environment_falls_back_with_one_warning(case: FusedCase, monkeypatch: pytest.MonkeyPatch) -> None:
    """``OPTIMLAB_DISABLE_FUSED=1``: ``fused=True`` warns once (naming the class and the switch), takes the
    foreach path (nothing is compiled) and stays within 1e-12 of the per-tensor reference in float64."""
    monkeypatch.setenv(_fused.DISABLE_ENV, "1")
    monkeypatch.setattr(_fused, "_warned", set())
    compiled_before = compiles(case.cls)
    with pytest.warns(RuntimeWarning, match=rf"{case.cls.__name__}\(fused=True\).*{_fused.DISABLE_ENV}=1.*foreach"
                      ) as record:
        fused, fused_params, reference, reference_params = run_pair(case, steps=5)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert compiles(case.cls) == compiled_before
    assert_matches_reference(fused, fused_params, reference, reference_params, 1e-12)
