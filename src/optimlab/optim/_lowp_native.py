r"""A hand-written CPU kernel for Adam/AdamW with bfloat16 moments: one vectorised pass per tensor.

Why not the compiled (Inductor) wrapper of :mod:`optimlab.optim.lowp_state`: on CPU, Inductor (torch 2.13)
emits float <-> int bit casts one value at a time (through a stack buffer), and a kernel that also writes the
float32 parameter is vectorised 16 lanes wide, where the bf16 loads and stores become masked half-vector
accesses; both made the compiled bf16-state AdamW step 3x slower than torch's fused fp32 step although it
moves 20 instead of 28 bytes per parameter. Plain C++ compiled with ``-O3 -march=native`` vectorises the
whole loop, bit casts included (they are register moves).

Update rule (the same operations, in the same order, as :func:`optimlab.optim.adam._adam_tensor` on the
decoded moments; see :mod:`optimlab.optim.adam` for the maths):

.. math::
    g \leftarrow \pm g\ (+\lambda\theta),\quad m \leftarrow \mathrm{lerp}(m, g, 1-\beta_1),\quad
    v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
    \theta \leftarrow \theta - \frac{\eta}{1-\beta_1^t}\,\frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

with :math:`m, v` read from bf16 and written back with the stochastic rounding of
:func:`optimlab.optim.lowp_state.round_to_bfloat16`: the float32 pattern plus 16 noise bits, truncated. The
noise of element :math:`i` of a moment is the 16 high bits of :math:`\mathrm{mix}(s + i\,W \bmod 2^{32})`
(:func:`optimlab.optim.lowp_state._hash_from`), so this kernel rounds exactly like the eager path; results
equal it except where the C++ compiler and ATen order a float operation differently (last place).

The library is compiled on first use with the C++ compiler that the fused path needs anyway, cached under
``~/.cache/optimlab/native`` (keyed by the source, the flags, the compiler and the CPU's feature flags, so a
home directory shared by different machines never loads a foreign build), and loaded with ``ctypes``; the
calls release the GIL. It links OpenMP like Inductor's kernels: the ``libgomp`` that torch has loaded is the
one used, so its threads are torch's (``torch.get_num_threads()``). When it cannot be built,
:func:`adam_bfloat16_kernel` returns ``None`` (one warning) and the optimizer keeps the compiled wrapper.
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
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["adam_bfloat16_kernel", "native_unavailable_reason"]

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

// one contiguous range [begin, end) of the tensor; the options are template arguments so that the loop has no
// branch and vectorises (16 floats per AVX-512 instruction)
template <bool maximize, bool coupled, bool small_weight>
static void adam_bf16_range(int64_t begin, int64_t end, float* __restrict__ param, const float* __restrict__ grad,
                            uint16_t* __restrict__ exp_avg, uint16_t* __restrict__ exp_avg_sq, float decay,
                            float weight_decay, float lerp_coefficient, float beta2, float one_minus_beta2,
                            float bias_correction2_sqrt, float eps, float step_size, uint32_t start_avg,
                            uint32_t start_avg_sq) {
  for (int64_t i = begin; i < end; i++) {
    float p = param[i];
    float g = maximize ? -grad[i] : grad[i];
    if (coupled) g = g + weight_decay * p;      // grad.add(param, alpha=weight_decay)
    else p = p * decay;                          // param.mul_(1 - lr * weight_decay) (decay 1: no decay)
    float m = bits_to_float((uint32_t)exp_avg[i] << 16);
    float v = bits_to_float((uint32_t)exp_avg_sq[i] << 16);
    m = std::fma(lerp_coefficient, g - m, small_weight ? m : g);   // ATen's vectorised lerp
    v = v * beta2;
    v = v + one_minus_beta2 * g * g;            // addcmul_(g, g, value=1 - beta2)
    float denom = std::sqrt(v) / bias_correction2_sqrt + eps;
    param[i] = p + step_size * (m / denom);     // addcdiv_(m, denom, value=-lr / bias_correction1)
    uint32_t index = (uint32_t)i * 0x9E3779B9u;
    exp_avg[i] = round_bf16(m, mix(start_avg + index) >> 16);
    exp_avg_sq[i] = round_bf16(v, mix(start_avg_sq + index) >> 16);
  }
}

// every tensor of a step in one parallel region: each thread takes its share of each tensor (no barrier between
// tensors); a tensor below `grain` values per thread is split over fewer threads
template <bool maximize, bool coupled, bool small_weight>
static void adam_bf16_tensors(int64_t count, const int64_t* sizes, float* const* params, const float* const* grads,
                              uint16_t* const* exp_avgs, uint16_t* const* exp_avg_sqs, float decay,
                              float weight_decay, float lerp_coefficient, float beta2, float one_minus_beta2,
                              float bias_correction2_sqrt, float eps, float step_size, const uint32_t* starts_avg,
                              const uint32_t* starts_avg_sq, int threads) {
  const int64_t grain = 1 << 15;
#pragma omp parallel num_threads(threads)
  {
    const int64_t thread = omp_get_thread_num(), team = omp_get_num_threads();
    for (int64_t t = 0; t < count; t++) {
      const int64_t n = sizes[t];
      int64_t used = (n + grain - 1) / grain;
      used = used < team ? used : team;
      used = used < 1 ? 1 : used;
      // tensor t goes to threads (t + k) mod team, k < used: small tensors spread over the team
      const int64_t k = ((thread - t) % team + team) % team;
      if (k >= used) continue;
      const int64_t per = (n + used - 1) / used;
      const int64_t begin = per * k, end = begin + per < n ? begin + per : n;
      if (begin < end)
        adam_bf16_range<maximize, coupled, small_weight>(begin, end, params[t], grads[t], exp_avgs[t],
                                                         exp_avg_sqs[t], decay, weight_decay, lerp_coefficient,
                                                         beta2, one_minus_beta2, bias_correction2_sqrt, eps,
                                                         step_size, starts_avg[t], starts_avg_sq[t]);
    }
  }
}

extern "C" void adam_bf16(int64_t count, const int64_t* sizes, float* const* params, const float* const* grads,
                          uint16_t* const* exp_avgs, uint16_t* const* exp_avg_sqs, float decay, float weight_decay,
                          int coupled, int maximize, float lerp_weight, float beta2, float one_minus_beta2,
                          float bias_correction2_sqrt, float eps, float step_size, const uint32_t* starts_avg,
                          const uint32_t* starts_avg_sq, int threads) {
  const bool small = std::fabs(lerp_weight) < 0.5f;
  const float coefficient = small ? lerp_weight : lerp_weight - 1.0f;
#define OPTIMLAB_ADAM_BF16(MAXIMIZE, COUPLED, SMALL)                                                          \
  adam_bf16_tensors<MAXIMIZE, COUPLED, SMALL>(count, sizes, params, grads, exp_avgs, exp_avg_sqs, decay,     \
                                              weight_decay, coefficient, beta2, one_minus_beta2,             \
                                              bias_correction2_sqrt, eps, step_size, starts_avg,            \
                                              starts_avg_sq, threads)
  if (maximize) {
    if (coupled) { if (small) OPTIMLAB_ADAM_BF16(true, true, true); else OPTIMLAB_ADAM_BF16(true, true, false); }
    else { if (small) OPTIMLAB_ADAM_BF16(true, false, true); else OPTIMLAB_ADAM_BF16(true, false, false); }
  } else {
    if (coupled) { if (small) OPTIMLAB_ADAM_BF16(false, true, true); else OPTIMLAB_ADAM_BF16(false, true, false); }
    else { if (small) OPTIMLAB_ADAM_BF16(false, false, true); else OPTIMLAB_ADAM_BF16(false, false, false); }
  }
#undef OPTIMLAB_ADAM_BF16
}
"""

_warned: set[str] = set()
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC",
          "-std=c++17"]


def _compiler() -> str | None:
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((path for path in map(shutil.which, candidates) if path), None)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _build(compiler: str) -> Path:
    """The compiled library, from the cache or built now (written to a temporary name, then renamed)."""
    key = hashlib.sha256("\0".join([_SOURCE, *_FLAGS, compiler, platform.machine(), _cpu_flags()]).encode())
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "optimlab" / "native"
    library = base / f"lowp-{key.hexdigest()[:20]}.so"
    if library.exists():
        return library
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base) as scratch:
        source = Path(scratch) / "lowp.cpp"
        source.write_text(_SOURCE, encoding="utf-8")
        built = Path(scratch) / "lowp.so"
        subprocess.run([compiler, *_FLAGS, str(source), "-o", str(built)], check=True, capture_output=True,
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
    function = library.adam_bf16
    function.restype = None
    function.argtypes = [ctypes.c_int64, *[ctypes.c_void_p] * 5, ctypes.c_float, ctypes.c_float, ctypes.c_int,
                         ctypes.c_int, *[ctypes.c_float] * 6, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return library, None


def native_unavailable_reason() -> str | None:
    """Why the native kernel cannot be used here (``None`` when it can); builds it on first call.
    ``OPTIMLAB_DISABLE_NATIVE=1`` turns it off (the compiled wrapper is used instead)."""
    if os.environ.get("OPTIMLAB_DISABLE_NATIVE", "").strip().lower() not in ("", "0", "false", "no"):
        return f"disabled by the environment (OPTIMLAB_DISABLE_NATIVE={os.environ['OPTIMLAB_DISABLE_NATIVE']})"
    return _library()[1]


def adam_bfloat16_kernel() -> Callable[..., None] | None:
    """The native Adam step on bf16 moments, or ``None`` (with one warning) when it cannot be built.

    ``kernel(params, grads, exp_avgs, exp_avg_sqs, starts, lr=, beta1=, beta2=, eps=, bias_correction1=,
    bias_correction2_sqrt=, weight_decay=, maximize=, decoupled_weight_decay=)`` updates lists of contiguous
    float32 CPU parameters and their contiguous bf16 moments in place, all of them in one parallel region (one
    call per step, no synchronisation between tensors); ``starts`` are, per moment, each tensor's noise start
    (int32 values, :func:`optimlab.optim.lowp_state._hash_start` of the global index of its first element: 0,
    or a shard's offset in its whole tensor).
    """
    reason = native_unavailable_reason()
    if reason is not None:
        if not reason.startswith("disabled") and reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"optimlab: the native bf16-state Adam kernel is unavailable ({reason}); using the "
                          "compiled low-precision step instead", RuntimeWarning, stacklevel=2)
        return None
    return _adam_bfloat16


def _adam_bfloat16(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                   exp_avg_sqs: Sequence[Tensor], starts: Sequence[Sequence[int]], *, lr: float, beta1: float, beta2: float,
                   eps: float, bias_correction1: float, bias_correction2_sqrt: float, weight_decay: float,
                   maximize: bool, decoupled_weight_decay: bool, amsgrad: bool = False) -> None:
    if amsgrad:
        raise ValueError("native bf16 Adam: amsgrad is not supported (the compiled step handles it)")
    library, _ = _library()
    assert library is not None
    columns = []
    for tensors, dtype in ((params, torch.float32), (grads, torch.float32), (exp_avgs, torch.bfloat16),
                           (exp_avg_sqs, torch.bfloat16)):
        for tensor in tensors:
            if tensor.dtype != dtype or tensor.device.type != "cpu" or not tensor.is_contiguous():
                raise ValueError(f"native bf16 Adam: expected contiguous {dtype} CPU tensors, got {tensor.dtype} on "
                                 f"{tensor.device} (contiguous: {tensor.is_contiguous()})")
        columns.append((ctypes.c_void_p * len(tensors))(*[tensor.data_ptr() for tensor in tensors]))
    sizes = (ctypes.c_int64 * len(params))(*[param.numel() for param in params])
    coupled = weight_decay != 0 and not decoupled_weight_decay
    decay = 1 - lr * weight_decay if weight_decay != 0 and decoupled_weight_decay else 1.0
    noise = [(ctypes.c_uint32 * len(params))(*[start & 0xFFFFFFFF for start in moment]) for moment in starts]
    library.adam_bf16(len(params), sizes, *columns, decay, weight_decay, int(coupled), int(maximize), 1 - beta1,
                      beta2, 1 - beta2, bias_correction2_sqrt, eps, -(lr / bias_correction1), *noise,
                      torch.get_num_threads())
