"""The fused low-precision step (bf16 / int8 moments decoded, updated and stochastically rounded in one
compiled pass) against the eager low-precision path, step by step.

Both paths apply the same rule and the same hash-based stochastic rounding; the compiled rule may round
an fp32 intermediate differently in the last place (fused multiply-add), which can move a value across a
rounding threshold. So each step starts both optimizers from the same state (the fused optimizer's
``state_dict``, loaded into the eager one: the checkpoint round trip is part of the test) and compares
one step: parameters within fp32 rounding, and the stored state bit for bit except a bounded number of
elements that differ by one stored step (one bf16 ulp, one int8 code, or the block scale's last place).

Compiling costs seconds per graph: every case uses chunks of one tensor, float32 parameters and the
``decoupled_weight_decay=True`` constants (Adam and AdamW share them), so there is one graph per
(rule, storage).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

from optimlab.optim import Adam, AdamW, Lion, _fused, _lowp_native
from optimlab.optim.lowp_state import BLOCK_SIZE, _hash_bits, _hash_from, _hash_start, lowp_rule

from .fused_harness import max_relative_error, needs_compiler, set_grads

STEPS = 20
PARAM_RTOL = 1e-6  # fp32: one step from the same state, the rules differ by float rounding only
MAX_FLIPPED = 1e-3  # at most this fraction of the stored values of a step rounds to the other neighbour


def _groups(generator: torch.Generator) -> list[dict[str, Any]]:
    """Compiled tensors (several int8 blocks, a partial last block) and the uncompiled rest: a
    single-block tensor (int8), a 0-dim one and a transposed one; two groups with different lr.
    Parameter 1 skips every third step (``set_grads``), so its step count falls behind."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    return [
        {"params": [randn(20, 30), randn(3 * BLOCK_SIZE + 5), randn(), randn(6, 40).t()]},
        {"params": [randn(BLOCK_SIZE), randn(2 * BLOCK_SIZE)], "lr": 5e-3},
    ]


CASES: list[tuple[str, Callable[..., torch.optim.Optimizer], dict[str, Any]]] = [
    ("adamw", AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    # Adam with AdamW's constants (one graph for both), other betas
    ("adam-decoupled", Adam, {"lr": 1e-2, "betas": (0.8, 0.99), "weight_decay": 0.1,
                              "decoupled_weight_decay": True}),
    ("lion", Lion, {"lr": 1e-3, "weight_decay": 0.1}),
    # the native kernel's other branches: L2 weight decay, maximize, a lerp weight >= 0.5 (native only: the
    # compiled wrapper would compile one more graph for these constants)
    ("adam-l2-maximize", Adam, {"lr": 1e-2, "betas": (0.3, 0.99), "weight_decay": 0.1, "maximize": True}),
]
_NATIVE_ONLY = ("adam-l2-maximize",)


def _build(cls: Callable[..., torch.optim.Optimizer], kwargs: dict[str, Any], state_dtype: str, fused: bool
           ) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    options = dict(kwargs, state_dtype=state_dtype, **({"fused": True} if fused else {"foreach": False}))
    optimizer = cls(_groups(torch.Generator().manual_seed(0)), **options)
    return optimizer, [p for group in optimizer.param_groups for p in group["params"]]


def _stored_differences(fused: torch.optim.Optimizer, fused_params: list[torch.Tensor],
                        reference: torch.optim.Optimizer, reference_params: list[torch.Tensor]) -> tuple[int, int]:
    """(stored values that differ, stored values): asserts every difference is one stored step."""
    differing = total = 0
    for fused_param, reference_param in zip(fused_params, reference_params):
        fused_state, reference_state = fused.state[fused_param], reference.state[reference_param]
        assert fused_state.keys() == reference_state.keys()
        for key, value in fused_state.items():
            expected = reference_state[key]
            assert value.dtype == expected.dtype and value.shape == expected.shape, key
            if key == "step":
                assert torch.equal(value, expected)
                continue
            if key.endswith("_blockmax"):
                assert max_relative_error([value], [expected]) <= PARAM_RTOL, key
                continue
            total += value.numel()
            if value.dtype == torch.bfloat16:  # one bf16 ulp: adjacent bit patterns (same sign)
                gap = (value.view(torch.int16).int() - expected.view(torch.int16).int()).abs()
            else:  # one int8 code: adjacent codes
                assert value.dtype == torch.int8, key
                gap = (value.int() - expected.int()).abs()
            assert int(gap.max()) <= 1, key
            differing += int((gap != 0).sum())
    return differing, total


@needs_compiler
@pytest.mark.parametrize("native", [True, False], ids=["native", "compiled"])
@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("name, cls, kwargs", CASES, ids=[case[0] for case in CASES])
def test_fused_matches_eager_low_precision_step_by_step(
    name: str, cls: Callable[..., torch.optim.Optimizer], kwargs: dict[str, Any], state_dtype: str, native: bool,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fused step (the native kernel for bf16-state Adam/AdamW, else the compiled wrapper) against eager."""
    takes_native = cls is not Lion
    if native and not takes_native:
        pytest.skip("only Adam/AdamW have a native kernel")
    if name in _NATIVE_ONLY and not (native and state_dtype == "bfloat16"):
        pytest.skip("a case for the native kernel's branches (shared by bf16 and int8)")
    if takes_native and not native:
        monkeypatch.setenv("OPTIMLAB_DISABLE_NATIVE", "1")
    native_calls = []
    kernel = _lowp_native._adam_lowp
    monkeypatch.setattr(_lowp_native, "_adam_lowp", lambda *a, **k: native_calls.extend(a[1]) or kernel(*a, **k))
    fused, fused_params = _build(cls, kwargs, state_dtype, fused=True)
    reference, reference_params = _build(cls, kwargs, state_dtype, fused=False)
    initial = [p.detach().clone() for p in fused_params]
    differing = total = 0
    for step in range(STEPS):
        reference.load_state_dict(copy.deepcopy(fused.state_dict()))  # fused -> eager checkpoint, every step
        for group in reference.param_groups:
            group["fused"], group["foreach"] = None, False
        with torch.no_grad():
            for target, source in zip(reference_params, fused_params):
                target.copy_(source)
        set_grads(fused_params, step, skip=True)
        set_grads(reference_params, step, skip=True)
        fused.step()
        reference.step()
        assert max_relative_error(fused_params, reference_params) <= PARAM_RTOL
        step_differing, step_total = _stored_differences(fused, fused_params, reference, reference_params)
        assert step_differing <= MAX_FLIPPED * step_total
        differing, total = differing + step_differing, total + step_total
    assert total > 0 and max_relative_error(fused_params, initial) > 1e-3  # the parameters moved
    skipped = fused.state[fused_params[1]]["step"]
    assert float(skipped) < STEPS == float(fused.state[fused_params[0]]["step"])  # a param skipped steps
    if native:  # the native kernel ran (on the contiguous float32 tensors)
        assert len(native_calls) >= 3 * STEPS
    else:
        stats = _fused.compile_stats()[f"{'lion_tensor' if cls is Lion else '_adam_tensor'}_{state_dtype}_state"]
        assert stats["compiles"] >= 1 and not native_calls  # the compiled path ran (not only the uncompiled tensors)
    # eager -> fused: the fused optimizer resumes from the eager one's checkpoint and matches it
    fused.load_state_dict(copy.deepcopy(reference.state_dict()))
    for group in fused.param_groups:
        group["fused"] = True
    assert fused.state[fused_params[0]]["exp_avg"].dtype == reference.state[reference_params[0]]["exp_avg"].dtype
    with torch.no_grad():
        for target, source in zip(fused_params, reference_params):
            target.copy_(source)
    set_grads(fused_params, STEPS, skip=False)
    set_grads(reference_params, STEPS, skip=False)
    fused.step()
    reference.step()
    assert max_relative_error(fused_params, reference_params) <= PARAM_RTOL
    step_differing, step_total = _stored_differences(fused, fused_params, reference, reference_params)
    assert step_differing <= MAX_FLIPPED * step_total


@needs_compiler
def test_scheduled_lr_and_new_steps_cause_no_recompilation() -> None:
    """50 learning rates from a schedule and 50 step counts (hash starts): data, never a new graph."""
    fused, params = _build(Lion, CASES[2][2], "bfloat16", fused=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(fused, T_max=50)
    compiles_after_first = None
    lrs = set()
    for step in range(50):
        set_grads(params, step, skip=True)
        fused.step()
        stats = _fused.compile_stats()["lion_tensor_bfloat16_state"]
        if compiles_after_first is None:
            compiles_after_first = stats["compiles"]
        lrs.add(fused.param_groups[0]["lr"])
        scheduler.step()
    assert len(lrs) == 50 and compiles_after_first >= 1
    assert _fused.compile_stats()["lion_tensor_bfloat16_state"]["compiles"] == compiles_after_first


@needs_compiler
def test_compiled_int32_hash_wraps_like_eager() -> None:
    """The integer hash computed inside a compiled kernel (int32 multiplies that overflow, shifts of
    negative values) equals the eager one bit for bit, for starts on both sides of 2**31."""
    count = 3 * 4096 + 17
    compiled = torch.compile(lambda start: _hash_from(start, count, "cpu"), dynamic=False)
    for seed, begin in [(0, 0), (12_345, 77), (0x7FFFFFFF, 2**31 - 5), (3, 2**32 - 100)]:
        start = _hash_start(seed, begin)
        expected = _hash_bits(begin, begin + count, seed, "cpu")
        assert torch.equal(compiled(torch.tensor(float(start), dtype=torch.float64)), expected)
    assert math.prod(expected.shape) == count and bool((expected < 0).any())  # the sign bit is exercised


def test_native_kernel_falls_back_with_one_warning_without_a_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """No C++ compiler: ``adam_lowp_kernel`` says why once and returns None (the compiled wrapper is used)."""
    monkeypatch.setenv("CXX", "/nonexistent/optimlab-test-cxx")
    monkeypatch.setattr(_lowp_native, "_warned", set())
    _lowp_native._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"native low-precision Adam kernel is unavailable \(no C\+\+ compiler"):
            assert _lowp_native.adam_lowp_kernel("int8") is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _lowp_native.adam_lowp_kernel("bfloat16") is None  # warned once
    finally:
        _lowp_native._library.cache_clear()


def test_lowp_rule_rejects_unknown_storage() -> None:
    from optimlab.optim.lion import lion_tensor

    with pytest.raises(ValueError, match=r"Invalid storage: 'float16' \(accepted: 'bfloat16', 'int8'\)"):
        lowp_rule(lion_tensor, (("exp_avg", True),), "float16")


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_uncompiled_dtypes_take_the_wrapper_and_equal_eager_exactly(state_dtype: str) -> None:
    """float64 parameters (not compiled) run the same wrapper eagerly: bit-identical to the eager path."""
    before = {name: entry["compiles"] for name, entry in _fused.compile_stats().items()}
    generator = torch.Generator().manual_seed(5)
    fused_params = [torch.randn(20, 30, generator=generator, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    reference_params = [p.clone() for p in fused_params]
    options = {"lr": 1e-2, "state_dtype": state_dtype}
    fused, reference = AdamW(fused_params, fused=True, **options), AdamW(reference_params, foreach=False, **options)
    for step in range(5):
        set_grads(fused_params, step, skip=False)
        set_grads(reference_params, step, skip=False)
        fused.step()
        reference.step()
    assert all(torch.equal(a, b) for a, b in zip(fused_params, reference_params))
    for fused_param, reference_param in zip(fused_params, reference_params):
        for key, value in fused.state[fused_param].items():
            assert torch.equal(value, reference.state[reference_param][key]), key
    after = {name: entry["compiles"] for name, entry in _fused.compile_stats().items()}
    assert all(count == before.get(name, 0) for name, count in after.items())  # nothing compiled


@needs_compiler
def test_native_int8_vector_codes_equal_the_scalar_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The native kernel codes int8 moments 16 values at a time (AVX-512) and the rest one at a time; with
    ``SCALAR_CODES`` all one at a time. Both compute the same operations: parameters and stored state are equal
    bit for bit, over gradients spanning 12 decades (codes in every group and in the linear range) and tensors
    whose blocks end inside a 16-value vector."""
    if not _lowp_native.vector_codes():
        pytest.skip("the kernel was built without AVX-512: it has only the scalar path")
    runs = []
    for scalar in (False, True):
        monkeypatch.setattr(_lowp_native, "SCALAR_CODES", scalar)
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(n, generator=generator) for n in (3 * BLOCK_SIZE + 5, 4096 + 7, 1000)]
        optimizer = AdamW(params, lr=1e-2, weight_decay=0.1, state_dtype="int8", fused=True)
        for _ in range(4):
            for param in params:
                spread = 10.0 ** torch.empty(param.shape).uniform_(-12, 0, generator=generator)
                param.grad = torch.randn(param.shape, generator=generator) * spread
            optimizer.step()
        runs.append((params, optimizer.state_dict()["state"]))
    (vector_params, vector_state), (scalar_params, scalar_state) = runs
    assert all(torch.equal(a, b) for a, b in zip(vector_params, scalar_params))
    for index in vector_state:
        for key, value in vector_state[index].items():
            assert torch.equal(value, scalar_state[index][key]), (index, key)
    codes = torch.cat([vector_state[index]["exp_avg_sq"].view(torch.uint8).int() for index in vector_state])
    assert int((codes < 4).sum()) > 0 and int((codes >= 124).sum()) > 0 and int(((codes >= 4) & (codes < 60)).sum()) > 0
