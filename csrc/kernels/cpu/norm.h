// Row-wise RMSNorm, residual add + RMSNorm and SiLU*mul, torch-free.
// Rounding mirrors Hugging Face LLaMA in the storage type T: the sum x + r is stored in T,
// the normalized row is rounded to T before the weight multiplies it, silu(g) is rounded
// before the product. In float32 every rounding is exact.
#pragma once
#include <cmath>
#include <cstdint>

#include "kernels/cpu/fast_math.h"
#include "kernels/cpu/isa.h"
#include "kernels/cpu/scalar.h"

namespace emu_fast::kernels {

template <typename T>
EMU_ALWAYS_INLINE float inv_rms(const T* x, int64_t n, float eps) {
  constexpr int kLanes = 16;  // independent partial sums: vectorizes without -ffast-math
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float v = to_float(x[i + j]);
      acc[j] += v * v;
    }
  float ss = 0.f;
  for (; i < n; ++i) ss += to_float(x[i]) * to_float(x[i]);
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return 1.f / std::sqrt((ss + acc[0]) / static_cast<float>(n) + eps);
}

// y = w * round_T(x * rsqrt(mean(x^2) + eps))
template <typename T>
EMU_ALWAYS_INLINE void rms_norm_row(const T* x, const T* w, float eps, int64_t n, T* y) {
  const float r = inv_rms(x, n, eps);
  for (int64_t i = 0; i < n; ++i)
    y[i] = from_float<T>(to_float(w[i]) * round_to<T>(to_float(x[i]) * r));
}

// s = x + residual (stored in T), y = rms_norm(s)
template <typename T>
EMU_ALWAYS_INLINE void add_rms_norm_row(const T* x, const T* residual, const T* w, float eps, int64_t n,
                             T* sum_out, T* y) {
  for (int64_t i = 0; i < n; ++i) sum_out[i] = from_float<T>(to_float(x[i]) + to_float(residual[i]));
  rms_norm_row(sum_out, w, eps, n, y);
}

// y = round_T(silu(gate)) * up, elementwise over n (a gate_up row is [gate (n) | up (n)]; a
// thread may take any slice of it).
template <typename T>
EMU_ALWAYS_INLINE void silu_mul(const T* gate, const T* up, int64_t n, T* y) {
  for (int64_t i = 0; i < n; ++i) {
    const float s = round_to<T>(silu(to_float(gate[i])));
    y[i] = from_float<T>(s * to_float(up[i]));
  }
}

// The CPU instantiations, one per instruction set (norm_cpu.cpp).
void rms_norm_row_cpu(const float* x, const float* w, float eps, int64_t n, float* y);
void rms_norm_row_cpu(const bf16* x, const bf16* w, float eps, int64_t n, bf16* y);
void add_rms_norm_row_cpu(const float* x, const float* r, const float* w, float eps, int64_t n, float* sum, float* y);
void add_rms_norm_row_cpu(const bf16* x, const bf16* r, const bf16* w, float eps, int64_t n, bf16* sum, bf16* y);
void silu_mul_cpu(const float* gate, const float* up, int64_t n, float* y);
void silu_mul_cpu(const bf16* gate, const bf16* up, int64_t n, bf16* y);

}  // namespace emu_fast::kernels
