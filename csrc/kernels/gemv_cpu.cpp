// CPU GEMV inner loops. Built once per instruction set (AVX-512, AVX2, baseline) with gcc's
// target_clones and picked at load time, so the wheel needs no -march flag.
#include "kernels/gemv.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EMU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define EMU_MULTIVERSION
#endif

namespace emu_fast::kernels {
namespace {

// 32 independent float lanes: two AVX-512 (four AVX2) accumulators, enough to hide FMA
// latency so the loop runs at memory speed. The j-loop vectorizes without -ffast-math
// because each lane is its own sum.
constexpr int kLanes = 32;

template <typename W>
inline float dot(const W* __restrict w, const float* __restrict x, int64_t k_dim) {
  float acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= k_dim; k += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += to_float(w[k + j]) * x[k + j];
  }
  float tail = 0.f;
  for (; k < k_dim; ++k) tail += to_float(w[k]) * x[k];
  for (int j = kLanes / 2; j >= 1; j /= 2)
    for (int i = 0; i < j; ++i) acc[i] += acc[i + j];
  return acc[0] + tail;
}

template <typename W>
inline void rows(const W* w, const float* x, float* y, int64_t batch, int64_t k_dim, int64_t ldy,
                 int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const W* row = w + n * k_dim;
    for (int64_t b = 0; b < batch; ++b) y[b * ldy + n] = dot(row, x + b * k_dim, k_dim);
  }
}

}  // namespace

EMU_MULTIVERSION
void gemv_rows(const float* w, const float* x, float* y, int64_t batch, int64_t k_dim,
               int64_t ldy, int64_t n_begin, int64_t n_end) {
  rows(w, x, y, batch, k_dim, ldy, n_begin, n_end);
}

EMU_MULTIVERSION
void gemv_rows(const bf16* w, const float* x, float* y, int64_t batch, int64_t k_dim,
               int64_t ldy, int64_t n_begin, int64_t n_end) {
  rows(w, x, y, batch, k_dim, ldy, n_begin, n_end);
}

}  // namespace emu_fast::kernels
