"""The fast low-precision state paths (int32 in-place hash, binary int8 codes by bit arithmetic) against NumPy
references, bit for bit.

The references are the definitions, computed another way: the dither is ``mix((_mix32(seed) + i * WEYL) mod 2**32)
>> 8`` over ``2**24`` computed in uint64 (``mix``: xor-shift 16, multiply, xor-shift 15); the int8 code values are
enumerated from the layout of binade groups, a value's code is its position among them (``np.searchsorted`` in
float64), one up when the noise ``floor(dither * 2**23)``, cut to the bits the group drops, reaches the distance to
the next code, and decoding looks the value up; bf16 stochastic rounding adds ``floor(dither * 2**16)`` to the
float32 bits.
Stored moments must not change when the implementation gets faster: checkpoints and the determinism tests depend
on it.
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
    int8_dither,
    code_values,
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


def _hash_reference(numel: int, seed: int) -> np.ndarray:
    mask = np.uint64(0xFFFFFFFF)
    start = _mix32_reference(np.array([seed & 0xFFFFFFFF], dtype=np.uint64))
    mixed = (np.arange(numel, dtype=np.uint64) * np.uint64(0x9E3779B9) + start) & mask
    mixed = mixed ^ (mixed >> np.uint64(16))
    mixed = (mixed * np.uint64(0x21F0AAAD)) & mask
    return mixed ^ (mixed >> np.uint64(15))


def _dither_reference(numel: int, seed: int) -> np.ndarray:
    return (_hash_reference(numel, seed) >> np.uint64(8)).astype(np.float32) / np.float32(1 << 24)


def _int8_dither_reference(numel: int, step: int, signed: bool) -> np.ndarray:
    """int8 moments share one hash per element: the signed moment its 16 high bits, unsigned ones the 16 low."""
    hashed = _hash_reference(numel, dither_seed(step, "int8 state"))
    half = (hashed >> np.uint64(16)) if signed else (hashed & np.uint64(0xFFFF))
    return half.astype(np.float32) / np.float32(1 << 16)


# The code's definition (docstring of lowp_state.code_values): binade groups from the top, (lowest exponent, steps
# per binade as bits); linear below the lowest group with its step; 1.0 last.
_LAYOUT = {True: ((-3, 4), (-9, 3), (-15, 2)), False: ((-4, 5), (-12, 3), (-26, 2))}


def _code_values_reference(signed: bool) -> np.ndarray:
    """The magnitudes of the codes 0, 1, 2, ... in order (float64), enumerated from the layout."""
    layout = _LAYOUT[signed]
    lowest, bits = layout[-1]
    values = [k * 2.0 ** (lowest - bits) for k in range(2**bits)]
    uppers = [0] + [group_lowest for group_lowest, _ in layout[:-1]]
    for (group_lowest, group_bits), upper in reversed(list(zip(layout, uppers))):
        for exponent in range(group_lowest, upper):
            values += [2.0**exponent * (1 + f / 2**group_bits) for f in range(2**group_bits)]
    return np.array([*values, 1.0])


def _quantize_reference(values: np.ndarray, signed: bool, dither: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Codes as positions in the enumerated code values: the one at or below the value, or the next when the noise
    reaches the dropped fraction (the value's position between the two, in units of 2**-dropped bits)."""
    flat = values.reshape(-1).astype(np.float32)
    n_blocks = -(-flat.size // BLOCK_SIZE)
    padded = np.zeros(n_blocks * BLOCK_SIZE, dtype=np.float32)
    padded[: flat.size] = flat
    blockmax = np.abs(padded.reshape(n_blocks, BLOCK_SIZE)).max(axis=1)
    reciprocal = np.float32(1) / np.maximum(blockmax, np.finfo(np.float32).tiny)
    normalized = (padded.reshape(n_blocks, BLOCK_SIZE) * reciprocal[:, None]).reshape(-1)[: flat.size]
    noise = np.full(flat.size, 1 << 22) if dither is None else np.floor(dither.astype(np.float64) * 2**23)
    magnitude = np.minimum(np.abs(normalized), np.float32(1))
    lowest = np.float32(2.0 ** _LAYOUT[signed][-1][0])
    low = magnitude < lowest
    # below the lowest group the value is rounded as value + 2**lowest in float32 (that sum rounds once)
    target = np.where(low, (magnitude + lowest).astype(np.float64) - np.float64(lowest), magnitude.astype(np.float64))
    bits = np.full(flat.size, _LAYOUT[signed][-1][1])
    for group_lowest, group_bits in reversed(_LAYOUT[signed][:-1]):
        bits = np.where(target >= 2.0**group_lowest, group_bits, bits)
    dropped = 23 - bits
    code_values = _code_values_reference(signed)
    index = np.searchsorted(code_values, target, side="right") - 1
    above = code_values[np.minimum(index + 1, code_values.size - 1)]
    gap = above - code_values[index]  # 0 only at 1.0, the largest code
    fraction = np.divide(target - code_values[index], gap, out=np.zeros_like(gap), where=gap > 0)
    up = np.floor(noise / 2.0 ** (23 - dropped)) >= np.round((1 - fraction) * 2.0**dropped)
    code = index + (up & (fraction > 0))
    if signed:
        return np.where(normalized < 0, -code, code).astype(np.int8).reshape(values.shape), blockmax
    return code.astype(np.uint8).view(np.int8).reshape(values.shape), blockmax


def _decode_reference(codes: np.ndarray, signed: bool) -> np.ndarray:
    code = np.abs(codes.astype(np.int64)) if signed else codes.view(np.uint8).astype(np.int64)
    value = _code_values_reference(signed)[code]
    return (np.where(codes < 0, -value, value) if signed else value).astype(np.float32)


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
    code = code_values(signed)
    values[5::23] = code[torch.randint(0, code.numel(), (values[5::23].numel(),), generator=generator)].abs()
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
def test_int8_rounding_equals_the_enumerated_code_reference(signed: bool, shape: tuple[int, ...]) -> None:
    for seed in _SEEDS[:2]:
        values = _moments(shape, signed, seed=seed + len(shape))
        dither = uniform_dither(shape, seed)
        for given in (dither, None):  # stochastic, and to nearest
            codes, blockmax = quantize_blockwise(values, signed, dither=given)
            expected_codes, expected_blockmax = _quantize_reference(
                values.numpy(), signed, None if given is None else dither.reshape(-1).numpy())
            np.testing.assert_array_equal(blockmax.numpy(), expected_blockmax)
            np.testing.assert_array_equal(codes.numpy(), expected_codes)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", _SHAPES)
def test_dequantize_equals_the_enumerated_code_reference(signed: bool, shape: tuple[int, ...]) -> None:
    codes, blockmax = quantize_blockwise(_moments(shape, signed, seed=4), signed, dither=uniform_dither(shape, 4))
    scale = np.repeat(blockmax.numpy(), BLOCK_SIZE)[: math.prod(shape)].reshape(shape)
    expected = _decode_reference(codes.numpy(), signed) * scale
    np.testing.assert_array_equal(dequantize_blockwise(codes, blockmax, signed).numpy(), expected)
    np.testing.assert_array_equal(dequantize_blockwise(codes, blockmax, signed, torch.float64).numpy(),
                                  expected.astype(np.float64))


@pytest.mark.parametrize("signed", [True, False])
def test_int8_dither_equals_the_halves_of_one_hash(signed: bool) -> None:
    for shape in _SHAPES:
        dither = int8_dither(shape, 12_345, signed)
        assert dither.shape == shape and dither.dtype == torch.float32
        np.testing.assert_array_equal(dither.reshape(-1).numpy(), _int8_dither_reference(math.prod(shape), 12_345, signed))
    first, second = int8_dither((200_000,), 3, True), int8_dither((200_000,), 3, False)
    assert abs(float(torch.corrcoef(torch.stack([first, second]))[0, 1])) < 0.01  # the two halves are independent
    assert abs(float(first.mean()) - 0.5) < 0.005 and abs(float(second.std()) - 12**-0.5) < 0.005


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
        if state_dtype == "bfloat16":
            dither = uniform_dither(shape, dither_seed(7, key))
            assert torch.equal(state[key].view(torch.int16), round_to_bfloat16(value, dither).view(torch.int16))
        else:
            dither = torch.from_numpy(_int8_dither_reference(math.prod(shape), 7, signed)).view(shape)
            codes, blockmax = quantize_blockwise(value, signed, dither=dither)
            assert torch.equal(state[key], codes) and torch.equal(state[key + "_blockmax"], blockmax)
