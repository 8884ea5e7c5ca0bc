// CPU GEMV inner loops with explicit AVX-512 / AVX2 code, picked once at run time from what the
// processor supports (so the build needs no -march flag), and a portable fallback.
//
// Four weight rows are dotted at once against the same input chunk: four independent FMA
// chains hide the FMA latency, and each input load feeds four FMAs. For batch > 1 the four rows
// (a few KB to tens of KB) stay in L1/L2 while every batch row passes over them, so the weights
// come from memory once per call.
#include "kernels/cpu/gemv.h"
#include "kernels/cpu/isa.h"

namespace emu_fast::kernels {
namespace {

constexpr int kRows = 4;

template <typename W>
void rows_portable(const W* w, const float* x, float* y, int64_t batch, int64_t k_dim, int64_t ldy,
                   int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n)
    for (int64_t b = 0; b < batch; ++b) y[b * ldy + n] = dot_portable(w + n * k_dim, x + b * k_dim, k_dim);
}

#ifdef EMU_X86

// ---- AVX-512: 16 floats a vector.
__attribute__((target("avx512f"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f"))) inline __m512 load16(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
__attribute__((target("avx512f"))) inline __m512 load16_masked(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16_masked(const bf16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <typename W>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void rows_avx512(
    const W* w, const float* x, float* y, int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin,
    int64_t n_end) {
  const int64_t k_main = k_dim & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (k_dim - k_main)) - 1u);
  int64_t n = n_begin;
  for (; n + kRows <= n_end; n += kRows) {
    const W* r0 = w + n * k_dim;
    const W* r1 = r0 + k_dim;
    const W* r2 = r1 + k_dim;
    const W* r3 = r2 + k_dim;
    const bool pf = n + 2 * kRows <= n_end;
    for (int64_t b = 0; b < batch; ++b) {
      const float* xb = x + b * k_dim;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t k = 0; k < k_main; k += 16) {
        if (b == 0 && pf) {  // pull the next block of rows toward L1 while this one computes
          _mm_prefetch(reinterpret_cast<const char*>(r0 + kRows * k_dim + k), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(r1 + kRows * k_dim + k), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(r2 + kRows * k_dim + k), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(r3 + kRows * k_dim + k), _MM_HINT_T0);
        }
        const __m512 xv = _mm512_loadu_ps(xb + k);
        a0 = _mm512_fmadd_ps(load16(r0 + k), xv, a0);
        a1 = _mm512_fmadd_ps(load16(r1 + k), xv, a1);
        a2 = _mm512_fmadd_ps(load16(r2 + k), xv, a2);
        a3 = _mm512_fmadd_ps(load16(r3 + k), xv, a3);
      }
      if (tail) {
        const __m512 xv = _mm512_maskz_loadu_ps(tail, xb + k_main);
        a0 = _mm512_fmadd_ps(load16_masked(r0 + k_main, tail), xv, a0);
        a1 = _mm512_fmadd_ps(load16_masked(r1 + k_main, tail), xv, a1);
        a2 = _mm512_fmadd_ps(load16_masked(r2 + k_main, tail), xv, a2);
        a3 = _mm512_fmadd_ps(load16_masked(r3 + k_main, tail), xv, a3);
      }
      float* yb = y + b * ldy + n;
      yb[0] = _mm512_reduce_add_ps(a0);
      yb[1] = _mm512_reduce_add_ps(a1);
      yb[2] = _mm512_reduce_add_ps(a2);
      yb[3] = _mm512_reduce_add_ps(a3);
    }
  }
  for (; n < n_end; ++n) {
    const W* r0 = w + n * k_dim;
    for (int64_t b = 0; b < batch; ++b) {
      const float* xb = x + b * k_dim;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0;
      int64_t k = 0;
      for (; k + 32 <= k_main; k += 32) {
        a0 = _mm512_fmadd_ps(load16(r0 + k), _mm512_loadu_ps(xb + k), a0);
        a1 = _mm512_fmadd_ps(load16(r0 + k + 16), _mm512_loadu_ps(xb + k + 16), a1);
      }
      for (; k < k_main; k += 16) a0 = _mm512_fmadd_ps(load16(r0 + k), _mm512_loadu_ps(xb + k), a0);
      if (tail) a1 = _mm512_fmadd_ps(load16_masked(r0 + k_main, tail), _mm512_maskz_loadu_ps(tail, xb + k_main), a1);
      y[b * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
  }
}

// ---- AVX2 + FMA: 8 floats a vector; the K tail goes scalar.
__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"))) inline __m256 load8(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// a[i] += the 8 products of row i's weights at k with x8 (8 inputs), for the kRows rows.
template <typename W>
__attribute__((target("avx2,fma"))) inline void dot8(const W* const* r, const float* x8, int64_t k, __m256* a) {
  const __m256 xv = _mm256_loadu_ps(x8);
  for (int i = 0; i < kRows; ++i) a[i] = _mm256_fmadd_ps(load8(r[i] + k), xv, a[i]);
}

template <typename W>
__attribute__((target("avx2,fma"))) void rows_avx2(const W* w, const float* x, float* y, int64_t batch,
                                                   int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end) {
  constexpr int64_t kLine = 64 / sizeof(W);  // elements per cache line
  const int64_t k_main = k_dim & ~int64_t(7), k_lines = k_dim / kLine * kLine;
  const int64_t ahead = gemv_prefetch_distance(kRows * k_dim * int64_t(sizeof(W))) / int64_t(sizeof(W));
  int64_t n = n_begin;
  for (; n + kRows <= n_end; n += kRows) {
    const W* r[kRows] = {w + n * k_dim, w + (n + 1) * k_dim, w + (n + 2) * k_dim, w + (n + 3) * k_dim};
    for (int64_t b = 0; b < batch; ++b) {
      const float* xb = x + b * k_dim;
      __m256 a[kRows] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      int64_t k = 0;
      // A cache line of each row at a time, the same line of a later block prefetched first
      // (prefetcht0 never faults: past the last rows it fetches nothing useful, harmlessly).
      for (; k < k_lines; k += kLine) {
        if (b == 0)
          for (int i = 0; i < kRows; ++i) _mm_prefetch(reinterpret_cast<const char*>(r[i] + ahead + k), _MM_HINT_T0);
        for (int64_t u = 0; u < kLine; u += 8) dot8(r, xb + k + u, k + u, a);
      }
      for (; k < k_main; k += 8) dot8(r, xb + k, k, a);
      float s[kRows] = {hsum8(a[0]), hsum8(a[1]), hsum8(a[2]), hsum8(a[3])};
      for (int64_t k = k_main; k < k_dim; ++k)
        for (int i = 0; i < kRows; ++i) s[i] += to_float(r[i][k]) * xb[k];
      for (int i = 0; i < kRows; ++i) y[b * ldy + n + i] = s[i];
    }
  }
  if (n < n_end) rows_portable(w, x, y, batch, k_dim, ldy, n, n_end);
}

template <typename W>
void dispatch(const W* w, const float* x, float* y, int64_t batch, int64_t k_dim, int64_t ldy,
              int64_t n_begin, int64_t n_end) {
  switch (active_isa()) {
    case Isa::kAvx512: return rows_avx512(w, x, y, batch, k_dim, ldy, n_begin, n_end);
    case Isa::kAvx2: return rows_avx2(w, x, y, batch, k_dim, ldy, n_begin, n_end);
    default: return rows_portable(w, x, y, batch, k_dim, ldy, n_begin, n_end);
  }
}

#else

template <typename W>
void dispatch(const W* w, const float* x, float* y, int64_t batch, int64_t k_dim, int64_t ldy,
              int64_t n_begin, int64_t n_end) {
  rows_portable(w, x, y, batch, k_dim, ldy, n_begin, n_end);
}

#endif

}  // namespace

void gemv_rows(const float* w, const float* x, float* y, int64_t batch, int64_t k_dim, int64_t ldy,
               int64_t n_begin, int64_t n_end) {
  dispatch(w, x, y, batch, k_dim, ldy, n_begin, n_end);
}

void gemv_rows(const bf16* w, const float* x, float* y, int64_t batch, int64_t k_dim, int64_t ldy,
               int64_t n_begin, int64_t n_end) {
  dispatch(w, x, y, batch, k_dim, ldy, n_begin, n_end);
}

}  // namespace emu_fast::kernels
