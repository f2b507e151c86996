"""The fast low-precision state paths (int32 in-place hash, bucketed code search) against NumPy references, bit for bit.

The references are the definitions: the dither is ``mix((_mix32(seed) + i * WEYL) mod 2**32) >> 8`` over
``2**24`` computed in uint64 (``mix``: xor-shift 16, multiply, xor-shift 15), int8 stochastic rounding uses ``np.searchsorted`` on the float32 code,
and bf16 stochastic rounding adds ``floor(dither * 2**16)`` to the float32 bits. Stored moments must
not change when the implementation gets faster: checkpoints and the determinism tests depend on it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from optimlab.optim import lowp_state
from optimlab.optim.lowp_state import (
    BLOCK_SIZE,
    dequantize_blockwise,
    dither_seed,
    dynamic_code,
    init_moment,
    quantize_blockwise,
    round_to_bfloat16,
    store_moments,
    uniform_dither,
)

_SHAPES = [(1,), (255,), (BLOCK_SIZE,), (BLOCK_SIZE + 1,), (7, 300), (3, 4, 5), (70_001,)]
_SEEDS = [0, 1, 0x7FFFFFFF, dither_seed(12_345, "exp_avg_sq")]


def _mix32_reference(x: np.ndarray) -> np.ndarray:
    mask = np.uint64(0xFFFFFFFF)
    for multiplier in (0x7FEB352D, 0x5BD1E995):
        x = x ^ (x >> np.uint64(16))
        x = (x * np.uint64(multiplier)) & mask
    return x ^ (x >> np.uint64(15))


def _dither_reference(numel: int, seed: int) -> np.ndarray:
    mask = np.uint64(0xFFFFFFFF)
    start = _mix32_reference(np.array([seed & 0xFFFFFFFF], dtype=np.uint64))
    mixed = (np.arange(numel, dtype=np.uint64) * np.uint64(0x9E3779B9) + start) & mask
    mixed = mixed ^ (mixed >> np.uint64(16))
    mixed = (mixed * np.uint64(0x21F0AAAD)) & mask
    mixed = mixed ^ (mixed >> np.uint64(15))
    return (mixed >> np.uint64(8)).astype(np.float32) / np.float32(1 << 24)


def _quantize_reference(values: np.ndarray, signed: bool, dither: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    code = dynamic_code(signed).numpy()
    flat = values.reshape(-1).astype(np.float32)
    n_blocks = -(-flat.size // BLOCK_SIZE)
    padded = np.zeros(n_blocks * BLOCK_SIZE, dtype=np.float32)
    padded[: flat.size] = flat
    absmax = np.abs(padded.reshape(n_blocks, BLOCK_SIZE)).max(axis=1)
    normalized = (padded.reshape(n_blocks, BLOCK_SIZE)
                  / np.maximum(absmax, np.finfo(np.float32).tiny)[:, None]).reshape(-1)[: flat.size]
    upper = np.clip(np.searchsorted(code, normalized, side="left"), 1, code.size - 1)
    lower = upper - 1
    position = (normalized - code[lower]) / (code[upper] - code[lower])
    index = np.where(dither < position, upper, lower)
    return (index - (127 if signed else 128)).astype(np.int8).reshape(values.shape), absmax


def _bfloat16_reference(values: np.ndarray, dither: np.ndarray) -> np.ndarray:
    bits = values.astype(np.float32).view(np.int32).astype(np.int64)
    noise = (dither.reshape(values.shape) * np.float32(65536.0)).astype(np.int64)
    return (((bits + noise) & ~0xFFFF) >> 16).astype(np.uint16)  # the bf16 bit pattern


def _moments(shape: tuple[int, ...], signed: bool, seed: int) -> torch.Tensor:
    """Values over 16 decades plus zeros, exact code entries and block maxima, as optimizer moments have."""
    generator = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    values = 10.0 ** torch.empty(numel).uniform_(-12, 4, generator=generator)
    values[::17] = 0.0
    values[5::23] = dynamic_code(signed)[torch.randint(0, 255, (values[5::23].numel(),), generator=generator)].abs()
    if signed:
        values = values * torch.where(torch.rand(numel, generator=generator) < 0.5, -1.0, 1.0)
    return values.view(shape)


@pytest.mark.parametrize("seed", _SEEDS)
def test_uniform_dither_equals_the_uint64_hash(seed: int) -> None:
    for shape in _SHAPES:
        dither = uniform_dither(shape, seed)
        assert dither.shape == shape and dither.dtype == torch.float32
        np.testing.assert_array_equal(dither.reshape(-1).numpy(), _dither_reference(math.prod(shape), seed))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", _SHAPES)
def test_int8_stochastic_rounding_equals_searchsorted_reference(signed: bool, shape: tuple[int, ...]) -> None:
    for seed in _SEEDS[:2]:
        values = _moments(shape, signed, seed=seed + len(shape))
        dither = uniform_dither(shape, seed)
        codes, absmax = quantize_blockwise(values, signed, dither=dither)
        expected_codes, expected_absmax = _quantize_reference(values.numpy(), signed, dither.reshape(-1).numpy())
        np.testing.assert_array_equal(absmax.numpy(), expected_absmax)
        np.testing.assert_array_equal(codes.numpy(), expected_codes)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", _SHAPES)
def test_dequantize_equals_table_lookup_reference(signed: bool, shape: tuple[int, ...]) -> None:
    codes, absmax = quantize_blockwise(_moments(shape, signed, seed=4), signed, dither=uniform_dither(shape, 4))
    scale = np.repeat(absmax.numpy(), BLOCK_SIZE)[: math.prod(shape)].reshape(shape)
    expected = dynamic_code(signed).numpy()[codes.numpy().astype(np.int64) + (127 if signed else 128)] * scale
    np.testing.assert_array_equal(dequantize_blockwise(codes, absmax, signed).numpy(), expected)
    np.testing.assert_array_equal(dequantize_blockwise(codes, absmax, signed, torch.float64).numpy(),
                                  expected.astype(np.float64))


@pytest.mark.parametrize("shape", _SHAPES)
def test_bfloat16_stochastic_rounding_equals_bit_reference(shape: tuple[int, ...]) -> None:
    values = _moments(shape, signed=True, seed=len(shape))
    dither = uniform_dither(shape, 99)
    rounded = round_to_bfloat16(values, dither)
    np.testing.assert_array_equal(rounded.view(torch.int16).numpy().view(np.uint16),
                                  _bfloat16_reference(values.numpy(), dither.numpy()))


@pytest.mark.parametrize("chunk", [2 * BLOCK_SIZE, lowp_state._STORE_CHUNK])
@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("signed", [True, False])
def test_store_moments_rounds_with_the_public_dither(
    state_dtype: str, signed: bool, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """store_moments takes shortcuts (hash bits straight to bf16 noise, whole blocks at a time); its
    result is the documented rule applied to the whole tensor at once."""
    monkeypatch.setattr(lowp_state, "_STORE_CHUNK", chunk)
    key = "exp_avg" if signed else "exp_avg_sq"
    for shape in [*_SHAPES, (2 * lowp_state._STORE_CHUNK + 1000,)]:
        value = _moments(shape, signed, seed=3)
        state: dict[str, torch.Tensor] = {}
        init_moment(state, key, value, state_dtype, signed=signed)
        store_moments([state], key, [value], signed=signed, steps=[7.0])
        dither = uniform_dither(shape, dither_seed(7, key))
        if state_dtype == "bfloat16":
            assert torch.equal(state[key].view(torch.int16), round_to_bfloat16(value, dither).view(torch.int16))
        else:
            codes, absmax = quantize_blockwise(value, signed, dither=dither)
            assert torch.equal(state[key], codes) and torch.equal(state[key + "_absmax"], absmax)
