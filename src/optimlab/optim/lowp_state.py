r"""Memory-light optimizer state: moments stored in bfloat16 or as 8-bit block-wise quantised codes.

An optimizer that supports ``state_dtype`` keeps its moment buffers (``exp_avg``, ``exp_avg_sq``, ...)
in one of three storages, chosen per param group:

* ``None`` (default): the parameter's own dtype, exactly like ``torch.optim``;
* ``"bfloat16"`` (or ``torch.bfloat16``): a bf16 copy, 2 bytes per value;
* ``"int8"``: block-wise quantisation (Dettmers et al., "8-bit Optimizers via Block-wise
  Quantization", ICLR 2022). The flattened moment is cut into blocks of :data:`BLOCK_SIZE` = 256
  values; each block keeps its maximum :math:`a_b = \max_{i \in b} |x_i|` (float32) and every value
  is stored as one byte, the code of :math:`x_i / a_b` in a fixed set :math:`Q \subset [-1, 1]`
  (:func:`code_values`):

  .. math:: \hat x_i = a_b\, Q(\mathrm{code}_i).

  So 1 byte per value plus 4 bytes per 256 values. Like the paper's *dynamic tree* code, ``Q`` spends
  more of its 256 values near the block maximum and still reaches many decades down, so that small
  second-moment values survive instead of collapsing to zero; unlike it, ``Q`` is binary: binades
  :math:`[2^{-k}, 2^{1-k})` in three groups, each binade split into :math:`2^5`, :math:`2^3` or
  :math:`2^2` equal steps (unsigned, second moments: down to :math:`2^{-26}`, 7.8 decades) or
  :math:`2^4`, :math:`2^3`, :math:`2^2` (signed, first moments, plus a sign: down to :math:`2^{-15}`),
  and linear below. A code is then a float32 pattern cut to its group's bits (:func:`_encode`), so
  coding and decoding are a few integer operations per value, with no table search or gather.
  First moments use the signed code, second moments (non-negative) the unsigned one.

  Format 2. Until December 2026 (format 1) the codes were indices into the dynamic tree code itself,
  whose search cost ~10 table lookups per value; a checkpoint in that format (its scales under
  ``<key>_absmax``) is migrated when loaded (:func:`restore_state_dtypes`).

Updates are always computed in the parameter's dtype: :func:`load_moments` returns working tensors
and :func:`store_moments` writes them back (a no-op for full-precision state, where the working
tensor *is* the state tensor). Storage is plain tensors in ``optimizer.state`` (``<key>`` holds the
codes, ``<key>_blockmax`` the block maxima), so ``state_dict``, ``deepcopy`` and ``torch.save`` work
as usual; :func:`restore_state_dtypes` undoes the float cast that ``Optimizer.load_state_dict``
applies to every state tensor.

Writing back rounds *stochastically*: to the upper neighbour with probability equal to the
fractional position between the two neighbours (for bf16 and int8 alike: the dropped low mantissa bits over their
range), else to the lower one. A moving average :math:`m \leftarrow \beta m + (1-\beta) g`
changes by a fraction :math:`1-\beta` per step (1 % for Lion's :math:`\beta_2 = 0.99`, 0.1 % for
Adam's :math:`\beta_2 = 0.999`), less than half a quantisation step, so round-to-nearest leaves
many entries stuck and the error builds up to about :math:`\tfrac{1}{1-\beta}` half-steps;
stochastic rounding is unbiased, so it does not. On the digits MLP round-to-nearest left int8 Lion
about 8 % above, and int8 AdamW about 5 % below, the final loss of float32 state; with stochastic
rounding both are within 1 % (``docs/modern_optimizers.md``). The random numbers are counter-based
noise of (step, moment name, global element index) (:func:`_hash_from`), so runs are deterministic and
every path (per-tensor, foreach, fused, native, param groups, a resumed checkpoint, FSDP2 shards)
rounds identically. int8 moments share one hash per (step, element): the first (signed) moment rounds with its
16 high bits, second moments with its 16 low bits (:func:`int8_dither`), one hash where two cost 15 % of the
native int8 step.

The fused path (``fused=True`` with a low-precision ``state_dtype``, :func:`fused_lowp_step`) does not
decode into working copies and store them back as separate passes over memory: the optimizer's
per-tensor rule is wrapped (:func:`lowp_rule`) between the decode and the stochastic-rounding store,
and ``torch.compile`` turns the whole wrapper into one compiled function per tensor (for bf16 a
single loop), the hash computed in the kernel from the element index and a per-step start passed
as data. It writes the same numbers as the
eager path, except where the compiled rule rounds an fp32 intermediate differently (one stored step,
on a small fraction of the values; ``tests/optim/test_lowp_fused.py`` bounds both). Adam and AdamW
(without amsgrad or the cautious mask) take a hand-written vectorised C++ kernel instead
(:mod:`optimlab.optim._lowp_native`: Inductor's CPU code does float/int bit casts one value at a time),
one call per step for all their tensors, which codes exactly as the eager path does.

Sharded parameters (FSDP2's DTensors, ``Shard(0)`` or ``Replicate`` on a 1-D mesh): each rank stores its
part of exactly what the unsharded optimizer stores. The noise of a local element uses its global index
(the shard's offset, :func:`_local_range`); int8 keeps the flat 256-value blocks of the whole tensor,
the codes sharded like the parameter and the block scales a replicated DTensor: a block split between
ranks gets the maximum of the ranks' partial maxima (one MAX all-reduce per moment and tensor, exact).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
import zlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from optimlab.optim._dtensor import is_dtensor, local
from optimlab.optim._lowp_native import NOISE_MULTIPLIER, WEYL

try:  # torch.distributed is optional (some builds lack it): then no parameter can be a DTensor
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - builds without torch.distributed
    DTensor = None  # type: ignore[assignment,misc]

__all__ = [
    "BLOCK_SIZE",
    "code_values",
    "quantize_blockwise",
    "dequantize_blockwise",
    "round_to_bfloat16",
    "uniform_dither",
    "int8_dither",
    "dither_seed",
    "resolve_state_dtype",
    "init_moment",
    "load_moments",
    "store_moments",
    "restore_state_dtypes",
    "lowp_rule",
    "fused_lowp_step",
]

BLOCK_SIZE = 256
_SCALE_SUFFIX = "_blockmax"  # int8 state: <key> holds the codes, <key>_blockmax the block maxima
_LEGACY_SCALE_SUFFIX = "_absmax"  # format 1 (dynamic tree codes): migrated when a checkpoint is loaded
_STORE_CHUNK = 1 << 18  # values per pass when storing; a multiple of BLOCK_SIZE


class _Group(NamedTuple):
    r"""Binades :math:`[2^{\mathrm{lowest}}, 2^{\mathrm{upper}})` of a code, each split into :math:`2^{\mathrm{bits}}`
    equal steps; the codes of the group start at ``first`` (the code of :math:`2^{\mathrm{lowest}}`), and a
    float32 pattern in the group, shifted right by ``23 - bits``, minus ``offset`` is its code."""

    lowest: int
    bits: int
    first: int
    offset: int


# The binade groups of the two codes, from the top: (lowest exponent, mantissa bits). Near the block maximum a
# code has more mantissa bits, further down fewer, over 8 (unsigned) or 5 (signed) decades, like the dynamic tree
# code of Dettmers et al. (2022) but in binary, so that rounding is float bit arithmetic.
_LAYOUTS = {True: ((-3, 4), (-9, 3), (-15, 2)), False: ((-4, 5), (-12, 3), (-26, 2))}
_NOISE_BITS = 23  # noise bits of a value (a float32 mantissa's): the group's dropped bits are their high ones


@functools.lru_cache(maxsize=None)
def _groups(signed: bool) -> tuple[tuple[_Group, ...], int]:
    """The groups of a code (top first) and the code of 1.0 (the largest). Below the lowest group the grid is
    linear, with the lowest group's step: codes ``0 .. 2**bits - 1``."""
    layout = _LAYOUTS[signed]
    uppers = [0] + [lowest for lowest, _ in layout[:-1]]
    groups = []
    first = 1 << layout[-1][1]
    for (lowest, bits), upper in reversed(list(zip(layout, uppers))):
        groups.append(_Group(lowest, bits, first, ((lowest + 127) << bits) - first))
        first += (upper - lowest) << bits
    return tuple(reversed(groups)), first


def code_values(signed: bool, device: torch.device | str = "cpu") -> Tensor:
    r"""Every value a code stands for, relative to its block's maximum (float32, sorted, distinct).

    Unsigned (second moments): 0, 32 steps in each binade of :math:`[2^{-4}, 1)`, 8 in each of
    :math:`[2^{-12}, 2^{-4})`, 4 in each of :math:`[2^{-26}, 2^{-12})`, then 4 linear steps of :math:`2^{-28}`
    below, and 1 (253 values). Signed (first moments): 0 and :math:`\pm` 16 steps per binade of
    :math:`[2^{-3}, 1)`, 8 in :math:`[2^{-9}, 2^{-3})`, 4 in :math:`[2^{-15}, 2^{-9})`, 4 linear steps of
    :math:`2^{-17}` below, and 1 (249 values). 1 is a code, so a block's maximum is stored without error.
    """
    top = _groups(signed)[1]
    codes = torch.arange(-top if signed else 0, top + 1, dtype=torch.int32)
    stored = codes.to(torch.int8) if signed else codes.to(torch.uint8).view(torch.int8)
    return _decode(stored, signed).to(device)


def quantize_blockwise(
    values: Tensor, signed: bool, block_size: int = BLOCK_SIZE, dither: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""Quantise ``values`` block-wise: returns ``(codes, blockmax)``.

    ``codes`` is an ``int8`` tensor of ``values``' shape, each byte the code of :math:`r_i = x_i / a_b`
    (:func:`code_values`); ``blockmax`` is a float32 tensor with one :math:`a_b = \max_{i\in b}|x_i|` per block
    of ``block_size`` consecutive values of the flattened tensor (the last block may be shorter).

    :math:`|r_i|` is rounded like a float cut to its group's mantissa bits: its float32 pattern plus noise in the
    bits the group drops (18 to 21), those bits then dropped (a carry moves to the next step); below the lowest
    group, :math:`|r_i|` plus the group's lowest value is rounded the same way and the lowest value taken off
    again, so the grid there is linear. Without ``dither`` the noise is half the dropped range: the nearest code
    (ties away from zero), an error of at most half a code step times :math:`a_b`. With ``dither`` (uniform
    [0, 1) numbers, one per value, e.g. :func:`int8_dither`) the noise is the high bits of
    :math:`\lfloor 2^{23} \cdot \mathrm{dither} \rfloor`: stochastic rounding, to the code above with
    probability equal to the position between the two codes around :math:`r_i`, so
    :math:`\mathbb{E}\,\hat x_i = x_i` up to float32 rounding, with an error below one step.
    """
    if block_size < 1:
        raise ValueError(f"Invalid block_size: {block_size} (accepted range: >= 1)")
    _check_sign(values, signed)
    flat = values.detach().reshape(-1).to(torch.float32)
    noise = None
    if dither is not None:
        if dither.numel() != flat.numel():
            raise ValueError(f"Invalid dither: {dither.numel()} values for {flat.numel()} to quantise")
        noise = (dither.reshape(-1).to(torch.float32) * float(1 << _NOISE_BITS)).to(torch.int32)
    codes, blockmax = _quantize_flat(flat, signed, block_size, noise)
    return codes.view(values.shape), blockmax


def _check_sign(values: Tensor, signed: bool) -> None:
    if not signed and bool((values < 0).any()):
        raise ValueError("quantize_blockwise(signed=False) needs non-negative values (a second moment)")


def _group_of_exponent(signed: bool, exponent: int) -> tuple[int, int]:
    """``(dropped bits, offset)`` of the group of a value whose float32 exponent field is ``exponent``; below the
    lowest group (the linear range) the lowest group's, the offset raised by the linear range's codes."""
    groups, _ = _groups(signed)
    for group in groups:
        if exponent >= group.lowest + 127:
            return 23 - group.bits, group.offset
    return 23 - groups[-1].bits, groups[-1].offset + (1 << groups[-1].bits)


@functools.lru_cache(maxsize=None)
def _code_tables_cpu(signed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(values, dropped, offset)``: the value of each of the 256 bytes (:func:`_decode`, indexed by the byte as
    uint8) and, per float32 exponent field (0-255), its group's dropped bits and offset (int32)."""
    values = _decode(torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.int8), signed)
    dropped, offset = zip(*[_group_of_exponent(signed, exponent) for exponent in range(256)])
    return values, torch.tensor(dropped, dtype=torch.int32), torch.tensor(offset, dtype=torch.int32)


_TABLES: dict[tuple[bool, torch.device], tuple[Tensor, Tensor, Tensor]] = {}


def _code_tables(signed: bool, device: torch.device | str) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_code_tables_cpu` on ``device``, copied once. A plain dict lookup, so that a compiled step (whose
    tables were made before tracing, :func:`fused_lowp_step`) reads them as inputs instead of rebuilding them."""
    key = (bool(signed), torch.device(device))
    tables = _TABLES.get(key)
    if tables is None:
        tables = _TABLES[key] = tuple(table.to(device) for table in _code_tables_cpu(bool(signed)))  # type: ignore[assignment]
    return tables


def _encode(normalized: Tensor, signed: bool, noise: Tensor) -> Tensor:
    """float32 ``normalized`` (values times their block's reciprocal maximum) -> int8 codes, rounded with ``noise``
    (int32 in [0, 2**23)).

    The value's group (its dropped bits and offset) is looked up by its float32 exponent field; below the lowest
    group the value plus that group's lowest value is coded; the noise bits the group drops are added to the
    float32 pattern, which is shifted down and offset. The native kernel's ``encode_one`` computes the same (the
    group by two comparisons), operation for operation."""
    _values, dropped_table, offset_table = _code_tables(signed, normalized.device)
    lowest = 2.0 ** _groups(signed)[0][-1].lowest
    magnitude = normalized.abs().clamp_(max=1.0)  # times the reciprocal of the maximum: can round above 1
    exponent = (magnitude.view(torch.int32) >> 23).view(-1)
    dropped = dropped_table.index_select(0, exponent).view(magnitude.shape)
    shifted = magnitude + (magnitude < lowest).to(torch.float32).mul_(lowest)  # exact: + 0 or + lowest
    rounded = shifted.view(torch.int32).add_(noise >> (_NOISE_BITS - dropped))
    code = rounded.bitwise_right_shift_(dropped).sub_(offset_table.index_select(0, exponent).view(magnitude.shape))
    if signed:
        return code.mul_(1 - 2 * (normalized < 0).to(torch.int32)).to(torch.int8)
    return code.to(torch.uint8).view(torch.int8)


def _decode(codes: Tensor, signed: bool) -> Tensor:
    """int8 codes -> their float32 values relative to the block maximum, by arithmetic (the definition; the
    native kernel's ``decode_one``, and the table of :func:`_code_tables` that the eager path looks values up
    in): the code plus its group's offset, shifted into a float32 pattern; a code of the linear range below the
    lowest group is read as a value of that group's first binade, whose lowest value is then subtracted."""
    groups, _ = _groups(signed)
    lowest = groups[-1]
    code = codes.to(torch.int32).abs_() if signed else codes.view(torch.uint8).to(torch.int32)
    low = code < lowest.first
    dropped = torch.full_like(code, 23 - lowest.bits)
    offset = torch.full_like(code, lowest.offset).add_(low.to(torch.int32) << lowest.bits)
    for group in groups[-2::-1]:
        above = code >= group.first
        dropped = torch.where(above, 23 - group.bits, dropped)
        offset = torch.where(above, group.offset, offset)
    value = (code + offset).bitwise_left_shift_(dropped).view(torch.float32)
    value = value - low.to(torch.float32).mul_(2.0**lowest.lowest)
    return torch.where(codes < 0, -value, value) if signed else value


def _lookup(codes: Tensor, signed: bool) -> Tensor:
    """The float32 values of int8 codes from the table of :func:`_code_tables` (what :func:`_decode` computes)."""
    values = _code_tables(signed, codes.device)[0]
    return values.index_select(0, codes.reshape(-1).view(torch.uint8).to(torch.int32)).view(codes.shape)


def _quantize_flat(flat: Tensor, signed: bool, block_size: int, noise: Tensor | None, lead: int = 0,
                   blockmax: Tensor | None = None) -> tuple[Tensor, Tensor]:
    # flat: 1-D float32; noise: None (round to nearest) or 1-D int32 in [0, 2**23), one per value
    # (no branch on the sizes: a compiled step keeps one graph whether or not numel fills the last block).
    # A shard of a larger tensor: `flat` starts `lead` values into its first block, and `blockmax` holds the
    # maxima of the whole blocks it touches (some of their values live on other ranks).
    numel = flat.numel()
    n_blocks = -(-(lead + numel) // block_size)
    padded = torch.nn.functional.pad(flat, (lead, n_blocks * block_size - numel - lead)).view(n_blocks, block_size)
    if blockmax is None:
        blockmax = padded.abs().amax(dim=1)
    reciprocal = 1.0 / blockmax.clamp(min=torch.finfo(torch.float32).tiny)
    normalized = (padded * reciprocal.unsqueeze(1)).view(-1)
    if noise is None:  # to nearest: half of every dropped range
        noise = torch.full((numel,), 1 << (_NOISE_BITS - 1), dtype=torch.int32, device=flat.device)
    codes = _encode(normalized[lead:lead + numel], signed, noise)
    return codes, blockmax


@functools.lru_cache(maxsize=None)
def _legacy_code_cpu(signed: bool) -> Tensor:
    # Format 1 (before the binary tapered codes): the sorted "dynamic tree" code of Dettmers (2016, 2022), float32. Decade
    # e (0 = the smallest) held 2**e values spaced linearly in (0.1, 1] * 10**(e - top); stored int8 = index into
    # it - 127 (signed) or - 128 (unsigned). Only read, to migrate a checkpoint (restore_state_dtypes).
    decades = 7 if signed else 8
    magnitudes = [
        10.0 ** (e - (decades - 1)) * (0.1 + 0.9 * j / 2**e) for e in range(decades) for j in range(1, 2**e + 1)
    ]
    values = [0.0, *magnitudes]
    if signed:
        values += [-m for m in magnitudes]
    return torch.tensor(sorted(values), dtype=torch.float64).to(torch.float32)


def _migrate_legacy_int8(codes: Tensor, absmax: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """A format-1 moment (dynamic tree codes and their block absmax) -> format 2 (binary codes, block maxima),
    re-rounded to the nearest code: the values the old code decoded, each within half a new code step."""
    index = codes.reshape(-1).to(torch.int64) + (127 if signed else 128)
    scales = absmax.to(torch.float32).repeat_interleave(BLOCK_SIZE)[:index.numel()]
    decoded = _legacy_code_cpu(signed).to(codes.device)[index] * scales
    return quantize_blockwise(decoded.view(codes.shape), signed)


def round_to_bfloat16(values: Tensor, dither: Tensor | None = None) -> Tensor:
    """``values`` as bfloat16: round-to-nearest, or stochastic rounding with ``dither`` (uniform [0, 1),
    one per value): the float32 bit pattern gets ``floor(dither * 2**16)`` added to its 16 low bits,
    which are then dropped, so the magnitude rounds up with probability equal to the dropped fraction."""
    if dither is None:
        return values.to(torch.bfloat16)
    if dither.numel() != values.numel():
        raise ValueError(f"Invalid dither: {dither.numel()} values for {values.numel()} to round")
    return _round_to_bfloat16_bits(values, (dither.reshape(values.shape).to(torch.float32) * 65536.0).to(torch.int32))


def _round_to_bfloat16_bits(values: Tensor, noise: Tensor) -> Tensor:
    # noise: int32 in [0, 2**16) added to the float32 pattern before its 16 low bits are cleared
    bits = values.detach().to(torch.float32, copy=True).contiguous().view(torch.int32)
    bits += noise.view(bits.shape)
    bits.bitwise_and_(-65536)  # clear the 16 low bits (two's complement ~0xFFFF)
    return bits.view(torch.float32).to(torch.bfloat16)


_MASK32 = 0xFFFFFFFF
_HASH_MULTIPLIERS = (0x7FEB352D, 0x5BD1E995)
_WEYL_INT32 = WEYL - (1 << 32)  # WEYL as the int32 value with the same bits
_NOISE_MULTIPLIER = NOISE_MULTIPLIER


def _mix32(x: int) -> int:
    # the integer hash of one value < 2**32 (once per step and moment: the start of its noise sequence)
    for multiplier in _HASH_MULTIPLIERS:
        x ^= x >> 16
        x = (x * multiplier) & _MASK32
    return x ^ (x >> 15)


def _hash_start(seed: int, begin: int) -> int:
    """``(_mix32(seed) + begin * WEYL) mod 2**32`` as a signed int32 value: element ``begin``'s noise bits."""
    start = (_mix32(seed & _MASK32) + begin * WEYL) & _MASK32
    return start - (1 << 32) if start >= 1 << 31 else start


def _hash_from(start: int | Tensor, count: int, device: torch.device | str) -> Tensor:
    r"""``mix((start + i * WEYL) mod 2**32)`` for ``0 <= i < count``, as int32 holding the 32 noise bits.

    Counter-based noise: element :math:`i` of a moment gets :math:`\mathrm{mix}(s + iW \bmod 2^{32})`,
    with :math:`s` a well-mixed hash of (step, moment) (:func:`_hash_start`), :math:`W` the odd golden-ratio
    constant (a Weyl sequence over the elements) and :math:`\mathrm{mix}(h)`: :math:`h \mathrel{\oplus}=
    h \gg 16`, :math:`h \mathrel{*}= M`, :math:`h \mathrel{\oplus}= h \gg 15` (one multiply; the
    full :func:`_mix32` per element, two multiplies, made the store compute-bound). The Weyl input alone is
    uniform per element over steps but makes two moments' noise in one step shifted copies of each other
    (correlation 0.47 over the elements); the mixer removes that (``test_dither_is_deterministic_...``).

    ``start`` is a signed int32 value (:func:`_hash_start`), a Python int or a 0-dim tensor (the compiled
    step passes it as data, so a new step is no recompile). int32 arithmetic wraps modulo 2**32, so products
    and sums equal the unsigned computation's bits; the logical right shift is an arithmetic shift with the
    sign copies masked off. In place, and traceable by ``torch.compile``.
    """
    hashed = torch.arange(count, dtype=torch.int32, device=device).mul_(_WEYL_INT32)
    hashed.add_(start.to(torch.int32) if isinstance(start, Tensor) else start)
    shifted = torch.empty_like(hashed)  # one scratch buffer for the shifts (eager: no temporaries)
    torch.bitwise_right_shift(hashed, 16, out=shifted).bitwise_and_(0xFFFF)
    hashed.bitwise_xor_(shifted).mul_(_NOISE_MULTIPLIER)
    torch.bitwise_right_shift(hashed, 15, out=shifted).bitwise_and_(0x1FFFF)
    return hashed.bitwise_xor_(shifted)


def _hash_bits(begin: int, end: int, seed: int, device: torch.device | str) -> Tensor:
    """The noise bits of elements ``begin <= i < end`` for ``seed`` (:func:`_hash_from` from :func:`_hash_start`)."""
    return _hash_from(_hash_start(seed, begin), end - begin, device)


def _bits_to_uniform(bits: Tensor) -> Tensor:
    # the 24 high hash bits over 2**24: exact float32 numbers in [0, 1)
    return (bits >> 8).bitwise_and_(0xFFFFFF).to(torch.float32).mul_(1.0 / (1 << 24))


_INT8_NOISE_KEY = "int8 state"  # the dither_seed key of int8 moments: one noise sequence for all of them


def dither_seed(step: int, key: str) -> int:
    """The seed of the rounding noise for moment ``key`` at optimizer step ``step`` (a 31-bit integer)."""
    return (int(step) * 0x2545F491 + zlib.crc32(key.encode())) & 0x7FFFFFFF


def int8_dither(shape: torch.Size | tuple[int, ...], step: int, signed: bool, device: torch.device | str = "cpu"
                ) -> Tensor:
    """The dither with which int8 moments are stored at optimizer step ``step`` (uniform [0, 1) float32 numbers of
    ``shape``, multiples of 2**-16): ``quantize_blockwise(value, signed, dither=int8_dither(value.shape, step,
    signed))`` is what :func:`store_moments` stores. One hash per element and step serves all of a parameter's
    moments: its 16 high bits the signed (first) moment, its 16 low bits the unsigned ones."""
    start = _hash_start(dither_seed(step, _INT8_NOISE_KEY), 0)
    return _int8_noise(start, math.prod(shape), device, signed).to(torch.float32).mul_(2.0**-_NOISE_BITS).view(shape)


def uniform_dither(shape: torch.Size | tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> Tensor:
    """Deterministic uniform [0, 1) float32 numbers of ``shape``: a hash of (``seed``, element index),
    so the same seed always gives the same numbers on any path and after a checkpoint resume."""
    return _bits_to_uniform(_hash_bits(0, math.prod(shape), seed, device)).view(shape)


def dequantize_blockwise(
    codes: Tensor, blockmax: Tensor, signed: bool, dtype: torch.dtype = torch.float32, block_size: int = BLOCK_SIZE
) -> Tensor:
    r""":math:`\hat x_i = a_b\, Q(\mathrm{code}_i)`: the inverse of :func:`quantize_blockwise`, in ``dtype``."""
    numel = codes.numel()
    n_blocks = blockmax.numel()
    if not (n_blocks - 1) * block_size < numel <= n_blocks * block_size:
        raise ValueError(
            f"Invalid blockmax: {n_blocks} blocks of {block_size} do not match {numel} codes"
        )
    return _dequantize_range(codes.reshape(-1), blockmax, block_size, 0, signed).view(codes.shape).to(dtype)


def _dequantize_range(codes: Tensor, blockmax: Tensor, block_size: int, lead: int, signed: bool) -> Tensor:
    # 1-D codes starting `lead` values into the first of the blocks whose maxima `blockmax` holds -> float32 values
    numel, n_blocks = codes.numel(), blockmax.numel()
    # padded up to whole blocks without a branch on the sizes (one compiled graph for any numel)
    values = torch.nn.functional.pad(_lookup(codes, signed), (lead, n_blocks * block_size - numel - lead))
    decoded = values.view(n_blocks, block_size).mul_(blockmax.to(torch.float32).unsqueeze(1))
    return decoded.reshape(-1)[lead:lead + numel]


def resolve_state_dtype(state_dtype: str | torch.dtype | None) -> str | None:
    """Normalise a ``state_dtype`` argument to ``None``, ``"bfloat16"`` or ``"int8"``.

    Accepts ``None``/``"float32"``/``torch.float32`` (state in the parameter's dtype),
    ``"bfloat16"``/``"bf16"``/``torch.bfloat16`` and ``"int8"``/``torch.int8``; anything else raises
    ``ValueError`` naming the accepted values.
    """
    aliases: dict[Any, str | None] = {
        None: None, "float32": None, "fp32": None, torch.float32: None,
        "bfloat16": "bfloat16", "bf16": "bfloat16", torch.bfloat16: "bfloat16",
        "int8": "int8", torch.int8: "int8",
    }
    try:
        return aliases[state_dtype]
    except (KeyError, TypeError):
        raise ValueError(
            f"Invalid state_dtype: {state_dtype!r} (accepted: None or 'float32' for the parameter's dtype, "
            "'bfloat16', 'int8')"
        ) from None


def init_moment(state: dict[str, Any], key: str, param: Tensor, state_dtype: str | None, *, signed: bool) -> None:
    """Create a zero moment ``state[key]`` for ``param`` in the storage ``state_dtype`` (already resolved)."""
    if state_dtype is None:
        state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
    elif state_dtype == "bfloat16":
        state[key] = torch.zeros_like(param, dtype=torch.bfloat16, memory_format=torch.preserve_format)
    elif is_dtensor(param):  # the codes sharded like the parameter, the block scales replicated (see _local_range)
        zero_code = int(quantize_blockwise(torch.zeros(1), signed)[0][0])
        state[key] = torch.zeros_like(param, dtype=torch.int8).fill_(zero_code)
        scales = torch.zeros(-(-param.numel() // BLOCK_SIZE), dtype=torch.float32, device=param.to_local().device)
        state[key + _SCALE_SUFFIX] = DTensor.from_local(scales, param.device_mesh, [Replicate()], run_check=False)
    else:
        codes, blockmax = quantize_blockwise(torch.zeros_like(param), signed)
        state[key], state[key + _SCALE_SUFFIX] = codes, blockmax


def _local_range(tensor: Tensor) -> tuple[Tensor, int]:
    """``(local values, global flat index of the first)``: ``(tensor, 0)`` for a plain tensor; for a DTensor
    (an FSDP2 parameter or its state) its local shard and where that shard starts in the whole tensor.

    Low-precision state is keyed by the global element index (the rounding noise) and, for int8, by global
    blocks of :data:`BLOCK_SIZE` values, so that a sharded run stores what the unsharded run stores. That needs
    the local shard to be one contiguous range of the flattened tensor: ``Shard(0)`` (FSDP2's layout, rows split
    as ``torch.chunk`` splits them) or ``Replicate`` on a 1-D mesh; other layouts raise ``NotImplementedError``.
    """
    if not is_dtensor(tensor):
        return tensor, 0
    mesh, placements = tensor.device_mesh, tensor.placements
    placement = placements[0]
    if mesh.ndim != 1 or not (placement.is_replicate() or (type(placement) is Shard and placement.dim == 0)):
        raise NotImplementedError(
            f"low-precision optimizer state on a DTensor laid out as {placements} on a {mesh.ndim}-D mesh: only "
            "Shard(0) (FSDP2's fully_shard) or Replicate on a 1-D mesh are supported; pass state_dtype=None")
    if placement.is_replicate() or tensor.dim() == 0:
        return tensor.to_local(), 0
    rows = [len(chunk) for chunk in torch.empty(tensor.shape[0], device="meta").chunk(mesh.size())]
    row_numel = math.prod(tensor.shape[1:])
    return tensor.to_local(), sum(rows[:mesh.get_local_rank()]) * row_numel


def _load_sharded_int8(codes: Tensor, blockmax: Tensor, signed: bool, dtype: torch.dtype) -> Tensor:
    # a DTensor of codes and its replicated scales -> the decoded DTensor (this rank's shard decoded locally)
    local, offset = _local_range(codes)
    lead, first = offset % BLOCK_SIZE, offset // BLOCK_SIZE
    n_blocks = -(-(lead + local.numel()) // BLOCK_SIZE)
    decoded = _dequantize_range(local.reshape(-1), blockmax.to_local()[first:first + n_blocks], BLOCK_SIZE, lead, signed)
    return DTensor.from_local(decoded.view(local.shape).to(dtype), codes.device_mesh, codes.placements,
                              shape=codes.shape, stride=codes.stride(), run_check=False)


def _store_sharded(state: dict[str, Any], key: str, value: Tensor, signed: bool, seed: int) -> None:
    """Store a sharded moment: this rank's values rounded with the noise of their global indices; for int8 each
    block's scale is the maximum over the whole block, all-reduced (MAX, exact) over the ranks sharing it."""
    local, offset = _local_range(value)
    flat = local.detach().reshape(-1).to(torch.float32)
    start = _hash_start(seed, offset)
    if key + _SCALE_SUFFIX not in state:
        state[key].to_local().copy_(_rounded_bfloat16(flat, start).view(local.shape))
        return
    _check_sign(local, signed)
    scales = state[key + _SCALE_SUFFIX].to_local()
    lead, first = offset % BLOCK_SIZE, offset // BLOCK_SIZE
    n_blocks = -(-(lead + flat.numel()) // BLOCK_SIZE) if flat.numel() else 0
    maxima = torch.zeros_like(scales)
    if n_blocks:
        padded = torch.nn.functional.pad(flat.abs(), (lead, n_blocks * BLOCK_SIZE - flat.numel() - lead))
        maxima[first:first + n_blocks] = padded.view(n_blocks, BLOCK_SIZE).amax(dim=1)
    if not value.placements[0].is_replicate():
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=value.device_mesh.get_group())
    if n_blocks:
        noise = _int8_noise(start, flat.numel(), flat.device, signed)
        codes, _ = _quantize_flat(flat, signed, BLOCK_SIZE, noise, lead, maxima[first:first + n_blocks])
        state[key].to_local().copy_(codes.view(local.shape))
    scales.copy_(maxima)


def load_moments(states: Sequence[dict[str, Any]], key: str, params: Sequence[Tensor], *, signed: bool) -> list[Tensor]:
    """The moment ``key`` of each state as a tensor in its parameter's dtype.

    Full-precision state is returned as is (updates in place act on the state itself); bf16 and
    int8 state are decoded into fresh working tensors that :func:`store_moments` writes back.
    """
    loaded = []
    for state, param in zip(states, params):
        stored = state[key]
        if key + _SCALE_SUFFIX in state and is_dtensor(stored):
            loaded.append(_load_sharded_int8(stored, state[key + _SCALE_SUFFIX], signed, param.dtype))
        elif key + _SCALE_SUFFIX in state:
            loaded.append(dequantize_blockwise(stored, state[key + _SCALE_SUFFIX], signed, param.dtype))
        elif stored.dtype != param.dtype:
            loaded.append(stored.to(param.dtype))
        else:
            loaded.append(stored)
    return loaded


def _rounded_bfloat16(flat: Tensor, start: int | Tensor) -> Tensor:
    """1-D ``flat`` rounded stochastically to bf16 with the noise of hash inputs ``start + i`` (the 16
    high hash bits are ``floor(uniform * 2**16)`` of :func:`uniform_dither`)."""
    noise = _hash_from(start, flat.numel(), flat.device).bitwise_right_shift_(16).bitwise_and_(0xFFFF)
    return _round_to_bfloat16_bits(flat, noise)


def _int8_noise(start: int | Tensor, count: int, device: torch.device | str, signed: bool) -> Tensor:
    """The 23-bit noise of int8 moments at hash inputs ``start + i``: one hash per element serves a parameter's
    moments, the 16 high bits the first (signed) moment's and the 16 low bits the second moments', each as the
    high bits of the 23 (the native kernel computes one hash for both)."""
    hashed = _hash_from(start, count, device)
    half = hashed.bitwise_right_shift_(16).bitwise_and_(0xFFFF) if signed else hashed.bitwise_and_(0xFFFF)
    return half.bitwise_left_shift_(_NOISE_BITS - 16)


def _noise_seed(step: int, key: str, int8: bool) -> int:
    """The seed of a moment's rounding noise at ``step``: per moment for bf16, shared by the moments for int8."""
    return dither_seed(step, _INT8_NOISE_KEY if int8 else key)


def _rounded_int8(flat: Tensor, start: int | Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """1-D ``flat`` (whole blocks from its first element) quantised with stochastic rounding, the
    noise from hash inputs ``start + i``: ``(codes, blockmax)``."""
    noise = _int8_noise(start, flat.numel(), flat.device, signed)
    return _quantize_flat(flat.to(torch.float32), signed, BLOCK_SIZE, noise)


def store_moments(
    states: Sequence[dict[str, Any]], key: str, values: Sequence[Tensor], *, signed: bool, steps: Sequence[float]
) -> None:
    """Write working tensors from :func:`load_moments` back into their storage, rounding bf16 and
    int8 state stochastically with the noise of :func:`dither_seed` (``steps``: each state's step count)."""
    for state, value, step in zip(states, values, steps):
        stored = state[key]
        if value is stored:
            continue
        seed = _noise_seed(int(step), key, key + _SCALE_SUFFIX in state)
        if is_dtensor(value):
            _store_sharded(state, key, value, signed, seed)
            continue
        flat = value.detach().reshape(-1)
        numel = flat.numel()
        # in chunks of whole blocks: the same numbers, but temporaries that stay small
        chunks = [(begin, min(numel, begin + _STORE_CHUNK)) for begin in range(0, numel, _STORE_CHUNK)]
        if key + _SCALE_SUFFIX in state:
            _check_sign(value, signed)
            codes = torch.empty(numel, dtype=torch.int8, device=value.device)
            blockmax = torch.empty(-(-numel // BLOCK_SIZE), dtype=torch.float32, device=value.device)
            for begin, end in chunks:
                codes[begin:end], blockmax[begin // BLOCK_SIZE:-(-end // BLOCK_SIZE)] = _rounded_int8(
                    flat[begin:end], _hash_start(seed, begin), signed)
            state[key], state[key + _SCALE_SUFFIX] = codes.view(value.shape), blockmax
        else:
            rounded = torch.empty(numel, dtype=torch.bfloat16, device=value.device)
            for begin, end in chunks:
                rounded[begin:end] = _rounded_bfloat16(flat[begin:end], _hash_start(seed, begin))
            stored.copy_(rounded.view(value.shape))


def _start_name(key: str) -> str:
    # the scalar argument of a compiled low-precision step that carries moment `key`'s hash start
    return f"hash_start_{key}"


@functools.lru_cache(maxsize=None)
def lowp_rule(rule: Callable[..., None], moments: tuple[tuple[str, bool], ...], storage: str) -> Callable[..., None]:
    r"""``rule`` (a per-tensor update such as ``_adam_tensor``) wrapped to act on low-precision moments.

    The wrapper ``update(param, grad, *stored, hash_start_<key>=..., **arguments)`` takes each moment
    of ``moments`` (``(key, signed)`` pairs, in ``rule``'s argument order) as it is stored: one bf16
    tensor, or for ``storage="int8"`` the codes and the block scales. It decodes them into working
    tensors of ``param``'s dtype (:func:`load_moments`), applies ``rule`` unchanged, and writes them
    back with the stochastic rounding of :func:`store_moments`: the dither of element :math:`i` is
    :math:`\mathrm{mix}_{32}(s + i)` with :math:`s = \mathrm{mix}_{32}(\mathrm{seed})` given as
    ``hash_start_<key>`` (:func:`_hash_start`). Every operation is traceable, so
    :func:`fused_lowp_step` compiles the whole wrapper: for bf16 one pass over memory (load, rule,
    hash, round, store), for int8 a few (decode and rule, block maxima, rounding), where the eager
    path makes one pass per operation. Results
    equal the eager path's bit for bit, except where the compiled rule's float rounding differs in
    the last place (fused multiply-add) and moves a value across a rounding threshold. Cached: one
    wrapper (one compiled step) per ``(rule, moments, storage)``.
    """
    if storage not in ("bfloat16", "int8"):
        raise ValueError(f"Invalid storage: {storage!r} (accepted: 'bfloat16', 'int8')")
    per_moment = 2 if storage == "int8" else 1

    def update(param: Tensor, grad: Tensor, *stored: Tensor, **arguments: Any) -> None:
        parts = [stored[i * per_moment:(i + 1) * per_moment] for i in range(len(moments))]
        starts = [arguments.pop(_start_name(key)) for key, _ in moments]
        if storage == "int8":
            working = [dequantize_blockwise(codes, blockmax, signed, param.dtype)
                       for (codes, blockmax), (_, signed) in zip(parts, moments)]
        else:
            working = [bf16.to(param.dtype) for (bf16,) in parts]
        rule(param, grad, *working, **arguments)
        for part, value, start, (_, signed) in zip(parts, working, starts, moments):
            flat = value.reshape(-1)
            if storage == "int8":
                codes, blockmax = _rounded_int8(flat, start, signed)
                part[0].copy_(codes.view(part[0].shape))
                part[1].copy_(blockmax)
            else:
                part[0].copy_(_rounded_bfloat16(flat, start).view(part[0].shape))

    update.__qualname__ = update.__name__ = f"{getattr(rule, '__qualname__', 'rule')}_{storage}_state"
    return update


# float32 parameters only: the compiled path is tested there (tests/optim/test_lowp_fused.py); others run the wrapper
# uncompiled (the same numbers as the eager path)
_COMPILED_DTYPES = (torch.float32,)
# One tensor per compiled call: the graph of a low-precision step is large (decode, rule, block
# reductions and table lookups per moment) and Inductor's compile time grows with the tensors per call:
# measured on 2 loaded cores, int8 AdamW compiled in ~70 s for one tensor per call and ~690 s for 8.
_CHUNK_SIZE = 1


def fused_lowp_step(
    rule: Callable[..., None],
    static: Mapping[str, Hashable],
    moments: Sequence[tuple[str, bool]],
    storage: str,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict[str, Any]],
    steps: Sequence[float],
    scalars: Callable[[float], Mapping[str, float]],
    native: Callable[..., None] | None = None,
) -> None:
    """One fused step of ``rule`` on moments stored as ``storage`` (``"bfloat16"`` or ``"int8"``).

    Every (param, grad, stored moments) goes to :func:`lowp_rule`'s wrapper, compiled by
    :func:`optimlab.optim._fused.fused_step` (symbolic sizes, tensors flattened to 1-D, one tensor
    per call, see ``_CHUNK_SIZE``) with the constants ``static``; ``scalars(step)`` gives the
    rule's step-dependent float arguments, passed as 0-dim float64 tensors together with each
    moment's hash start, so neither a schedule nor a new step recompiles. Tensors are split by step
    count (a parameter that skipped steps), then by device and dtype. Tensors that the compiled
    kernel would not reproduce exactly, or that it is not tested on, take the same wrapper
    uncompiled: dtypes other than float32 (for bf16/fp16 the compiler skips the eager rounding after
    every operation), non-contiguous
    ones, single values and, for int8, single blocks (a one-element scale would specialise the
    graph). ``steps`` are the already incremented step counts.

    ``native``: a hand-written kernel of the same rule and rounding
    (:func:`optimlab.optim._lowp_native.adam_lowp_kernel`), called once per step count as
    ``native(params, grads, *stored, starts, **scalars(step), **static)`` (parallel lists) on the tensors that
    it takes (contiguous float32 CPU parameters with contiguous moments) instead of the compiled wrapper.

    Sharded (DTensor, FSDP2) parameters: the native bf16 kernel updates the local shards with the noise of
    their global indices; otherwise (int8, or no native kernel) the rule runs uncompiled on the DTensors and the moments are stored by
    :func:`store_moments` (int8 block scales all-reduced), so that the result equals the unsharded run's.
    """
    from optimlab.optim._fused import fused_step, split_by_value

    update = lowp_rule(rule, tuple(moments), storage)
    step_fn = fused_step(update, static, _CHUNK_SIZE)
    suffixes = ("", _SCALE_SUFFIX) if storage == "int8" else ("",)
    tensor_lists = [list(params), list(grads)] + [
        [state[key + suffix] for state in states] for key, _ in moments for suffix in suffixes]
    smallest = BLOCK_SIZE + 1 if storage == "int8" else 2
    for step, lists in split_by_value([*tensor_lists, list(range(len(params)))], steps):  # type: ignore[list-item]
        positions: list[int] = lists.pop()  # type: ignore[assignment]
        step_scalars = dict(scalars(step))
        seeds = [_noise_seed(int(step), key, storage == "int8") for key, _ in moments]
        arguments = dict(step_scalars, **{_start_name(key): _hash_start(seed, 0) for (key, _), seed in zip(moments, seeds)})
        compiled: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        natively: list[tuple[list[Tensor], int]] = []
        for index, param in enumerate(lists[0]):
            row = [column[index] for column in lists]
            # int8 blocks of a shard may continue on another rank: sharded int8 goes to _store_sharded
            if native is not None and not (storage == "int8" and is_dtensor(param)) and _native_takes(
                    [local(t) for t in row]):
                natively.append(([local(t) for t in row], _local_range(param)[1]))
            elif is_dtensor(param):  # sharded: keyed by global indices and blocks (communication for int8)
                state = states[positions[index]]
                working = _load_all(state, moments, param)
                rule(param, row[1], *working, **step_scalars, **static)
                for (key, signed), value, seed in zip(moments, working, seeds):
                    _store_sharded(state, key, value, signed, seed)
            elif param.dtype in _COMPILED_DTYPES and param.numel() >= smallest:
                compiled.setdefault((param.device, param.dtype), []).append(index)
            else:
                update(*row, **arguments, **static)
        if natively:
            starts = [[_hash_start(seed, offset) for _, offset in natively] for seed in seeds]
            native(*[list(column) for column in zip(*[row for row, _ in natively])], starts, **step_scalars, **static)
        # one call per device and dtype: FusedStep then needs no regrouping (torch's foreach grouping
        # would reject int8 codes and float32 scales next to float64 parameters)
        for (device, _dtype), indices in compiled.items():
            if storage == "int8":  # made before tracing: the compiled step reads them as inputs
                for signed in (True, False):
                    _code_tables(signed, device)
            with _int8_inductor_options() if storage == "int8" else contextlib.nullcontext():
                step_fn([[column[i] for i in indices] for column in lists], arguments)


def _load_all(state: dict[str, Any], moments: Sequence[tuple[str, bool]], param: Tensor) -> list[Tensor]:
    """Every moment of ``moments`` of one parameter's ``state``, decoded (:func:`load_moments`)."""
    return [load_moments([state], key, [param], signed=signed)[0] for key, signed in moments]


def _native_takes(tensors: Sequence[Tensor]) -> bool:
    # the native kernel's contract: a float32 CPU parameter, every tensor contiguous and on the CPU
    return tensors[0].dtype == torch.float32 and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def _int8_inductor_options() -> contextlib.AbstractContextManager[Any]:
    # Inductor inlines a pointwise value into every reader below 4 readers; the int8 coding reads the
    # normalised value, its group and its decoded moments several times, so inlined they were recomputed
    # per reader: materialising every value read more than once makes the compiled int8 Lion step 2.3x
    # faster (22.3 -> 9.6 ms for 2M values, one thread; with the format-1 code search: 2.5x). Read when
    # compiling; no effect afterwards.
    from optimlab import _compat

    return _compat.inductor_options(realize_reads_threshold=1)


def restore_state_dtypes(optimizer: torch.optim.Optimizer, moments: Sequence[tuple[str, bool]]) -> None:
    """Cast the ``moments`` (``(key, signed)`` pairs) of every group with a ``state_dtype`` back to their storage
    dtype, and migrate int8 moments of an older format.

    Call it from ``_after_load_state_dict`` (:class:`optimlab.optim._base.OptimlabOptimizer`, which runs it right
    after loading, before user hooks): ``torch.optim.Optimizer.load_state_dict`` casts every non-``step`` state
    tensor to the parameter's dtype. The values round-trip exactly (bf16 values and int8 codes are representable
    in float32), so casting back restores the state bit for bit.

    An int8 moment saved with ``<key>_absmax`` is format 1 (before the binary codes: indices into the dynamic tree
    code of Dettmers et al.): it is decoded with that code and re-rounded to the nearest format-2 code, with one
    ``UserWarning`` per load naming how many moments were migrated, so an old checkpoint is never read as codes
    of the new format.
    """
    migrated = 0
    for group in optimizer.param_groups:
        state_dtype = resolve_state_dtype(group.get("state_dtype"))
        if state_dtype is None:
            continue
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, signed in moments:
                if key not in state:
                    continue
                if state_dtype == "bfloat16":
                    state[key] = state[key].to(torch.bfloat16)
                    continue
                codes = state[key].to(torch.int8)
                legacy = state.pop(key + _LEGACY_SCALE_SUFFIX, None)
                if legacy is not None and is_dtensor(codes):
                    raise RuntimeError(
                        f"{type(optimizer).__name__}.load_state_dict: int8 moment {key!r} of a sharded parameter is in "
                        "the older dynamic-tree format (<key>_absmax); migrate it unsharded: load the checkpoint into "
                        "the unsharded optimizer and save it again")
                if legacy is not None:
                    codes, state[key + _SCALE_SUFFIX] = _migrate_legacy_int8(codes, legacy, signed)
                    migrated += 1
                state[key] = codes
                state[key + _SCALE_SUFFIX] = state[key + _SCALE_SUFFIX].to(torch.float32)
    if migrated:
        warnings.warn(f"{type(optimizer).__name__}.load_state_dict: {migrated} int8 moments were saved in the "
                      "older dynamic-tree format (<key>_absmax); migrated to the format-2 codes (<key>_blockmax), each "
                      "value rounded to the nearest new code", UserWarning, stacklevel=3)
