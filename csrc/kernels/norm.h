// Row-wise RMSNorm, residual add + RMSNorm and SiLU*mul, torch-free.
// Rounding mirrors Hugging Face LLaMA in the storage type T: the sum x + r is stored in T,
// the normalized row is rounded to T before the weight multiplies it, silu(g) is rounded
// before the product. In float32 every rounding is exact.
#pragma once
#include <cmath>
#include <cstdint>

#include "kernels/scalar.h"

namespace emu_fast::kernels {

template <typename T>
inline float inv_rms(const T* x, int64_t n, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    float v = to_float(x[i]);
    ss += v * v;
  }
  return 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
}

// y = w * round_T(x * rsqrt(mean(x^2) + eps))
template <typename T>
inline void rms_norm_row(const T* x, const T* w, float eps, int64_t n, T* y) {
  const float r = inv_rms(x, n, eps);
  for (int64_t i = 0; i < n; ++i)
    y[i] = from_float<T>(to_float(w[i]) * round_to<T>(to_float(x[i]) * r));
}

// s = x + residual (stored in T), y = rms_norm(s)
template <typename T>
inline void add_rms_norm_row(const T* x, const T* residual, const T* w, float eps, int64_t n,
                             T* sum_out, T* y) {
  for (int64_t i = 0; i < n; ++i) sum_out[i] = from_float<T>(to_float(x[i]) + to_float(residual[i]));
  rms_norm_row(sum_out, w, eps, n, y);
}

// gate_up row = [gate (n) | up (n)] -> y = round_T(silu(gate)) * up
template <typename T>
inline void silu_mul_row(const T* gate_up, int64_t n, T* y) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = to_float(gate_up[i]);
    const float s = round_to<T>(g / (1.f + std::exp(-g)));
    y[i] = from_float<T>(s * to_float(gate_up[n + i]));
  }
}

}  // namespace emu_fast::kernels
