// Small-batch matrix-vector products with weight-only quantized weights, y = x W^T, W [N, K]
// dequantized in registers (never written out), float32 accumulation. The schemes are defined
// in emu_fast/quantize.py (the Python oracle); the layouts the kernels read:
//
// int8: q int8 [N, K] row-major, scales float32 [N]; W[n, k] = q[n, k] * scales[n].
//   y[b, n] = scales[n] * sum_k q[n, k] * x[b, k].
//
// int4: q uint8 [N, padded_k(K) / 2], scales float32 [N, ceil(K / group)]; group a multiple of
//   kInt4Block. K is cut into blocks of kInt4Block = 32 values (the last one zero-padded); the 32
//   values of block j are the 16 bytes q[n, 16 j .. 16 j + 15]: byte i holds value 32 j + i in
//   its low nibble and value 32 j + 16 + i in its high nibble, each stored as q + 8 (q in
//   [-8, 7]; the quantizer writes [-7, 7], padding writes 8 = value 0).
//   W[n, k] = (nibble - 8) * scales[n, k / group].
//   y[b, n] = sum_g scales[n, g] * sum_{k in group g} (nibble - 8) * x[b, k].
//   The low/high split by 16 lets one byte load widen to two runs of 16 consecutive values
//   (AVX-512: one vector each; AVX2: two), with no shuffle of the weights or of x.
#pragma once
#include <cstdint>

#include "kernels/multiversion.h"

namespace emu_fast::kernels {

constexpr int64_t kInt4Block = 32;

inline int64_t int4_padded_k(int64_t k_dim) { return (k_dim + kInt4Block - 1) / kInt4Block * kInt4Block; }
inline int64_t int4_row_bytes(int64_t k_dim) { return int4_padded_k(k_dim) / 2; }
inline int64_t int4_groups(int64_t k_dim, int64_t group) { return (k_dim + group - 1) / group; }

// For n in [n_begin, n_end), b < batch: y[b * ldy + n] = the int8 product above.
// x float32 [batch, k_dim], contiguous (the caller widens bf16 activations once).
void gemv_int8_rows(const int8_t* q, const float* scales, const float* x, float* y, int64_t batch,
                    int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end);

// The int4 product above. x float32 [batch, int4_padded_k(k_dim)] with zeros past k_dim.
void gemv_int4_rows(const uint8_t* q, const float* scales, int64_t group, const float* x, float* y,
                    int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end);

// The instruction set the two functions above use: cpu_isa(), or a lower one set by
// set_quantized_gemv_isa (a test hook, so every path runs on a processor that has a better
// one). Returns false, changing nothing, for an instruction set this processor lacks.
Isa quantized_gemv_isa();
bool set_quantized_gemv_isa(Isa isa);

}  // namespace emu_fast::kernels
