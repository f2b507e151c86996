"""The fused (torch.compile) step of LAMB and LARS, whose rules reduce over each tensor (weight norm,
update norm, trust ratio): parity with the per-tensor reference, zero norms, no recompiles under an
LR schedule, state_dict round trips, and the fallback.

Compiling is slow, so every case uses one parameter layout (:func:`trust_groups`) in which each
compiled call sees the same number of tensors, and the float32 cases of the schedule and state_dict
tests reuse the graphs of the parity cases.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import pytest
import torch

from optimlab.optim import LAMB, LARS
from optimlab.optim import _fused
from optimlab.optim._fused import DISABLE_ENV, fused_step
from optimlab.optim.lamb import LARGE_TENSOR_BYTES, _lamb_tensor
from optimlab.optim.lars import _lars_tensor, trust_ratio

from .fused_harness import (STEPS, FusedCase, assert_matches_reference, build, cross_load_and_continue, fused_check,
                            max_relative_error, needs_compiler, run_pair, set_grads)


def trust_groups(dtype: torch.dtype, generator: torch.Generator) -> list[dict[str, Any]]:
    """Two groups (the second at half the lr). Group 0: a matrix, a transposed matrix and a 0-dim tensor
    (these two take the same rule uncompiled), a vector and a zero-initialised matrix (weight norm 0 on
    the first step). Group 1: a matrix, a vector, a matrix. Every compiled call sees three tensors
    (LAMB, LARS without exclusion), or two adapted matrices and one excluded vector (LARS excludes
    tensors with ndim <= 1 by default), with the same number of dimensions at each position (which
    the compiled graph is specialised on). With ``skip_grads`` the transposed matrix skips steps."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype)

    return [
        {"params": [randn(7, 5), randn(6, 4).t(), randn(13), torch.zeros(4, 3, dtype=dtype), randn()]},
        {"params": [randn(3, 3), randn(5), randn(2, 6)], "lr_scale": 0.5},
    ]


def case(id: str, cls: type, kwargs: dict[str, Any], dtype: torch.dtype = torch.float64, *,
         skip_grads: bool = False) -> FusedCase:
    return FusedCase(id, cls, kwargs, dtype, 1e-12 if dtype == torch.float64 else 1e-6, skip_grads, trust_groups)


LAMB_F32 = case("lamb-wd-cap-f32", LAMB, {"lr": 1e-2, "weight_decay": 0.1, "max_trust_ratio": 0.9}, torch.float32)
LARS_F32 = case("lars-wd-exclude-f32", LARS, {"lr": 0.5, "trust_coefficient": 0.02, "weight_decay": 0.01},
                torch.float32)
CASES = [
    # a parameter skips steps: its step count (bias corrections) falls behind, so the group splits by step
    case("lamb-wd-cap-skip-f64", LAMB, fused_check(LAMB), skip_grads=True),
    case("lamb-no-bias-correction-maximize-f64", LAMB, {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-8,
                                                        "bias_correction": False, "maximize": True}),
    LAMB_F32,
    case("lars-wd-exclude-f64", LARS, fused_check(LARS)),
    case("lars-adapt-all-maximize-f64", LARS, {"lr": 0.2, "momentum": 0.5, "trust_coefficient": 0.05, "eps": 1e-6,
                                               "exclude_bias_and_norm": False, "maximize": True}),
    LARS_F32,
]


@needs_compiler
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_fused_matches_per_tensor_reference(case: FusedCase) -> None:
    fused, fused_params, reference, reference_params = run_pair(case)
    assert_matches_reference(fused, fused_params, reference, reference_params, case.rtol)
    # every parameter moved (the zero-initialised one too), and the compiled path ran
    initial, _ = build(case, fused=False)
    for moved, start in zip(fused_params, (p for group in initial.param_groups for p in group["params"])):
        assert (moved - start).abs().max() > 1e-4
    if case.skip_grads:  # the skipping parameter's step count fell behind: the group was split by step
        assert fused.state[fused_params[1]]["step"] < fused.state[fused_params[0]]["step"]
    rule = _lamb_tensor if case.cls is LAMB else _lars_tensor
    assert _fused.compile_stats()[rule.__qualname__]["compiles"] > 0


@needs_compiler
def test_zero_norms_give_trust_ratio_one() -> None:
    """A zero gradient with no weight decay makes LAMB's update 0 (update norm 0) and a zero parameter has
    weight norm 0: the ratio is 1 in both cases (a NaN from 0/0 must not leak through the ``where``)."""
    lr = 0.1
    kwargs = {"lr": lr, "betas": (0.8, 0.99), "eps": 1e-8, "bias_correction": False, "maximize": True}
    start = [torch.randn(4, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64),
             torch.zeros(5, 2, dtype=torch.float64)]
    grads = [torch.zeros(4, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64),
             torch.full((5, 2), 2.0, dtype=torch.float64)]
    results = []
    for options in ({"fused": True}, {"foreach": False}, {"foreach": True}):
        params = [p.clone() for p in start]
        optimizer = LAMB(params, **kwargs, **options)
        for param, grad in zip(params, grads):
            param.grad = grad
        optimizer.step()
        results.append(params)
    fused, reference, foreach = results
    assert torch.equal(fused[0], start[0])  # zero update: unchanged
    # zero weight, ratio 1: maximize ascends by lr m / (sqrt(v) + eps) = lr (1 - beta1) / sqrt(1 - beta2) (up to eps)
    expected = torch.full((5, 2), lr * (1 - 0.8) / math.sqrt(1 - 0.99), dtype=torch.float64)
    torch.testing.assert_close(fused[2], expected, rtol=1e-7, atol=0)
    assert max_relative_error(fused, reference) <= 1e-12
    assert max_relative_error(foreach, reference) <= 1e-12


@needs_compiler
def test_large_lamb_tensors_take_one_compiled_call_each() -> None:
    """Parameters of ``LARGE_TENSOR_BYTES`` or more go to the rule one per compiled call, the rest in a
    chunk (the same graph as the parity case with these constants); both give the reference's result."""
    kwargs = {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-8, "bias_correction": False, "maximize": True}
    generator = torch.Generator().manual_seed(3)
    shapes = [(256, 256), (7, 5), (13,), (300, 256), (4, 3)]
    start = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    assert start[0].numel() * start[0].element_size() == LARGE_TENSOR_BYTES  # the boundary counts as large
    single = fused_step(_lamb_tensor, {"weight_decay": 0.0, "maximize": True}, 1)
    fused_params, reference_params = [p.clone() for p in start], [p.clone() for p in start]
    fused, reference = LAMB(fused_params, fused=True, **kwargs), LAMB(reference_params, foreach=False, **kwargs)
    for step in range(STEPS):
        set_grads(fused_params, step, False)
        set_grads(reference_params, step, False)
        fused.step()
        reference.step()
    assert single.compiles >= 1
    assert_matches_reference(fused, fused_params, reference, reference_params, 1e-12)


def test_trust_ratio_rule() -> None:
    weight = torch.tensor([3.0, 0.0, 2.0, 4.0, 1.0], dtype=torch.float64)
    update = torch.tensor([1.0, 5.0, 0.0, 1.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(trust_ratio(weight, update), torch.tensor([3.0, 1.0, 1.0, 4.0, 0.25],
                                                                          dtype=torch.float64), rtol=0, atol=0)
    capped = trust_ratio(weight, update, max_ratio=torch.tensor(3.5, dtype=torch.float64))
    torch.testing.assert_close(capped, torch.tensor([3.0, 1.0, 1.0, 3.5, 0.25], dtype=torch.float64),
                               rtol=0, atol=0)
    # LARS: eta * |w| / (|g| + beta |w| + eps), 0-dim in, 0-dim out
    ratio = trust_ratio(torch.tensor(2.0), torch.tensor(3.0), coefficient=0.5, extra=0.25 * 2.0, eps=0.5)
    assert ratio.shape == () and ratio.item() == pytest.approx(0.5 * 2.0 / (3.0 + 0.5 + 0.5), rel=1e-7)
    assert trust_ratio(torch.tensor(0.0), torch.tensor(0.0), max_ratio=math.inf).item() == 1.0


@needs_compiler
@pytest.mark.parametrize("case", [LAMB_F32, LARS_F32], ids=lambda case: case.id)
def test_lr_schedule_causes_no_recompilation(case: FusedCase) -> None:
    fused, fused_params = build(case, fused=True)
    reference, reference_params = build(case, fused=False)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50) for opt in (fused, reference)]
    if case.cls is LAMB:
        steps = [fused_step(_lamb_tensor, {"weight_decay": 0.1, "maximize": False})]
    else:
        steps = [fused_step(_lars_tensor, {"weight_decay": 0.01, "adapt": True, "maximize": False}),
                 fused_step(_lars_tensor, {"weight_decay": 0.0, "adapt": False, "maximize": False}, elementwise=True)]
    compiles_after_first_step = None
    lrs = set()
    for step in range(50):
        set_grads(fused_params, step, False)
        set_grads(reference_params, step, False)
        fused.step()
        reference.step()
        if compiles_after_first_step is None:
            compiles_after_first_step = [s.compiles for s in steps]
        for scheduler in schedulers:
            scheduler.step()
        lrs.add(fused.param_groups[0]["lr"])
    assert len(lrs) == 50  # every step saw a new learning rate
    assert min(compiles_after_first_step) >= 1
    assert [s.compiles for s in steps] == compiles_after_first_step
    assert_matches_reference(fused, fused_params, reference, reference_params, 1e-6)


@needs_compiler
@pytest.mark.parametrize("case", [LAMB_F32, LARS_F32], ids=lambda case: case.id)
def test_state_dict_moves_between_fused_and_reference(case: FusedCase) -> None:
    continued_fused, continued_fused_params, continued_reference, continued_reference_params = (
        cross_load_and_continue(case))
    assert_matches_reference(continued_fused, continued_fused_params, continued_reference, continued_reference_params, 1e-6)
    # a checkpoint without the key (written before fused= existed) loads with the default
    old = continued_fused.state_dict()
    for group in old["param_groups"]:
        del group["fused"]
    restored, _ = build(case, fused=False)
    restored.load_state_dict(old)
    assert all(group["fused"] is None for group in restored.param_groups)


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_fused_is_a_keyword_only_option_off_by_default(cls: type) -> None:
    parameter = inspect.signature(cls).parameters["fused"]
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is None
    optimizer = cls([{"params": [torch.zeros(2, 2)]}, {"params": [torch.zeros(3)], "fused": True}])
    assert optimizer.defaults["fused"] is None
    assert [group["fused"] for group in optimizer.param_groups] == [None, True]


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_disabled_by_environment_falls_back_with_one_warning(cls: type, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, "1")
    monkeypatch.setattr(_fused, "_warned", set())
    fallback = case(f"{cls.__name__}-fallback", cls, {"lr": 1e-2, "weight_decay": 0.1})
    with pytest.warns(RuntimeWarning, match=rf"{cls.__name__}\(fused=True\).*{DISABLE_ENV}=1.*foreach") as record:
        fused, fused_params, reference, reference_params = run_pair(fallback, steps=3)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert max_relative_error(fused_params, reference_params) <= 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shown once per process, not once per step or per optimizer
        param = torch.ones(2, 2)
        param.grad = torch.ones(2, 2)
        cls([param], fused=True).step()
