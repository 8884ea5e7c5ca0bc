// Weight-only int8 / int4 GEMV on tensor cores, bf16 activations: y = x W^T with W in the
// layouts of quantized_gemv.cuh (int8: q [N, K], a float32 scale a row; int4: blocks of 32
// values in 16 bytes, byte i = value i (low nibble) and value i + 16 (high nibble), stored as
// q + 8, float32 scales per group of `group` inputs, here group % 128 == 0).
//
// The CUDA-core kernel converts and multiplies every value on its own, once per batch row:
// about 230 instructions per 16 bytes of int4 at batch 1, 420 per 16 bytes of int8 at batch 8,
// several times what reading them at full bandwidth allows. Here the weights become exact bf16
// pairs and m16n8k16 mmas do the products, the batch (up to 8 rows) riding along as the mma's N:
//   int4: a LOP3 puts two nibbles under the bf16 exponent of 128 (0x4300 | u = 128 + u) and one
//         bf16x2 FMA takes 136 off: q exactly, two values in two instructions.
//   int8: each byte becomes its float by bits (int8_value, quantized_gemv.cuh) and two floats
//         pack into a bf16 pair (exact: bf16 holds every integer of [-128, 127]).
//
// One block of kQMmaWarps warps per 16 output rows; warp w takes the steps w, w + kQMmaWarps, ...
// In a step, lane 4 g + t loads the 16-byte vector 4 c + t of row g and of row g + 8 (int4: 32
// inputs, a step 128; int8: 16 inputs, a step 64) and the x values of batch row g at the same
// inputs. Which input an mma k-slot stands for does not change the sum, so each lane pairs the
// values the way its registers hold them, x permuted to match (int4: word j gives the pairs
// (4j, 4j+2), (16+4j, 16+4j+2), (4j+1, 4j+3), (16+4j+1, 16+4j+3); int8: consecutive pairs, as x
// lies in memory). int4 steps lie in one group each (group % 128 == 0): each step's fp32 tile is
// scaled by its rows' group scales and added up; int8's per-row scale multiplies the sum once.
// The weight the mmas see is exactly q, each product q * x is exact in fp32, the scales multiply
// in fp32. The warps' tiles are summed in shared memory; y is rounded to T once. No torch
// includes.
#pragma once
#include <type_traits>

#include "common.cuh"
#include "mma.cuh"
#include "quantized_convert.cuh"

namespace emu_fast::cuda {

constexpr int kQMmaRows = 16;      // output rows per block (the mma's M)
constexpr int kQMmaWarps = 8;      // warps per block, splitting K
constexpr int kQMmaInFlight = 4;   // steps whose weights each lane has loaded ahead
constexpr int kQMmaMaxBatch = 8;   // batch rows per launch (the mma's N)
constexpr int kQMmaInt4Step = 128; // int4 inputs per warp step (4 lanes x 32); groups are whole steps

// bf16 activations only (the caller sends others to the CUDA-core kernel). x rows 16-byte
// aligned and readable up to the weight rows' last vector, zeros past K (int4's padded row); q
// 16-byte aligned; int8: K % 16 == 0. batch <= kQMmaMaxBatch (columns g >= batch read nothing and
// are not written); rows past n_rows read the last row and are not written.
template <typename T, bool kInt4>
__global__ void __launch_bounds__(kQMmaWarps * 32)
quantized_mma_gemv_kernel(const uint8_t* __restrict__ q, const float* __restrict__ scales, int64_t scale_ld,
                          int group, const T* __restrict__ x, int64_t ldx, T* __restrict__ y, int64_t ldy, int batch,
                          int k_dim, int n_rows) {
  static_assert(std::is_same_v<T, __nv_bfloat16>, "quantized_mma_gemv_kernel takes bf16 activations");
  constexpr int kInputs = kInt4 ? 32 : 16;  // inputs per 16-byte weight vector
  constexpr uint32_t kZero = kInt4 ? 0x88888888u : 0u;  // a vector of value-0 weights
  __shared__ float tile[kQMmaWarps][kQMmaRows][8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * kQMmaRows;
  const int r_lo = min(row0 + g, n_rows - 1), r_hi = min(row0 + g + 8, n_rows - 1);
  const int vectors = (k_dim + kInputs - 1) / kInputs;  // 16-byte vectors a row
  const uint4* w_lo = reinterpret_cast<const uint4*>(q) + static_cast<int64_t>(r_lo) * vectors;
  const uint4* w_hi = reinterpret_cast<const uint4*>(q) + static_cast<int64_t>(r_hi) * vectors;
  const bool x_live = g < batch;
  const uint4* xr = reinterpret_cast<const uint4*>(x + (x_live ? g : 0) * ldx);  // 8 values a uint4
  const int steps = (vectors + 3) / 4;

  uint4 lo[kQMmaInFlight], hi[kQMmaInFlight];
  // Lane t's vector of step c (past the row's last vector: value 0, and x is zero there too).
  auto fetch = [&](const uint4* row, int c) {
    const int v = 4 * c + t;
    return v < vectors ? __ldcs(row + v) : make_uint4(kZero, kZero, kZero, kZero);
  };
  auto load = [&](int c0) {
#pragma unroll
    for (int u = 0; u < kQMmaInFlight; ++u) {
      lo[u] = fetch(w_lo, c0 + u * kQMmaWarps);
      hi[u] = fetch(w_hi, c0 + u * kQMmaWarps);
    }
  };
  int c = warp;
  bool full = c + (kQMmaInFlight - 1) * kQMmaWarps < steps;
  if (full) load(c);  // weights: no kernel of the step writes them, so before the wait (PDL)
  wait_for_prior_grid();
  allow_dependent_launch();

  float acc[4] = {0.f, 0.f, 0.f, 0.f};  // D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1]
  auto step = [&](const uint4& wl, const uint4& wh, int c_step) {
    const int v = 4 * c_step + t;
    constexpr int kXVectors = kInputs / 8;
    uint4 xv[kXVectors] = {};  // x at the vector's inputs, batch row g
    if (x_live && v < vectors) {
#pragma unroll
      for (int m = 0; m < kXVectors; ++m) xv[m] = __ldg(xr + kXVectors * v + m);
    }
    const uint32_t lw[4] = {wl.x, wl.y, wl.z, wl.w}, hw[4] = {wh.x, wh.y, wh.z, wh.w};
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    if constexpr (kInt4) {
      const uint32_t xw[16] = {xv[0].x, xv[0].y, xv[0].z, xv[0].w, xv[1].x, xv[1].y, xv[1].z, xv[1].w,
                               xv[2].x, xv[2].y, xv[2].z, xv[2].w, xv[3].x, xv[3].y, xv[3].z, xv[3].w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        // x words holding x[4j .. 4j+3] and x[16+4j .. 16+4j+3] (two values a word)
        const uint32_t x0 = xw[2 * j], x1 = xw[2 * j + 1], x2 = xw[8 + 2 * j], x3 = xw[8 + 2 * j + 1];
        // pairs (4j, 4j+2), (16+4j, 16+4j+2) | (4j+1, 4j+3), (16+4j+1, 16+4j+3)
        const uint32_t a1[4] = {nibble_pair_bf16(lw[j], 0), nibble_pair_bf16(hw[j], 0), nibble_pair_bf16(lw[j], 4),
                                nibble_pair_bf16(hw[j], 4)};
        const uint32_t b1[2] = {byte_perm(x0, x1, 0x5410), byte_perm(x2, x3, 0x5410)};
        const uint32_t a2[4] = {nibble_pair_bf16(lw[j], 8), nibble_pair_bf16(hw[j], 8),
                                nibble_pair_bf16(lw[j], 12), nibble_pair_bf16(hw[j], 12)};
        const uint32_t b2[2] = {byte_perm(x0, x1, 0x7632), byte_perm(x2, x3, 0x7632)};
        mma_16816<T>(d, a1, b1);
        mma_16816<T>(d, a2, b2);
      }
      // one group for all 128 inputs of the step: scale this step's tile by its rows' scales
      const int gi = c_step * kQMmaInt4Step / group;
      const float s_lo = __ldg(scales + r_lo * scale_ld + gi), s_hi = __ldg(scales + r_hi * scale_ld + gi);
      acc[0] = fmaf(s_lo, d[0], acc[0]);
      acc[1] = fmaf(s_lo, d[1], acc[1]);
      acc[2] = fmaf(s_hi, d[2], acc[2]);
      acc[3] = fmaf(s_hi, d[3], acc[3]);
    } else {
      const uint32_t xw[8] = {xv[0].x, xv[0].y, xv[0].z, xv[0].w, xv[1].x, xv[1].y, xv[1].z, xv[1].w};
#pragma unroll
      for (int j = 0; j < 4; j += 2) {  // words j, j + 1: inputs 4j .. 4j + 7, pairs as in memory
        const uint32_t a[4] = {int8_pair_bf16(lw[j], 0), int8_pair_bf16(hw[j], 0), int8_pair_bf16(lw[j], 16),
                               int8_pair_bf16(hw[j], 16)};
        const uint32_t b[2] = {xw[2 * j], xw[2 * j + 1]};
        const uint32_t a2[4] = {int8_pair_bf16(lw[j + 1], 0), int8_pair_bf16(hw[j + 1], 0),
                                int8_pair_bf16(lw[j + 1], 16), int8_pair_bf16(hw[j + 1], 16)};
        const uint32_t b2[2] = {xw[2 * j + 2], xw[2 * j + 3]};
        mma_16816<T>(d, a, b);
        mma_16816<T>(d, a2, b2);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i] += d[i];
    }
  };
  while (full) {
#pragma unroll
    for (int u = 0; u < kQMmaInFlight; ++u) step(lo[u], hi[u], c + u * kQMmaWarps);
    c += kQMmaInFlight * kQMmaWarps;
    full = c + (kQMmaInFlight - 1) * kQMmaWarps < steps;
    if (full) load(c);
  }
  for (; c < steps; c += kQMmaWarps) step(fetch(w_lo, c), fetch(w_hi, c), c);  // the last, fewer than kQMmaInFlight

  if constexpr (!kInt4) {  // int8: one scale a row, after the sum
    const float s_lo = __ldg(scales + r_lo), s_hi = __ldg(scales + r_hi);
    acc[0] *= s_lo;
    acc[1] *= s_lo;
    acc[2] *= s_hi;
    acc[3] *= s_hi;
  }
  tile[warp][g][2 * t] = acc[0];
  tile[warp][g][2 * t + 1] = acc[1];
  tile[warp][g + 8][2 * t] = acc[2];
  tile[warp][g + 8][2 * t + 1] = acc[3];
  __syncthreads();
  for (int i = threadIdx.x; i < kQMmaRows * 8; i += blockDim.x) {
    const int m = i / 8, b = i % 8;
    if (b >= batch || row0 + m >= n_rows) continue;
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < kQMmaWarps; ++v) sum += tile[v][m][b];
    y[b * ldy + row0 + m] = from_f<T>(sum);
  }
}

}  // namespace emu_fast::cuda
