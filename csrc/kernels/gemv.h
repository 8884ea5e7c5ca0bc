// Small-batch matrix-vector products, y = x W^T, the shape of every decode-step projection.
// Weights are row-major [N, K] (torch.nn.Linear layout) and are streamed from memory once per
// call for the whole batch: each weight row is read into L1 and dotted with all B inputs.
#pragma once
#include <cstdint>

#include "kernels/scalar.h"

namespace emu_fast::kernels {

// For n in [n_begin, n_end), b < batch: y[b * ldy + n] = sum_k w[n * k_dim + k] * x[b * k_dim + k].
// x is float32 (the caller widens bf16 activations once); accumulation is float32.
void gemv_rows(const float* w, const float* x, float* y, int64_t batch, int64_t k_dim,
               int64_t ldy, int64_t n_begin, int64_t n_end);
void gemv_rows(const bf16* w, const float* x, float* y, int64_t batch, int64_t k_dim,
               int64_t ldy, int64_t n_begin, int64_t n_end);

}  // namespace emu_fast::kernels
