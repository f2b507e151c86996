r"""A hand-written CPU kernel for Adam/AdamW with bfloat16 or int8 moments: one vectorised pass per tensor.

Why not the compiled (Inductor) wrapper of :mod:`optimlab.optim.lowp_state`: on CPU, Inductor (torch 2.13)
emits float <-> int bit casts one value at a time (through a stack buffer), and a kernel that also writes the
float32 parameter is vectorised 16 lanes wide, where the bf16 loads and stores become masked half-vector
accesses; both made the compiled bf16-state AdamW step 3x slower than torch's fused fp32 step although it
moves 20 instead of 28 bytes per parameter. Plain C++ compiled with ``-O3 -march=native`` vectorises the
whole bf16 loop, bit casts included (they are register moves). int8 moments are decoded, updated and coded
block by block (256 values in L1: decode, update, block maximum, code); the codes (``lowp_state._encode`` /
``_decode``: a group chosen by two comparisons, a variable shift, an offset) are computed 16 values at a time
with AVX-512 intrinsics where the CPU has them (there: 1.15x torch's fused fp32 step at 20M), else by one-value
functions in loops that the compiler vectorises for the CPU it has (0.79x here; an AVX2 build 0.30x); both give the
same bits (``SCALAR_CODES`` selects the one-value loops; tested).

Update rule (the operations of :func:`optimlab.optim.adam._adam_tensor` on the decoded moments, in its order,
except that :math:`\sqrt{v}` is multiplied by :math:`1/\sqrt{1-\beta_2^t}` where ATen divides: a division per
value is the slowest operation of the int8 step; see :mod:`optimlab.optim.adam` for the maths):

.. math::
    g \leftarrow \pm g\ (+\lambda\theta),\quad m \leftarrow \mathrm{lerp}(m, g, 1-\beta_1),\quad
    v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
    \theta \leftarrow \theta - \frac{\eta}{1-\beta_1^t}\,\frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

with :math:`m, v` read from bf16 or int8 and written back with the stochastic rounding of
:mod:`optimlab.optim.lowp_state`: bf16, the float32 pattern plus 16 noise bits, truncated; int8, the
pattern of the value over its block maximum plus the noise bits its code group drops. The noise of element
:math:`i` of a moment is the high bits of :math:`\mathrm{mix}(s + i\,W \bmod 2^{32})`
(:func:`optimlab.optim.lowp_state._hash_from`), so this kernel rounds exactly like the eager path; results
equal it except where the C++ compiler and ATen order a float operation differently (last place).

The library is compiled on first use with the C++ compiler that the fused path needs anyway, cached under
``~/.cache/optimlab/native`` (keyed by the source, the flags, the compiler and the CPU's feature flags, so a
home directory shared by different machines never loads a foreign build), and loaded with ``ctypes``; the
calls release the GIL. It links OpenMP like Inductor's kernels: the ``libgomp`` that torch has loaded is the
one used, so its threads are torch's (``torch.get_num_threads()``). When it cannot be built,
:func:`adam_lowp_kernel` returns ``None`` (one warning) and the optimizer keeps the compiled wrapper.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Sequence
from typing import Any
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["adam_lowp_kernel", "native_unavailable_reason", "vector_codes", "SCALAR_CODES"]

WEYL = 0x9E3779B9
"""The odd step of the noise counter (``floor(2**32 / golden ratio)``); see ``lowp_state._hash_from``."""
NOISE_MULTIPLIER = 0x21F0AAAD
"""The multiplier of the noise mixer (the first of Wellons' ``lowbias32``); see ``lowp_state._hash_from``."""

_SOURCE = r"""
#include <cstdint>
#include <cstring>
#include <cmath>
#include <omp.h>

static inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// the noise of one element: the counter mixed (lowp_state._hash_from)
static inline uint32_t mix(uint32_t h) {
  h ^= h >> 16;
  h *= 0x21F0AAADu;
  return h ^ (h >> 15);
}

// float32 -> bf16 pattern: the 16 noise bits added to the float32 pattern, the 16 low bits dropped
static inline uint16_t round_bf16(float x, uint32_t noise) {
  return (uint16_t)((float_to_bits(x) + noise) >> 16);
}

struct Adam {  // the step's constants, as float32 (what ATen uses for a float32 tensor's scalars)
  float decay, weight_decay, lerp_coefficient, beta2, one_minus_beta2, inverse_bias_correction2_sqrt, eps, step_size;
};

// the Adam rule on one element, in the eager path's operation order (_adam_tensor on float32 tensors)
template <bool maximize, bool coupled, bool small_weight>
static inline void adam_element(const Adam& a, float& p, float grad, float& m, float& v) {
  float g = maximize ? -grad : grad;
  if (coupled) g = g + a.weight_decay * p;     // grad.add(param, alpha=weight_decay)
  else p = p * a.decay;                         // param.mul_(1 - lr * weight_decay) (decay 1: no decay)
  m = std::fma(a.lerp_coefficient, g - m, small_weight ? m : g);   // ATen's vectorised lerp
  v = v * a.beta2;
  v = v + a.one_minus_beta2 * g * g;           // addcmul_(g, g, value=1 - beta2)
  float denom = std::sqrt(v) * a.inverse_bias_correction2_sqrt + a.eps;  // a multiply for ATen's division
  p = p + a.step_size * (m / denom);           // addcdiv_(m, denom, value=-lr / bias_correction1)
}

struct Tensors {  // parallel arrays over the step's tensors
  const int64_t* sizes;
  float* const* params;
  const float* const* grads;
  void* const* exp_avgs;        // uint16 (bf16 patterns) or int8 codes
  float* const* exp_avg_scales;  // int8: one float32 scale per block of 256
  void* const* exp_avg_sqs;
  float* const* exp_avg_sq_scales;
  const uint32_t* starts_avg;    // per tensor: the noise start of its first element (int8: of both moments)
  const uint32_t* starts_avg_sq;
  bool scalar_codes;  // int8: code values one at a time (the reference of the vector path)
};

// bf16 moments: [begin, end) of tensor t, one vectorised loop
template <bool maximize, bool coupled, bool small_weight>
static void bf16_range(const Adam& a, const Tensors& x, int64_t t, int64_t begin, int64_t end) {
  float* __restrict__ param = x.params[t];
  const float* __restrict__ grad = x.grads[t];
  uint16_t* __restrict__ exp_avg = (uint16_t*)x.exp_avgs[t];
  uint16_t* __restrict__ exp_avg_sq = (uint16_t*)x.exp_avg_sqs[t];
  const uint32_t start_avg = x.starts_avg[t], start_avg_sq = x.starts_avg_sq[t];
  for (int64_t i = begin; i < end; i++) {
    float p = param[i];
    float m = bits_to_float((uint32_t)exp_avg[i] << 16);
    float v = bits_to_float((uint32_t)exp_avg_sq[i] << 16);
    adam_element<maximize, coupled, small_weight>(a, p, grad[i], m, v);
    param[i] = p;
    uint32_t index = (uint32_t)i * 0x9E3779B9u;
    exp_avg[i] = round_bf16(m, mix(start_avg + index) >> 16);
    exp_avg_sq[i] = round_bf16(v, mix(start_avg_sq + index) >> 16);
  }
}

static const int64_t BLOCK = 256;

// the largest |x| of a block, as the float32 pattern of a non-negative float (whose integer order is the float
// order): an integer max reduction, which the compiler vectorises (a float one it may not reorder)
static inline float block_absmax(const float* __restrict__ values, int64_t count) {
  uint32_t largest = 0;
  for (int64_t j = 0; j < count; j++) {
    const uint32_t magnitude = float_to_bits(values[j]) & 0x7FFFFFFFu;
    largest = magnitude > largest ? magnitude : largest;
  }
  return bits_to_float(largest);
}

// int8 codes (lowp_state._encode / _decode): a value relative to its block's maximum, in binade groups of
// 2^bits steps per binade (more bits near the maximum), linear below the lowest group. Layout<SIGNED> is generated
// from lowp_state._groups (three groups): per group (top first) its lowest value 2^lowest, the float32 mantissa bits it drops
// (23 - bits), the code of 2^lowest and the offset taken off a shifted float32 pattern; low_codes: the codes of the
// linear range (2^bits of the lowest group).
struct Group {
  float lowest;
  int32_t dropped, first, offset;
};
template <bool SIGNED>
struct Layout;
@INT8_LAYOUTS@

// One value's code (lowp_state._encode, operation for operation): |r| = min(|x| * reciprocal, 1); its group (below
// the lowest group: |r| plus the group's lowest value); the float32 pattern plus the noise bits the group drops
// (the high ones of the element's 23), shifted down: stochastic rounding, a carry moving into the next step
template <bool SIGNED>
static inline int8_t encode_one(float x, float reciprocal, uint32_t noise) {
  using L = Layout<SIGNED>;
  const float r = x * reciprocal;
  const float absolute = std::fabs(r);
  const float magnitude = absolute < 1.0f ? absolute : 1.0f;
  const bool low = magnitude < L::groups[2].lowest;
  const float shifted = low ? magnitude + L::groups[2].lowest : magnitude;
  const int32_t middle = magnitude >= L::groups[1].lowest, top = magnitude >= L::groups[0].lowest;
  // the group's constants as sums (top implies middle, low excludes both), not selects: GCC vectorises these
  // (the loops calling this function on CPUs without AVX-512) and turned selects into branches
  const int32_t dropped = L::groups[2].dropped + middle * (L::groups[1].dropped - L::groups[2].dropped) +
                          top * (L::groups[0].dropped - L::groups[1].dropped);
  const int32_t offset = L::groups[2].offset + (int32_t)low * L::low_codes +
                         middle * (L::groups[1].offset - L::groups[2].offset) + top * (L::groups[0].offset - L::groups[1].offset);
  const int32_t code = (int32_t)((float_to_bits(shifted) + (noise >> (23 - dropped))) >> dropped) - offset;
  return (int8_t)(SIGNED && r < 0.0f ? -code : code);
}

// one code's value relative to the block maximum (lowp_state._decode): the code plus its group's offset, shifted
// into a float32 pattern; a code of the linear range is read in the lowest group, whose lowest value is subtracted
template <bool SIGNED>
static inline float decode_one(int8_t stored) {
  using L = Layout<SIGNED>;
  const int32_t code = SIGNED ? (stored < 0 ? -(int32_t)stored : (int32_t)stored) : (int32_t)(uint8_t)stored;
  const bool low = code < L::groups[2].first;
  const int32_t middle = code >= L::groups[1].first, top = code >= L::groups[0].first;  // sums, as in encode_one
  const int32_t dropped = L::groups[2].dropped + middle * (L::groups[1].dropped - L::groups[2].dropped) +
                          top * (L::groups[0].dropped - L::groups[1].dropped);
  const int32_t offset = L::groups[2].offset + (int32_t)low * L::low_codes +
                         middle * (L::groups[1].offset - L::groups[2].offset) + top * (L::groups[0].offset - L::groups[1].offset);
  const float value = bits_to_float((uint32_t)(code + offset) << dropped) - (low ? L::groups[2].lowest : 0.0f);
  return SIGNED && stored < 0 ? -value : value;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
static const bool HAS_VECTOR_CODES = true;

// a group's constant for 16 lanes: the lowest group's, replaced where `middle`, then where `top`
static inline __m512i select_group(__mmask16 middle, __mmask16 top, int32_t lowest, int32_t middle_value,
                                   int32_t top_value) {
  const __m512i value = _mm512_mask_mov_epi32(_mm512_set1_epi32(lowest), middle, _mm512_set1_epi32(middle_value));
  return _mm512_mask_mov_epi32(value, top, _mm512_set1_epi32(top_value));
}

// encode_one for the 16 values x[0..16) with their 23-bit noise
template <bool SIGNED>
static inline void encode16(const float* x, float reciprocal, __m512i noise, int8_t* out) {
  using L = Layout<SIGNED>;
  const __m512 r = _mm512_mul_ps(_mm512_loadu_ps(x), _mm512_set1_ps(reciprocal));
  const __m512 magnitude = _mm512_min_ps(_mm512_abs_ps(r), _mm512_set1_ps(1.0f));
  const __mmask16 low = _mm512_cmp_ps_mask(magnitude, _mm512_set1_ps(L::groups[2].lowest), _CMP_LT_OQ);
  const __mmask16 middle = _mm512_cmp_ps_mask(magnitude, _mm512_set1_ps(L::groups[1].lowest), _CMP_GE_OQ);
  const __mmask16 top = _mm512_cmp_ps_mask(magnitude, _mm512_set1_ps(L::groups[0].lowest), _CMP_GE_OQ);
  const __m512 shifted = _mm512_mask_add_ps(magnitude, low, magnitude, _mm512_set1_ps(L::groups[2].lowest));
  const __m512i dropped = select_group(middle, top, L::groups[2].dropped, L::groups[1].dropped, L::groups[0].dropped);
  __m512i offset = select_group(middle, top, L::groups[2].offset, L::groups[1].offset, L::groups[0].offset);
  offset = _mm512_mask_add_epi32(offset, low, offset, _mm512_set1_epi32(L::low_codes));
  const __m512i rounded = _mm512_add_epi32(_mm512_castps_si512(shifted),
                                           _mm512_srlv_epi32(noise, _mm512_sub_epi32(_mm512_set1_epi32(23), dropped)));
  __m512i code = _mm512_sub_epi32(_mm512_srlv_epi32(rounded, dropped), offset);
  if (SIGNED) {
    const __mmask16 negative = _mm512_cmp_ps_mask(r, _mm512_setzero_ps(), _CMP_LT_OQ);
    code = _mm512_mask_sub_epi32(code, negative, _mm512_setzero_si512(), code);
  }
  _mm_storeu_si128((__m128i*)out, _mm512_cvtepi32_epi8(code));
}

// decode_one for the 32 codes[0..32), times scale: the value of each byte looked up in Layout::values (bf16
// patterns, 256 words in 8 registers: four 64-word word permutes, chosen by the byte's two high bits)
template <bool SIGNED>
static inline void decode32(const int8_t* codes, float scale, float* out) {
  using L = Layout<SIGNED>;
  const __m512i* table = (const __m512i*)L::values;
  const __m512i index = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)codes));
  const __m512i quarter0 = _mm512_permutex2var_epi16(_mm512_load_si512(table + 0), index, _mm512_load_si512(table + 1));
  const __m512i quarter1 = _mm512_permutex2var_epi16(_mm512_load_si512(table + 2), index, _mm512_load_si512(table + 3));
  const __m512i quarter2 = _mm512_permutex2var_epi16(_mm512_load_si512(table + 4), index, _mm512_load_si512(table + 5));
  const __m512i quarter3 = _mm512_permutex2var_epi16(_mm512_load_si512(table + 6), index, _mm512_load_si512(table + 7));
  const __mmask32 bit6 = _mm512_test_epi16_mask(index, _mm512_set1_epi16(64));
  const __mmask32 bit7 = _mm512_test_epi16_mask(index, _mm512_set1_epi16(128));
  const __m512i low = _mm512_mask_mov_epi16(quarter0, bit6, quarter1), high = _mm512_mask_mov_epi16(quarter2, bit6, quarter3);
  const __m512i words = _mm512_mask_mov_epi16(low, bit7, high);
  const __m512 factor = _mm512_set1_ps(scale);
  const __m512i first = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(words)), 16);
  const __m512i second = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(words, 1)), 16);
  _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_castsi512_ps(first), factor));
  _mm512_storeu_ps(out + 16, _mm512_mul_ps(_mm512_castsi512_ps(second), factor));
}
#else
static const bool HAS_VECTOR_CODES = false;
#endif

static inline float reciprocal_scale(float scale) {
  const float tiny = 1.17549435e-38f;  // torch.finfo(float32).tiny: the clamp of an all-zero block's scale
  return 1.0f / (scale < tiny ? tiny : scale);
}

// the codes of a block's `count` first and second moments (its first element is element `begin` of the tensor):
// one hash per element, mix(start + i * W), its 16 high bits the first moment's noise and its 16 low bits the
// second's (lowp_state._int8_noise); `scalar`: the one-value functions only (the reference of the vector path)
static inline void encode_blocks(const float* __restrict__ m, const float* __restrict__ v, int64_t count, float max_m,
                                 float max_v, uint32_t start, uint32_t begin, int8_t* __restrict__ out_m,
                                 int8_t* __restrict__ out_v, bool scalar) {
  const float reciprocal_m = reciprocal_scale(max_m), reciprocal_v = reciprocal_scale(max_v);
  int64_t j = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (!scalar) {
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i counter = _mm512_add_epi32(_mm512_set1_epi32((int32_t)start),
                                       _mm512_mullo_epi32(_mm512_add_epi32(_mm512_set1_epi32((int32_t)begin), lanes),
                                                          _mm512_set1_epi32((int32_t)0x9E3779B9u)));
    const __m512i stride = _mm512_set1_epi32((int32_t)(16u * 0x9E3779B9u));  // 16 elements on
    for (; j + 16 <= count; j += 16, counter = _mm512_add_epi32(counter, stride)) {
      __m512i h = _mm512_xor_si512(counter, _mm512_srli_epi32(counter, 16));  // mix(counter)
      h = _mm512_mullo_epi32(h, _mm512_set1_epi32((int32_t)0x21F0AAADu));
      h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 15));
      encode16<true>(m + j, reciprocal_m, _mm512_slli_epi32(_mm512_srli_epi32(h, 16), 7), out_m + j);
      encode16<false>(v + j, reciprocal_v, _mm512_srli_epi32(_mm512_slli_epi32(h, 16), 9), out_v + j);
    }
  }
#endif
  for (; j < count; j++) {
    const uint32_t h = mix(start + (begin + (uint32_t)j) * 0x9E3779B9u);
    out_m[j] = encode_one<true>(m[j], reciprocal_m, (h >> 16) << 7);
    out_v[j] = encode_one<false>(v[j], reciprocal_v, (h & 0xFFFFu) << 7);
  }
}

// a block's `count` values from their codes and the block's scale
template <bool SIGNED>
static inline void decode_block(const int8_t* __restrict__ codes, int64_t count, float scale, float* __restrict__ out,
                                bool scalar) {
  int64_t j = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (!scalar)
    for (; j + 32 <= count; j += 32) decode32<SIGNED>(codes + j, scale, out + j);
#endif
  for (; j < count; j++) out[j] = decode_one<SIGNED>(codes[j]) * scale;
}

// int8 moments: blocks [first_block, last_block) of tensor t: decode and update, block maxima, encode. The
// constants are passed by value (an int8 store may alias anything: values read through pointers would be
// reloaded after every store)
template <bool maximize, bool coupled, bool small_weight>
static void int8_blocks(const Adam a, const Tensors& x, int64_t t, int64_t first_block, int64_t last_block) {
  const int64_t n = x.sizes[t];
  float* __restrict__ param = x.params[t];
  const float* __restrict__ grad = x.grads[t];
  int8_t* __restrict__ codes_avg = (int8_t*)x.exp_avgs[t];
  int8_t* __restrict__ codes_avg_sq = (int8_t*)x.exp_avg_sqs[t];
  float* __restrict__ scales_avg = x.exp_avg_scales[t];
  float* __restrict__ scales_avg_sq = x.exp_avg_sq_scales[t];
  const uint32_t start = x.starts_avg[t];  // int8: one noise sequence for both moments (equal starts)
  float m[BLOCK], v[BLOCK];
  for (int64_t block = first_block; block < last_block; block++) {
    const int64_t begin = block * BLOCK, count = n - begin < BLOCK ? n - begin : BLOCK;
    const float scale_avg = scales_avg[block], scale_avg_sq = scales_avg_sq[block];
    decode_block<true>(codes_avg + begin, count, scale_avg, m, x.scalar_codes);
    decode_block<false>(codes_avg_sq + begin, count, scale_avg_sq, v, x.scalar_codes);
    for (int64_t j = 0; j < count; j++) {
      float p = param[begin + j], mj = m[j], vj = v[j];
      adam_element<maximize, coupled, small_weight>(a, p, grad[begin + j], mj, vj);
      param[begin + j] = p;
      m[j] = mj;
      v[j] = vj;
    }
    const float max_avg = block_absmax(m, count), max_avg_sq = block_absmax(v, count);
    encode_blocks(m, v, count, max_avg, max_avg_sq, start, (uint32_t)begin, codes_avg + begin, codes_avg_sq + begin,
                  x.scalar_codes);
    scales_avg[block] = max_avg;
    scales_avg_sq[block] = max_avg_sq;
  }
}

// every tensor of a step in one parallel region: each thread takes its share of each tensor (no barrier between
// tensors; int8 shares are whole blocks); a tensor below `grain` values per thread is split over fewer threads
template <bool maximize, bool coupled, bool small_weight>
static void adam_tensors(const Adam& a, const Tensors& x, int64_t count, bool int8, int threads) {
  const int64_t grain = 1 << 15;
#pragma omp parallel num_threads(threads)
  {
    const int64_t thread = omp_get_thread_num(), team = omp_get_num_threads();
    for (int64_t t = 0; t < count; t++) {
      const int64_t n = x.sizes[t], units = int8 ? (n + BLOCK - 1) / BLOCK : n;
      int64_t used = (n + grain - 1) / grain;
      used = used < team ? used : team;
      used = used < 1 ? 1 : used;
      const int64_t k = ((thread - t) % team + team) % team;  // tensor t goes to threads t, t+1, ... (mod team)
      if (k >= used) continue;
      const int64_t per = (units + used - 1) / used;
      const int64_t begin = per * k, end = begin + per < units ? begin + per : units;
      if (begin >= end) continue;
      if (int8) int8_blocks<maximize, coupled, small_weight>(a, x, t, begin, end);
      else bf16_range<maximize, coupled, small_weight>(a, x, t, begin, end);
    }
  }
}

// whether int8 codes are computed 16 at a time (AVX-512) unless scalar_codes asks for one at a time
extern "C" int vector_codes() { return HAS_VECTOR_CODES ? 1 : 0; }

// int8: 0 for bf16 moments, 1 for int8 moments; scalar_codes: 1 to code int8 values one at a time
extern "C" void adam_lowp(int64_t count, const int64_t* sizes, float* const* params, const float* const* grads,
                          void* const* exp_avgs, float* const* exp_avg_scales, void* const* exp_avg_sqs,
                          float* const* exp_avg_sq_scales, const uint32_t* starts_avg, const uint32_t* starts_avg_sq,
                          float decay, float weight_decay, int coupled, int maximize, float lerp_weight, float beta2,
                          float one_minus_beta2, float bias_correction2_sqrt, float eps, float step_size,
                          int int8, int scalar_codes, int threads) {
  const bool small = std::fabs(lerp_weight) < 0.5f;
  const Adam a{decay, weight_decay, small ? lerp_weight : lerp_weight - 1.0f, beta2, one_minus_beta2,
               1.0f / bias_correction2_sqrt, eps, step_size};
  const Tensors x{sizes, params, grads, exp_avgs, exp_avg_scales, exp_avg_sqs, exp_avg_sq_scales, starts_avg,
                  starts_avg_sq, scalar_codes != 0};
  // the eight instantiations, indexed by (maximize, coupled, small)
  using Step = void (*)(const Adam&, const Tensors&, int64_t, bool, int);
  static const Step steps[8] = {
      adam_tensors<false, false, false>, adam_tensors<false, false, true>, adam_tensors<false, true, false>,
      adam_tensors<false, true, true>,   adam_tensors<true, false, false>, adam_tensors<true, false, true>,
      adam_tensors<true, true, false>,   adam_tensors<true, true, true>};
  steps[(maximize ? 4 : 0) + (coupled ? 2 : 0) + (small ? 1 : 0)](a, x, count, int8 != 0, threads);
}
"""

_warned: set[str] = set()
SCALAR_CODES = False
"""int8 codes one value at a time even where the kernel has a 16-lane (AVX-512) path: the reference that the
tests compare the vector path with (both compute the same operations, so the codes are equal bit for bit)."""
# -fno-trapping-math: no floating-point traps are relied on, and without it GCC will not if-convert a select of a
# float operation (it might trap), so the one-value int8 loops (CPUs without AVX-512) stay scalar; results are the
# same IEEE operations either way (no contraction: -ffp-contract=off)
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-shared",
          "-fPIC", "-std=c++17"]


def _compiler() -> str | None:
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((path for path in map(shutil.which, candidates) if path), None)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _layouts() -> str:
    """The C++ ``Layout<SIGNED>`` specialisations of the int8 codes, from :func:`optimlab.optim.lowp_state._groups`."""
    from optimlab.optim.lowp_state import _code_tables_cpu, _groups

    lines = []
    for signed in (True, False):
        groups, _top = _groups(signed)
        if len(groups) != 3:  # encode_one, encode16 and decode_one select among three groups
            raise RuntimeError(f"native int8 kernel: the code has {len(groups)} groups (expected 3)")
        entries = ", ".join(f"{{{2.0**g.lowest!r}f, {23 - g.bits}, {g.first}, {g.offset}}}" for g in groups)
        values = _code_tables_cpu(signed)[0].view(torch.int32)
        if bool((values & 0xFFFF).any()):  # every code value is a bf16 number: decode16 reads its 16 high bits
            raise RuntimeError("native int8 kernel: a code value is not exact in bfloat16")
        table = ", ".join(str(int(bits)) for bits in (values >> 16) & 0xFFFF)
        lines.append(f"template <>\nstruct Layout<{str(signed).lower()}> {{\n"
                     f"  alignas(64) static constexpr uint16_t values[256] = {{{table}}};\n"
                     f"  static constexpr Group groups[{len(groups)}] = {{{entries}}};\n"
                     f"  static constexpr int32_t low_codes = {1 << groups[-1].bits};\n}};")
    return "\n".join(lines)


def _source() -> str:
    return _SOURCE.replace("@INT8_LAYOUTS@", _layouts())


def _build(compiler: str) -> Path:
    """The compiled library, from the cache or built now (written to a temporary name, then renamed)."""
    source = _source()
    key = hashlib.sha256("\0".join([source, *_FLAGS, compiler, platform.machine(), _cpu_flags()]).encode())
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "optimlab" / "native"
    library = base / f"lowp-{key.hexdigest()[:20]}.so"
    if library.exists():
        return library
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base) as scratch:
        source_file = Path(scratch) / "lowp.cpp"
        source_file.write_text(source, encoding="utf-8")
        built = Path(scratch) / "lowp.so"
        subprocess.run([compiler, *_FLAGS, str(source_file), "-o", str(built)], check=True, capture_output=True,
                       timeout=300)
        os.replace(built, library)
    return library


@functools.lru_cache(maxsize=None)
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    if platform.system() != "Linux":
        return None, f"no native low-precision kernel on {platform.system()} (built and tested on Linux only)"
    compiler = _compiler()
    if compiler is None:
        return None, "no C++ compiler found (set CXX or install g++)"
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        return None, f"building it failed ({error}; {detail.decode(errors='replace').strip()[:300]})"
    function = library.adam_lowp
    function.restype = None
    function.argtypes = [ctypes.c_int64, *[ctypes.c_void_p] * 9, ctypes.c_float, ctypes.c_float, ctypes.c_int,
                         ctypes.c_int, *[ctypes.c_float] * 6, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    library.vector_codes.restype = ctypes.c_int
    return library, None


def vector_codes() -> bool:
    """Whether the built kernel codes int8 values 16 at a time (it was built for a CPU with AVX-512 F and BW)."""
    library, _ = _library()
    return bool(library is not None and library.vector_codes())


def native_unavailable_reason() -> str | None:
    """Why the native kernel cannot be used here (``None`` when it can); builds it on first call.
    ``OPTIMLAB_DISABLE_NATIVE=1`` turns it off (the compiled wrapper is used instead)."""
    if os.environ.get("OPTIMLAB_DISABLE_NATIVE", "").strip().lower() not in ("", "0", "false", "no"):
        return f"disabled by the environment (OPTIMLAB_DISABLE_NATIVE={os.environ['OPTIMLAB_DISABLE_NATIVE']})"
    return _library()[1]


def adam_lowp_kernel(storage: str) -> Callable[..., None] | None:
    """The native Adam step on ``storage`` (``"bfloat16"`` or ``"int8"``) moments, or ``None`` (with one
    warning) when it cannot be built.

    ``kernel(params, grads, *stored, starts, lr=, beta1=, beta2=, eps=, bias_correction1=, bias_correction2_sqrt=,
    weight_decay=, maximize=, decoupled_weight_decay=)`` updates lists of contiguous float32 CPU parameters and
    their contiguous moments in place (``stored``: the exp_avg and exp_avg_sq lists, for int8 each followed by its
    block scales), all of them in one parallel region (one call per step, no synchronisation between tensors);
    ``starts`` are, per moment, each tensor's noise start (int32 values,
    :func:`optimlab.optim.lowp_state._hash_start` of the global index of its first element: 0, or a shard's offset
    in its whole tensor). int8 moments must be whole tensors (their blocks start at the tensor's first value).
    """
    if storage not in ("bfloat16", "int8"):
        raise ValueError(f"Invalid storage: {storage!r} (accepted: 'bfloat16', 'int8')")
    reason = native_unavailable_reason()
    if reason is not None:
        if not reason.startswith("disabled") and reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"optimlab: the native low-precision Adam kernel is unavailable ({reason}); using the "
                          "compiled low-precision step instead", RuntimeWarning, stacklevel=2)
        return None
    return functools.partial(_adam_lowp, storage)


def _pointers(tensors: Sequence[Tensor], dtype: torch.dtype) -> ctypes.Array:
    for tensor in tensors:
        if tensor.dtype != dtype or tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(f"native low-precision Adam: expected contiguous {dtype} CPU tensors, got {tensor.dtype} "
                             f"on {tensor.device} (contiguous: {tensor.is_contiguous()})")
    return (ctypes.c_void_p * len(tensors))(*[tensor.data_ptr() for tensor in tensors])


def _adam_lowp(storage: str, params: Sequence[Tensor], grads: Sequence[Tensor], *stored_and_starts: Any, lr: float,
               beta1: float, beta2: float, eps: float, bias_correction1: float, bias_correction2_sqrt: float,
               weight_decay: float, maximize: bool, decoupled_weight_decay: bool, amsgrad: bool = False) -> None:
    if amsgrad:
        raise ValueError("native low-precision Adam: amsgrad is not supported (the compiled step handles it)")
    library, _ = _library()
    assert library is not None
    *stored, starts = stored_and_starts
    count = len(params)
    if storage == "int8":
        avg, avg_scales, avg_sq, avg_sq_scales = stored
        moments = [_pointers(avg, torch.int8), _pointers(avg_scales, torch.float32), _pointers(avg_sq, torch.int8),
                   _pointers(avg_sq_scales, torch.float32)]
    else:
        avg, avg_sq = stored
        moments = [_pointers(avg, torch.bfloat16), None, _pointers(avg_sq, torch.bfloat16), None]
    sizes = (ctypes.c_int64 * count)(*[param.numel() for param in params])
    noise = [(ctypes.c_uint32 * count)(*[start & 0xFFFFFFFF for start in moment]) for moment in starts]
    coupled = weight_decay != 0 and not decoupled_weight_decay
    decay = 1 - lr * weight_decay if weight_decay != 0 and decoupled_weight_decay else 1.0
    library.adam_lowp(count, sizes, _pointers(params, torch.float32), _pointers(grads, torch.float32), *moments,
                      *noise, decay, weight_decay, int(coupled), int(maximize), 1 - beta1, beta2, 1 - beta2,
                      bias_correction2_sqrt, eps, -(lr / bias_correction1), int(storage == "int8"), int(SCALAR_CODES),
                      torch.get_num_threads())
