// Horizontal sums shared by the x86 CPU kernels (gemv_cpu.cpp, quantized_gemv*_cpu.cpp).
#pragma once
#include "kernels/cpu/multiversion.h"

#ifdef EMU_X86
#include <immintrin.h>

namespace emu_fast::kernels {

// The sum of the 8 floats of v: an AVX2 loop's row total.
__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace emu_fast::kernels
#endif
