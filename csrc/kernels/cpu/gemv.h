// Small-batch matrix-vector products, y = x W^T, the shape of every decode-step projection.
// Weights are row-major [N, K] (torch.nn.Linear layout) and are streamed from memory once per
// call for the whole batch: each weight row is read into L1 and dotted with all B inputs.
#pragma once
#include <cstdint>

#include "kernels/cpu/scalar.h"

namespace emu_fast::kernels {

// How far ahead of the rows it reads a GEMV prefetches (bytes), given the bytes of one block of
// rows it dots at once: whole blocks, at least 4 KB. The hardware prefetcher alone falls behind
// on short rows (a K = 512 bf16 row is 16 cache lines, too short a stream for it to ramp up);
// 4 KB is a few hundred ns of one core's share of DRAM bandwidth, more than its latency.
inline int64_t gemv_prefetch_distance(int64_t block_bytes) {
  constexpr int64_t kMin = 4096;
  if (block_bytes <= 0) return 0;  // K = 0: nothing is read
  return block_bytes * ((kMin + block_bytes - 1) / block_bytes);
}

// For n in [n_begin, n_end), b < batch: y[b * ldy + n] = sum_k w[n * k_dim + k] * x[b * k_dim + k].
// x is float32 (the caller widens bf16 activations once); accumulation is float32.
void gemv_rows(const float* w, const float* x, float* y, int64_t batch, int64_t k_dim,
               int64_t ldy, int64_t n_begin, int64_t n_end);
void gemv_rows(const bf16* w, const float* x, float* y, int64_t batch, int64_t k_dim,
               int64_t ldy, int64_t n_begin, int64_t n_end);

}  // namespace emu_fast::kernels
