// The largest |x| of a block of inputs, for the roundings of x to integer blocks
// (quantized_gemv_int16_cpu.cpp, quantized_gemv_int8_input_cpu.cpp).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/cpu/multiversion.h"

#ifdef EMU_X86
#include <immintrin.h>
#endif

namespace emu_fast::kernels {

// max |x[i]| over n inputs into *m; false (m unset) when one is not finite.
inline bool finite_abs_max(const float* x, int64_t n, float* m) {
  float r = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) return false;
    r = std::max(r, std::fabs(x[i]));
  }
  *m = r;
  return true;
}

#ifdef EMU_X86
// The same over 8 * vectors inputs, 8 at a time; false for a NaN (max_ps would drop it). An inf
// comes back as the maximum: the callers' range checks send it to the scalar rounding.
EMU_TARGET_AVX2 inline bool abs_max_avx2(const float* x, int vectors, float* m) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mx = _mm256_setzero_ps(), unordered = _mm256_setzero_ps();
  for (int i = 0; i < vectors; ++i) {
    const __m256 xi = _mm256_loadu_ps(x + 8 * i);
    mx = _mm256_max_ps(mx, _mm256_and_ps(xi, abs_mask));
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(xi, xi, _CMP_UNORD_Q));
  }
  if (_mm256_movemask_ps(unordered) != 0) return false;
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  *m = _mm_cvtss_f32(m4);
  return true;
}
#endif

}  // namespace emu_fast::kernels
