"""Memory-light optimizer state: the 8-bit block-wise float code, its error bound, state dtypes and bytes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from optimlab.optim import Adam, AdamW, Lion, create_optimizer, state_bytes, state_bytes_per_param
from optimlab.optim.lion import lion_step
from optimlab.optim.lowp_state import (
    BLOCK_SIZE,
    code_values,
    dequantize_blockwise,
    dither_seed,
    int8_dither,
    load_moments,
    quantize_blockwise,
    resolve_state_dtype,
    round_to_bfloat16,
    uniform_dither,
)

from .harness import MLPProblem, save_and_load, train


@pytest.mark.parametrize("signed", [True, False])
def test_code_values_have_more_steps_per_binade_near_the_maximum(signed: bool) -> None:
    code = code_values(signed).double()
    assert code.numel() == (249 if signed else 253)
    assert bool((code[1:] > code[:-1]).all())  # sorted, no duplicates
    assert float(code.max()) == 1.0 and 0.0 in code.tolist()
    if signed:
        assert torch.equal(code, -code.flip(0))
    positive = code[code > 0]
    # (binade [2^-k, 2^(1-k)), steps in it): 2^4 / 2^3 / 2^2 signed, 2^5 / 2^3 / 2^2 unsigned
    groups = [(1, 16), (3, 16), (4, 8), (9, 8), (10, 4), (15, 4)] if signed else \
        [(1, 32), (4, 32), (5, 8), (12, 8), (13, 4), (26, 4)]
    for k, steps in groups:
        binade = positive[(positive >= 2.0**-k) & (positive < 2.0 ** (1 - k))]
        assert torch.equal(binade, 2.0**-k * (1 + torch.arange(steps, dtype=torch.float64) / steps)), k
    lowest = 2.0 ** -(15 if signed else 26)
    assert torch.equal(positive[positive < lowest], lowest * torch.arange(1, 4, dtype=torch.float64) / 4)
    assert float(positive.min()) == lowest / 4  # 5 (signed) and 8 (unsigned) decades below the maximum


def _values(numel: int, signed: bool, seed: int) -> torch.Tensor:
    """Blocks of values spread over 8 decades, like optimizer moments."""
    generator = torch.Generator().manual_seed(seed)
    magnitudes = 10.0 ** torch.empty(numel).uniform_(-8, 0, generator=generator)
    scale = 10.0 ** torch.empty(numel).uniform_(-3, 3, generator=generator)
    values = magnitudes * scale
    if signed:
        values = values * torch.where(torch.rand(numel, generator=generator) < 0.5, -1.0, 1.0)
    return values


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(1000,), (7, 300), (256,), (3, 4, 5), (1,)])
def test_round_trip_error_is_at_most_half_a_step_per_block(signed: bool, shape: tuple[int, ...]) -> None:
    numel = math.prod(shape)
    values = _values(numel, signed, seed=numel).view(shape)
    codes, absmax = quantize_blockwise(values, signed)
    assert codes.dtype == torch.int8 and codes.shape == values.shape
    assert absmax.dtype == torch.float32 and absmax.shape == (math.ceil(numel / BLOCK_SIZE),)
    decoded = dequantize_blockwise(codes, absmax, signed).double()
    code = code_values(signed).double()
    flat, flat_decoded = values.reshape(-1).double(), decoded.reshape(-1)
    block_scale = absmax.double().repeat_interleave(BLOCK_SIZE)[:numel]
    normalized = flat / block_scale
    upper_index = torch.searchsorted(code, normalized).clamp(max=code.numel() - 1)
    lower_index = (upper_index - 1).clamp(min=0)
    step = (code[upper_index] - code[lower_index]) * block_scale  # the local quantisation step
    error = (flat - flat_decoded).abs()
    assert bool((error <= step / 2 + 2e-7 * block_scale).all())  # float32 arithmetic on the way
    assert torch.equal(flat_decoded.abs().reshape(-1, 1)[flat.abs().argmax()], block_scale[flat.abs().argmax()].view(1))


@pytest.mark.parametrize("signed", [True, False])
def test_stochastic_rounding_is_unbiased_and_within_one_step(signed: bool) -> None:
    values = _values(600, signed, seed=5)
    code = code_values(signed).double()
    total = torch.zeros(600, dtype=torch.float64)
    draws = 400
    for seed in range(draws):
        codes, absmax = quantize_blockwise(values, signed, dither=uniform_dither(values.shape, seed))
        decoded = dequantize_blockwise(codes, absmax, signed).double()
        scale = absmax.double().repeat_interleave(BLOCK_SIZE)[:600]
        upper = torch.searchsorted(code, values.double() / scale).clamp(1, code.numel() - 1)
        step = (code[upper] - code[upper - 1]) * scale
        assert bool(((decoded - values.double()).abs() <= step * (1 + 1e-5)).all())
        total += decoded
    mean_error = (total / draws - values.double()).abs()
    # the mean of 400 Bernoulli roundings is within 4 standard deviations (step / (2 sqrt(400))) of the value
    assert bool((mean_error <= 4 * step / (2 * draws**0.5) + 1e-6 * scale).all())
    assert float(mean_error.max()) > 0  # not a deterministic rounding


def test_bfloat16_stochastic_rounding_is_unbiased() -> None:
    values = torch.randn(500, generator=torch.Generator().manual_seed(1))
    ulp = values.abs() * 2.0**-7  # an upper bound of the bf16 spacing at each value (8 significant bits)
    total = torch.zeros(500, dtype=torch.float64)
    for seed in range(400):
        rounded = round_to_bfloat16(values, uniform_dither(values.shape, seed))
        assert rounded.dtype == torch.bfloat16
        assert bool(((rounded.float() - values).abs() < ulp).all())  # one of the two neighbours
        total += rounded.double()
    # the mean of 400 Bernoulli roundings is within 4 standard deviations (ulp / (2 sqrt(400))) of the value
    assert bool(((total / 400).float() - values).abs().le(4 * ulp / 40).all())
    assert torch.equal(round_to_bfloat16(values), values.to(torch.bfloat16))


def test_dither_is_deterministic_uniform_and_seed_dependent() -> None:
    first = uniform_dither((200_000,), dither_seed(3, "exp_avg"))
    assert torch.equal(first, uniform_dither((200_000,), dither_seed(3, "exp_avg")))
    assert 0.0 <= float(first.min()) and float(first.max()) < 1.0
    assert abs(float(first.mean()) - 0.5) < 0.005 and abs(float(first.std()) - 12**-0.5) < 0.005
    for other in (uniform_dither((200_000,), dither_seed(4, "exp_avg")),
                  uniform_dither((200_000,), dither_seed(3, "exp_avg_sq"))):
        assert float((other == first).float().mean()) < 1e-3
        assert abs(float(torch.corrcoef(torch.stack([first, other]))[0, 1])) < 0.01


def test_small_second_moments_survive_where_a_linear_code_loses_them() -> None:
    values = torch.tensor([1.0, 0.3, 1e-2, 3e-4, 1e-5, 2e-7, 3e-8])  # one block, 8 decades
    codes, absmax = quantize_blockwise(values, signed=False)
    decoded = dequantize_blockwise(codes, absmax, signed=False)
    assert bool((decoded > 0).all())
    relative_error = ((decoded - values).abs() / values)
    # to nearest: at most half a step, relative to the binade: 1/32 near the maximum, then 1/8, then 1/4
    assert float(relative_error[:2].max()) <= 1 / 64
    assert float(relative_error[2:4].max()) <= 1 / 16
    assert float(relative_error[4:].max()) <= 1 / 8
    linear = torch.round(values / values.max() * 255) / 255 * values.max()  # absmax int8, uniform code
    assert int((linear == 0).sum()) == 4


def test_all_zero_block_and_sign_checks() -> None:
    codes, absmax = quantize_blockwise(torch.zeros(300), signed=True)
    assert torch.equal(dequantize_blockwise(codes, absmax, signed=True), torch.zeros(300))
    with pytest.raises(ValueError, match="non-negative"):
        quantize_blockwise(torch.tensor([1.0, -1.0]), signed=False)
    with pytest.raises(ValueError, match="blockmax"):
        dequantize_blockwise(codes, absmax[:1], signed=True)


@pytest.mark.parametrize(("given", "expected"), [
    (None, None), ("float32", None), (torch.float32, None), ("bf16", "bfloat16"), (torch.bfloat16, "bfloat16"),
    ("int8", "int8"), (torch.int8, "int8"),
])
def test_resolve_state_dtype(given, expected) -> None:
    assert resolve_state_dtype(given) == expected


@pytest.mark.parametrize("bad", ["float16", "fp8", torch.float16, 8])
def test_invalid_state_dtype_raises(bad) -> None:
    with pytest.raises(ValueError, match="state_dtype.*accepted"):
        Lion([torch.nn.Parameter(torch.ones(3))], state_dtype=bad)
    optimizer = Lion([torch.nn.Parameter(torch.ones(3))])
    with pytest.raises(ValueError, match="state_dtype"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "state_dtype": bad})


def _sized_params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(16, 64)), torch.nn.Parameter(torch.randn(512)), torch.nn.Parameter(torch.randn(300))]


def _one_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer.step()


@pytest.mark.parametrize(("state_dtype", "moment_dtype", "bytes_per_value"), [
    (None, torch.float32, 4), ("bfloat16", torch.bfloat16, 2), ("int8", torch.int8, 1),
])
def test_lion_state_dtype_and_bytes_match_theory(state_dtype, moment_dtype, bytes_per_value) -> None:
    params = _sized_params()
    optimizer = Lion(params, lr=1e-3, state_dtype=state_dtype)
    _one_step(optimizer, params)
    for param in params:
        state = optimizer.state[param]
        assert state["exp_avg"].dtype == moment_dtype and state["exp_avg"].shape == param.shape
        assert ("step" in state) == (state_dtype is not None)
        assert param.dtype == torch.float32 and param.grad.dtype == torch.float32
    scales = sum(math.ceil(p.numel() / BLOCK_SIZE) * 4 for p in params) if state_dtype == "int8" else 0
    count = sum(p.numel() for p in params)  # 1024 + 512 + 300
    assert state_bytes(optimizer) == count * bytes_per_value + scales
    if state_dtype == "int8":
        assert state_bytes_per_param(optimizer) == pytest.approx(1 + 4 / BLOCK_SIZE, abs=0.01)


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_lion_low_precision_state_is_fp32_math_on_rounded_moments(state_dtype: str) -> None:
    """The update is the float32 rule applied to the decoded moment; only the stored moment is rounded
    (stochastically, with the dither of the state's step)."""
    params = _sized_params()
    reference_params = [p.detach().clone() for p in params]
    reference_moments = [torch.zeros_like(p) for p in params]
    optimizer = Lion(params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, state_dtype=state_dtype)
    generator = torch.Generator().manual_seed(3)
    for step in range(1, 11):
        grads = [torch.randn(p.shape, generator=generator) for p in params]
        for param, grad in zip(params, grads):
            param.grad = grad
        optimizer.step()
        lion_step(reference_params, grads, reference_moments, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1,
                  maximize=False)
        for index, moment in enumerate(reference_moments):
            if state_dtype == "bfloat16":
                dither = uniform_dither(moment.shape, dither_seed(step, "exp_avg"))
                reference_moments[index] = round_to_bfloat16(moment, dither).float()
            else:
                dither = int8_dither(moment.shape, step, signed=True)
                reference_moments[index] = dequantize_blockwise(*quantize_blockwise(moment, True, dither=dither), True)
    for param, reference in zip(params, reference_params):
        assert torch.equal(param.detach(), reference)


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_checkpoint_keeps_the_storage_dtype(state_dtype: str) -> None:
    problem = MLPProblem(torch.float32)
    optimizer = Lion(problem.parameters(), lr=1e-3, state_dtype=state_dtype)
    train(problem, optimizer, 6)
    resumed = Lion(problem.parameters(), lr=1e-3, state_dtype=state_dtype)
    resumed.load_state_dict(save_and_load(optimizer.state_dict()))
    for param in problem.parameters():
        for key, value in optimizer.state[param].items():
            assert resumed.state[param][key].dtype == value.dtype
            assert torch.equal(resumed.state[param][key], value)


def _adam_group(params, state_dtype, **kwargs):
    return [{"params": params, "state_dtype": state_dtype, **kwargs}]


@pytest.mark.parametrize("via", ["argument", "group-key"])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize(("state_dtype", "moment_dtype", "bytes_per_value"), [
    (None, torch.float32, 4), ("bfloat16", torch.bfloat16, 2), ("int8", torch.int8, 1),
])
def test_adam_state_dtype_and_bytes_match_theory(state_dtype, moment_dtype, bytes_per_value, amsgrad: bool,
                                                 via: str) -> None:
    """float32 Adam 8 B/param, bf16 4 B, int8 2 B + one float32 scale per 256 values per moment,
    whether ``state_dtype`` is the constructor argument or a param-group key."""
    params = _sized_params()
    if via == "argument":
        optimizer = AdamW(params, lr=1e-3, amsgrad=amsgrad, state_dtype=state_dtype)
    else:
        optimizer = AdamW(_adam_group(params, state_dtype), lr=1e-3, amsgrad=amsgrad)
    _one_step(optimizer, params)
    moments = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq")
    for param in params:
        state = optimizer.state[param]
        assert all(state[key].dtype == moment_dtype and state[key].shape == param.shape for key in moments)
    count = sum(p.numel() for p in params)
    scales = sum(math.ceil(p.numel() / BLOCK_SIZE) * 4 for p in params) if state_dtype == "int8" else 0
    assert state_bytes(optimizer) == len(moments) * (count * bytes_per_value + scales)
    if not amsgrad:
        expected = {None: 8.0, "bfloat16": 4.0, "int8": 2 + 8 / BLOCK_SIZE}[state_dtype]
        assert state_bytes_per_param(optimizer) == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_adam_low_precision_paths_agree_and_checkpoints_resume_bitwise(cls, state_dtype: str) -> None:
    """foreach == per-tensor, and a checkpoint (torch.save / weights_only load) resumes bit for bit."""
    results = []
    for foreach in (False, True):
        problem = MLPProblem(torch.float32)
        optimizer = cls(_adam_group(problem.parameters(), state_dtype, amsgrad=True), lr=1e-2, foreach=foreach,
                        weight_decay=0.05)
        train(problem, optimizer, 8)
        results.append((problem, optimizer))
    (single_problem, single), (multi_problem, multi) = results
    for single_param, multi_param in zip(single_problem.parameters(), multi_problem.parameters()):
        assert torch.equal(single_param, multi_param)
        for key, value in single.state[single_param].items():
            assert torch.equal(multi.state[multi_param][key], value)
    resumed_problem = MLPProblem(torch.float32)
    resumed_problem.load_state_dict(single_problem.state_dict())
    resumed = cls(_adam_group(resumed_problem.parameters(), state_dtype, amsgrad=True), lr=1e-2, weight_decay=0.05)
    resumed.load_state_dict(save_and_load(single.state_dict()))
    train(single_problem, single, 6, start=8)
    train(resumed_problem, resumed, 6, start=8)
    for param, reference in zip(resumed_problem.parameters(), single_problem.parameters()):
        assert torch.equal(param, reference)
        for key, value in single.state[reference].items():
            assert resumed.state[param][key].dtype == value.dtype and torch.equal(resumed.state[param][key], value)


def test_adam_low_precision_state_is_fp32_math_on_rounded_moments() -> None:
    """int8 AdamW: each step is the float32 rule on the decoded moments, then stochastic re-quantisation."""
    params = _sized_params()
    optimizer = AdamW(_adam_group(params, "int8"), lr=1e-3, weight_decay=0.1)
    reference_params = [p.detach().clone().requires_grad_() for p in params]
    reference = AdamW(reference_params, lr=1e-3, weight_decay=0.1)
    generator = torch.Generator().manual_seed(4)
    for step in range(1, 8):
        for param, reference_param in zip(params, reference_params):
            param.grad = torch.randn(param.shape, generator=generator)
            reference_param.grad = param.grad.clone()
        optimizer.step()
        reference.step()
        for reference_param in reference_params:
            state = reference.state[reference_param]
            for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                dither = int8_dither(state[key].shape, step, signed)
                state[key] = dequantize_blockwise(*quantize_blockwise(state[key], signed, dither=dither), signed)
    for param, reference_param in zip(params, reference_params):
        assert torch.equal(param.detach(), reference_param.detach())


@pytest.mark.parametrize(("name", "moment_dtype", "expected"), [
    ("adam", torch.float32, 8.0), ("adam-bf16", torch.bfloat16, 4.0), ("adam-int8", torch.int8, 2 + 8 / BLOCK_SIZE),
    ("adamw", torch.float32, 8.0), ("adamw-bf16", torch.bfloat16, 4.0), ("adamw-int8", torch.int8, 2 + 8 / BLOCK_SIZE),
])
def test_adam_registry_presets(name: str, moment_dtype: torch.dtype, expected: float) -> None:
    params = _sized_params()
    optimizer = create_optimizer(params, name)
    _one_step(optimizer, params)
    assert optimizer.state[params[0]]["exp_avg_sq"].dtype == moment_dtype
    assert state_bytes_per_param(optimizer) == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("bad", ["float16", torch.float16, "int4", 8])
def test_adam_state_dtype_argument_is_validated(bad) -> None:
    with pytest.raises(ValueError, match="state_dtype.*accepted"):
        AdamW([torch.nn.Parameter(torch.ones(3))], state_dtype=bad)


def test_adam_state_dtype_argument_is_a_default_that_groups_override() -> None:
    full, compact, bf16 = (torch.nn.Parameter(torch.randn(300)) for _ in range(3))
    optimizer = Adam([{"params": [full], "state_dtype": None}, {"params": [compact]}], lr=1e-3, state_dtype="int8")
    optimizer.add_param_group({"params": [bf16], "state_dtype": torch.bfloat16})
    assert optimizer.defaults["state_dtype"] == "int8"
    assert [group["state_dtype"] for group in optimizer.param_groups] == [None, "int8", "bfloat16"]
    _one_step(optimizer, [full, compact, bf16])
    assert [optimizer.state[p]["exp_avg"].dtype for p in (full, compact, bf16)] == [
        torch.float32, torch.int8, torch.bfloat16]


def test_adam_with_state_dtype_resumes_a_torch_checkpoint_in_full_precision() -> None:
    """A ``torch.optim.AdamW`` state_dict (groups without ``state_dtype``, float32 moments) loaded into
    ``AdamW(state_dtype="int8")`` keeps its full-precision moments and continues exactly as torch does."""
    problem = MLPProblem(torch.float32)
    reference = torch.optim.AdamW(problem.parameters(), lr=1e-2, weight_decay=0.05)
    train(problem, reference, 5)
    resumed_problem = MLPProblem(torch.float32)
    resumed_problem.load_state_dict(problem.state_dict())
    resumed = AdamW(resumed_problem.parameters(), lr=1e-2, weight_decay=0.05, state_dtype="int8")
    resumed.load_state_dict(save_and_load(reference.state_dict()))
    assert all(group["state_dtype"] is None for group in resumed.param_groups)
    train(problem, reference, 5, start=5)
    train(resumed_problem, resumed, 5, start=5)
    for param, reference_param in zip(resumed_problem.parameters(), problem.parameters()):
        torch.testing.assert_close(param, reference_param, rtol=1e-6, atol=1e-7)
        assert resumed.state[param]["exp_avg"].dtype == torch.float32


def test_adam_state_dtype_group_key_is_validated() -> None:
    with pytest.raises(ValueError, match="state_dtype"):
        Adam(_adam_group([torch.nn.Parameter(torch.ones(3))], "float16"))
    with pytest.raises(ValueError, match="complex"):
        Adam(_adam_group([torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))], "bfloat16"))
    optimizer = AdamW(_adam_group([torch.nn.Parameter(torch.ones(3))], "bf16"))
    assert optimizer.param_groups[0]["state_dtype"] == "bfloat16"


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("fused", [False, True])
def test_a_checkpoint_of_the_previous_formats_loads(state_dtype: str, fused: bool) -> None:
    """``data/lowp_state_0c15a26.pt`` was written by commit 0c15a26's code (AdamW, 3 eager steps, a 7x60 and a
    300-value parameter: int8 blocks that end inside a row, a partial last block). bf16 moments have not changed
    format: they load bit for bit. int8 moments were then format 1 (indices into the dynamic tree code, scales in
    ``<key>_absmax``): loading migrates them to the format-2 codes (``<key>_blockmax``) with a warning, each value
    the nearest format-2 code to what the old code decoded (within half a code step of its block); training goes on
    (eager and fused)."""
    saved = torch.load(Path(__file__).with_name("data") / "lowp_state_0c15a26.pt")[state_dtype]
    params = [p.clone() for p in saved["params"]]
    optimizer = AdamW(params, lr=1e-2, weight_decay=0.1, state_dtype=state_dtype,
                      **({"fused": True} if fused else {"foreach": False}))
    if state_dtype == "int8":
        assert "exp_avg_absmax" in saved["state_dict"]["state"][0]  # the fixture is format 1
        with pytest.warns(UserWarning, match="4 int8 moments were saved in the older dynamic-tree format"):
            optimizer.load_state_dict(saved["state_dict"])
    else:
        optimizer.load_state_dict(saved["state_dict"])
    for index, param in enumerate(params):
        state = optimizer.state[param]
        assert state["exp_avg"].dtype == (torch.bfloat16 if state_dtype == "bfloat16" else torch.int8)
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            decoded = load_moments([state], key, [param], signed=signed)[0]
            old = saved["decoded"][key][index]
            if state_dtype == "bfloat16":
                assert torch.equal(decoded, old), (key, index)
                continue
            assert key + "_absmax" not in state and state[key + "_blockmax"].dtype == torch.float32
            expected = dequantize_blockwise(*quantize_blockwise(old, signed), signed)  # the nearest format-2 code
            assert torch.equal(decoded, expected), (key, index)
            scale = state[key + "_blockmax"].repeat_interleave(BLOCK_SIZE)[:old.numel()].view(old.shape)
            assert bool(((decoded - old).abs() <= old.abs() / 16 + 2.0 ** -(18 if signed else 34) * scale).all())
            assert bool((decoded != 0).any())
    for param in params:
        param.grad = torch.ones_like(param)
    optimizer.step()
    assert all(torch.isfinite(p).all() and not torch.equal(p, q) for p, q in zip(params, saved["params"]))
    assert float(optimizer.state[params[0]]["step"]) == 4
