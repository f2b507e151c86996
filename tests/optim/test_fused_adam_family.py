"""The fused (torch.compile) step of NAdam, RAdam and Adamax: parity with the per-tensor reference
(params and every state tensor), no recompiles under an LR schedule or across RAdam's switch to the
rectified update, state_dict round trips (fused <-> reference, fused NAdam -> torch.optim.NAdam) and
the fallback when compiling is disabled.

Compile cost: one float64 configuration (weight decay, maximize, a parameter skipping steps) and one
float32 configuration per class; every other test reuses their graphs.
"""

from __future__ import annotations

import copy

import pytest
import torch

from optimlab.optim import NAdam, RAdam, Adamax
from optimlab.optim import _fused
from optimlab.optim._fused import DISABLE_ENV
from optimlab.optim.radam import _radam_step_size

from .fused_harness import (FusedCase, assert_matches_reference, build, cross_load_and_continue, fused_check,
                            max_relative_error, needs_compiler, run_pair, set_grads, state_tensors)

RULES = {Adamax: "_adamax_tensor", NAdam: "_nadam_tensor", RAdam: "_radam_tensor"}

F64_CASES = [
    FusedCase("adamax-l2-maximize-skip-f64", Adamax, fused_check(Adamax),
              skip_grads=True),
    FusedCase("nadam-decoupled-maximize-skip-f64", NAdam, fused_check(NAdam), skip_grads=True),
    FusedCase("radam-decoupled-maximize-skip-f64", RAdam, fused_check(RAdam), skip_grads=True),
]
F32_CASES = [
    FusedCase("adamax-f32", Adamax, {"lr": 1e-2, "betas": (0.8, 0.99)}, torch.float32, 1e-6),
    FusedCase("nadam-l2-f32", NAdam, {"lr": 1e-2, "weight_decay": 0.01}, torch.float32, 1e-6),
    FusedCase("radam-l2-f32", RAdam, {"lr": 1e-2, "weight_decay": 0.01}, torch.float32, 1e-6),
]


def _compiles(cls: type) -> int:
    return int(_fused.compile_stats().get(RULES[cls], {"compiles": 0})["compiles"])


def _step_both(pairs: list[tuple[torch.optim.Optimizer, list[torch.Tensor]]], step: int, skip: bool) -> None:
    for optimizer, params in pairs:
        set_grads(params, step, skip)
        optimizer.step()


@needs_compiler
@pytest.mark.parametrize("case", F64_CASES + F32_CASES, ids=lambda case: case.id)
def test_fused_matches_per_tensor_reference(case: FusedCase) -> None:
    fused, fused_params, reference, reference_params = run_pair(case)
    assert max_relative_error(fused_params, reference_params) <= case.rtol
    fused_state, reference_state = state_tensors(fused, fused_params), state_tensors(reference, reference_params)
    assert len(fused_state) == len(reference_state) == len(fused_params) * (4 if case.cls is NAdam else 3)
    assert max_relative_error(fused_state, reference_state) <= case.rtol
    if case.skip_grads:  # the parameter that missed steps really fell behind (its own step-dependent scalars)
        assert fused.state[fused_params[1]]["step"] < fused.state[fused_params[0]]["step"]
    # the parameters really moved, and this rule's compiled path (not only the uncompiled leftovers) ran
    initial, _ = build(case, fused=False)
    assert max_relative_error(fused_params, [p for g in initial.param_groups for p in g["params"]]) > 1e-4
    assert _compiles(case.cls) > 0


@needs_compiler
@pytest.mark.parametrize("case", F32_CASES, ids=lambda case: case.id)
def test_lr_schedule_and_rectification_switch_cause_no_recompilation(case: FusedCase) -> None:
    """50 steps under a cosine schedule (a new lr every step): compiles happen on the first step and, for
    RAdam, on the first rectified step (step 6 with beta2 = 0.999), never again."""
    first_rectified = 6
    assert not _radam_step_size(first_rectified - 1, lr=1.0, beta1=0.9, beta2=0.999)[1]
    assert _radam_step_size(first_rectified, lr=1.0, beta1=0.9, beta2=0.999)[1]
    fused, fused_params = build(case, fused=True)
    reference, reference_params = build(case, fused=False)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50) for opt in (fused, reference)]
    allowed = {1, first_rectified} if case.cls is RAdam else {1}
    lrs, compiled_at = set(), set()
    for step in range(1, 51):
        before = _compiles(case.cls)
        _step_both([(fused, fused_params), (reference, reference_params)], step, False)
        if _compiles(case.cls) != before:
            compiled_at.add(step)
        lrs.add(fused.param_groups[0]["lr"])
        for scheduler in schedulers:
            scheduler.step()
    assert len(lrs) == 50  # every step saw a new learning rate
    assert compiled_at <= allowed
    assert _compiles(case.cls) >= len(allowed)  # compiled graphs ran (here or in an earlier test)
    assert_matches_reference(fused, fused_params, reference, reference_params, case.rtol)


@needs_compiler
@pytest.mark.parametrize("case", F32_CASES, ids=lambda case: case.id)
def test_state_dict_moves_between_fused_and_reference(case: FusedCase) -> None:
    """5 steps on each path, swap the state_dicts (and parameter values), 5 more steps (RAdam's switch at
    step 6 happens after the swap): the continued runs agree."""
    continued_fused, continued_fused_params, continued_reference, continued_reference_params = (
        cross_load_and_continue(case))
    assert_matches_reference(continued_fused, continued_fused_params, continued_reference, continued_reference_params, case.rtol)


@needs_compiler
def test_fused_nadam_state_dict_loads_into_torch() -> None:
    """A fused NAdam's state_dict (``mu_product`` a 0-dim CPU tensor, as torch keeps it) resumes in
    ``torch.optim.NAdam``, and torch's resumes in the fused NAdam, each matching the other's continuation."""
    case = F32_CASES[1]
    fused, fused_params, _, _ = run_pair(case, steps=5)
    kwargs = case.kwargs
    groups = [{"params": [p.detach().clone() for p in group["params"]], "lr": group["lr"]}
              for group in fused.param_groups]
    torch_optimizer = torch.optim.NAdam(groups, **kwargs)
    torch_params = [p for group in torch_optimizer.param_groups for p in group["params"]]
    torch_optimizer.load_state_dict(copy.deepcopy(fused.state_dict()))  # both continue: no shared state tensors
    assert all(torch_optimizer.state[p]["mu_product"].shape == () for p in torch_params)
    for step in range(5, 10):
        _step_both([(fused, fused_params), (torch_optimizer, torch_params)], step, False)
    assert max_relative_error(fused_params, torch_params) <= case.rtol
    resumed, resumed_params = build(case, fused=True)
    with torch.no_grad():
        for target, source in zip(resumed_params, torch_params):
            target.copy_(source)
    resumed.load_state_dict(copy.deepcopy(torch_optimizer.state_dict()))
    for group in resumed.param_groups:
        group["fused"] = True  # torch's groups bring fused=None
    for step in range(10, 15):
        _step_both([(resumed, resumed_params), (torch_optimizer, torch_params)], step, False)
    assert_matches_reference(resumed, resumed_params, torch_optimizer, torch_params, case.rtol)


@needs_compiler
def test_nadam_parameters_with_equal_steps_but_different_mu_products() -> None:
    """The fused NAdam splits a step's tensors by ``mu_product`` (they differ after e.g. a resumed or
    edited state): each keeps its own coefficients, as in the per-tensor reference."""
    case = F64_CASES[1]
    fused, fused_params = build(case, fused=True)
    reference, reference_params = build(case, fused=False)
    pairs = [(fused, fused_params), (reference, reference_params)]
    for step in range(3):
        _step_both(pairs, step, False)
    for optimizer, params in pairs:
        optimizer.state[params[1]]["mu_product"].mul_(0.5)
    for step in range(3, 8):
        _step_both(pairs, step, False)
    assert_matches_reference(fused, fused_params, reference, reference_params, case.rtol)
    assert fused.state[fused_params[1]]["mu_product"] != fused.state[fused_params[0]]["mu_product"]


@pytest.mark.parametrize("case", F64_CASES, ids=lambda case: case.cls.__name__)
def test_disabled_by_environment_falls_back_with_one_warning(case: FusedCase, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    monkeypatch.setenv(DISABLE_ENV, "1")
    monkeypatch.setattr(_fused, "_warned", set())
    name = case.cls.__name__
    with pytest.warns(RuntimeWarning, match=rf"{name}\(fused=True\).*{DISABLE_ENV}=1.*foreach") as record:
        fused, fused_params, reference, reference_params = run_pair(case, steps=3)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert fused.param_groups[0]["fused"] is True  # the setting is kept; only this process falls back
    assert max_relative_error(fused_params, reference_params) <= 1e-12
