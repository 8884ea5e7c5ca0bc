// Weight-only int8 / int4 GEMV on CUDA cores: y[b, n] = sum_k x[b, k] W[n, k] with W dequantized
// in registers (never written out), float32 accumulation, y rounded to T once. The schemes and
// layouts are emu_fast/quant/schemes.py's and csrc/kernels/cpu/quantized_gemv.h's (the CPU kernels):
//   int8: q int8 [N, K], scales float32 [N]; y = scales[n] * sum_k q x (the scale after the sum).
//   int4: q uint8 [N, padded_k / 2] in blocks of 32 values = 16 bytes; byte i of block j holds
//         value 32 j + i in its low nibble and 32 j + 16 + i in its high nibble, as q + 8; scales
//         float32 [N, groups], a group a whole number of blocks; y = sum_blocks scale * sum q x.
// One warp per output row (kQGemvWarps rows a block); lane l takes the row's 16-byte vectors l,
// l + 32, ..., several of them loaded before any is used (a decode step is bound by reading the
// weights: int8 reads half the bytes of bf16, int4 a quarter, so the loads in flight must cover
// the same latency with fewer bytes each). No torch includes.
#pragma once
#include <type_traits>

#include "common.cuh"
#include "quantized_convert.cuh"
#include "quantized_mma_gemv.cuh"

namespace emu_fast::cuda {

constexpr int kQGemvWarps = 8;     // output rows per block
constexpr int kQGemvMaxBatch = 8;  // batch rows per launch; more run as several launches
constexpr int kQInt4Block = 32;    // int4 values per 16-byte vector

// 16 consecutive x values of one batch row as floats (aligned to 16 bytes).
template <typename T>
__device__ __forceinline__ void load_x16(const T* p, float (&out)[16]) {
  constexpr int kPer = 16 / sizeof(T);  // elements per 16-byte load
#pragma unroll
  for (int v = 0; v < 16 / kPer; ++v) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + v);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kPer; ++i) out[v * kPer + i] = to_f(e[i]);
  }
}

// kBatch: the template batch (1, 2, 4 or 8); rows b >= batch read row 0 and are not written.
// vec_ok: 16-byte vectors over whole rows (int4 always; int8 when K % 16 == 0 and the bases
// allow), else the scalar int8 loop. x: with vectors, rows readable and 16-byte aligned up to
// the vectors' end (int4: padded_k, zeros past K: the padding nibbles are 0 but 0 * NaN is not).
template <typename T, int kBatch, bool kInt4>
__global__ void __launch_bounds__(kQGemvWarps * 32)
quantized_gemv_kernel(const uint8_t* __restrict__ q, const float* __restrict__ scales, int64_t scale_ld, int group,
                      const T* __restrict__ x, int64_t ldx, T* __restrict__ y, int64_t ldy, int batch, int k_dim,
                      int n_rows, bool vec_ok) {
  const int lane = threadIdx.x & 31;
  const int want = blockIdx.x * kQGemvWarps + (threadIdx.x >> 5);
  const bool live = want < n_rows;  // every thread still waits (PDL, common.cuh)
  const int row = live ? want : n_rows - 1;
  const int64_t row_bytes = kInt4 ? (k_dim + kQInt4Block - 1) / kQInt4Block * (kQInt4Block / 2) : k_dim;
  const uint4* qr = reinterpret_cast<const uint4*>(q + static_cast<int64_t>(row) * row_bytes);
  const int vectors = vec_ok ? static_cast<int>(row_bytes / 16) : 0;
  const T* xb[kBatch];
#pragma unroll
  for (int b = 0; b < kBatch; ++b) xb[b] = x + (b < batch ? b : 0) * ldx;

  constexpr int kU = kBatch <= 2 ? 4 : 2;  // vectors in flight per lane
  uint4 wv[kU];
  auto load = [&](int v0) {
#pragma unroll
    for (int u = 0; u < kU; ++u) wv[u] = __ldcs(qr + v0 + u * 32);
  };
  int v = lane;
  bool full = v + (kU - 1) * 32 < vectors;
  if (full) load(v);  // weights: no kernel of the step writes them, so before the wait
  wait_for_prior_grid();
  allow_dependent_launch();

  float acc[kBatch];
#pragma unroll
  for (int b = 0; b < kBatch; ++b) acc[b] = 0.f;
  // acc[b] += the 16-byte vector vi of this row (16 int8 or 32 int4 values) . x[b].
  auto use = [&](const uint4& w, int vi) {
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};  // byte i is bits 8 (i % 4) of words[i / 4]
    if constexpr (kInt4) {
      const int k0 = vi * kQInt4Block;
      const float scale = scales[row * scale_ld + k0 / group];
      float lo[16], hi[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        lo[i] = nibble_value(words[i / 4], 8 * (i % 4));
        hi[i] = nibble_value(words[i / 4], 8 * (i % 4) + 4);
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        float xl[16], xh[16];
        load_x16(xb[b] + k0, xl);
        load_x16(xb[b] + k0 + 16, xh);
        float s = 0.f;  // two FFMAs a pair (not FMUL + FFMA + FADD)
#pragma unroll
        for (int i = 0; i < 16; ++i) s = fmaf(hi[i], xh[i], fmaf(lo[i], xl[i], s));
        acc[b] = fmaf(scale, s, acc[b]);
      }
    } else {
      float wf[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) wf[i] = int8_value(words[i / 4], 8 * (i % 4));
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        float xv[16];
        load_x16(xb[b] + vi * 16, xv);
#pragma unroll
        for (int i = 0; i < 16; ++i) acc[b] += wf[i] * xv[i];
      }
    }
  };
  if (vec_ok) {
    while (full) {
#pragma unroll
      for (int u = 0; u < kU; ++u) use(wv[u], v + u * 32);
      v += kU * 32;
      full = v + (kU - 1) * 32 < vectors;
      if (full) load(v);
    }
    for (; v < vectors; v += 32) use(__ldcs(qr + v), v);  // the row's last vectors, fewer than kU
  } else if constexpr (!kInt4) {
    const int8_t* qs = reinterpret_cast<const int8_t*>(q) + static_cast<int64_t>(row) * row_bytes;
    for (int k = lane; k < k_dim; k += 32) {
      const float wk = static_cast<float>(qs[k]);
#pragma unroll
      for (int b = 0; b < kBatch; ++b) acc[b] += wk * to_f(xb[b][k]);
    }
  }
#pragma unroll
  for (int b = 0; b < kBatch; ++b) {
    const float s = warp_sum(acc[b]);
    if (lane == 0 && live && b < batch) y[b * ldy + row] = from_f<T>(kInt4 ? s : s * scales[row]);
  }
}

// Whether x can be read in place with vectors: rows 16-byte aligned, K (int8) or padded_k
// (int4: the caller pads x with zeros otherwise) within each row.
template <typename T>
bool quantized_gemv_x_ok(const T* x, int64_t ldx, int64_t k_dim, bool int4) {
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0 && (ldx * sizeof(T)) % 16 == 0;
  return aligned && (int4 ? k_dim % kQInt4Block == 0 : k_dim % 16 == 0);
}

// The op's launch: batch rows in launches of up to kQGemvMaxBatch, on the tensor-core or the
// CUDA-core kernel. x as the kernels need it (int4: padded and aligned; int8: quantized_gemv_x_ok,
// or any x with the scalar loop, taken when !quantized_gemv_x_ok or q is not 16-byte aligned).
// Nothing to do for empty input.
template <typename T, bool kInt4>
cudaError_t launch_quantized_gemv(const uint8_t* q, const float* scales, int64_t scale_ld, int group, const T* x,
                                  int64_t ldx, T* y, int64_t ldy, int64_t batch, int k_dim, int n_rows,
                                  cudaStream_t stream) {
  if (batch == 0 || n_rows == 0) return cudaSuccess;
  const bool q_aligned = reinterpret_cast<uintptr_t>(q) % 16 == 0;
  // bf16 activations: the tensor-core kernel (quantized_mma_gemv.cuh) for int4 in groups of whole
  // 128-input steps, and for int8 read with vectors; else the CUDA-core kernel above.
  bool mma = false;
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    mma = q_aligned && (kInt4 ? group % kQMmaInt4Step == 0 : quantized_gemv_x_ok(x, ldx, k_dim, false));
  const bool vec_ok = kInt4 || (q_aligned && quantized_gemv_x_ok(x, ldx, k_dim, false));
  static_assert(kQMmaMaxBatch == kQGemvMaxBatch && kQMmaWarps == kQGemvWarps, "one launch shape for both kernels");
  const int rows_per_block = mma ? kQMmaRows : kQGemvWarps;
  const dim3 grid((n_rows + rows_per_block - 1) / rows_per_block), block(kQGemvWarps * 32);
  for (int64_t b0 = 0; b0 < batch; b0 += kQGemvMaxBatch) {
    const int b = static_cast<int>(batch - b0 < kQGemvMaxBatch ? batch - b0 : kQGemvMaxBatch);
    const T* xc = x + b0 * ldx;
    T* yc = y + b0 * ldy;
    if (mma) {
      if constexpr (std::is_same_v<T, __nv_bfloat16>)
        EMU_FAST_LAUNCH_PDL(grid, block, stream, quantized_mma_gemv_kernel<T, kInt4>)(q, scales, scale_ld, group, xc,
                                                                                      ldx, yc, ldy, b, k_dim, n_rows);
    } else if (b <= 1)
      EMU_FAST_LAUNCH_PDL(grid, block, stream, quantized_gemv_kernel<T, 1, kInt4>)(q, scales, scale_ld, group, xc, ldx,
                                                                                    yc, ldy, b, k_dim, n_rows, vec_ok);
    else if (b <= 2)
      EMU_FAST_LAUNCH_PDL(grid, block, stream, quantized_gemv_kernel<T, 2, kInt4>)(q, scales, scale_ld, group, xc, ldx,
                                                                                    yc, ldy, b, k_dim, n_rows, vec_ok);
    else if (b <= 4)
      EMU_FAST_LAUNCH_PDL(grid, block, stream, quantized_gemv_kernel<T, 4, kInt4>)(q, scales, scale_ld, group, xc, ldx,
                                                                                    yc, ldy, b, k_dim, n_rows, vec_ok);
    else
      EMU_FAST_LAUNCH_PDL(grid, block, stream, quantized_gemv_kernel<T, 8, kInt4>)(q, scales, scale_ld, group, xc, ldx,
                                                                                    yc, ldy, b, k_dim, n_rows, vec_ok);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace emu_fast::cuda

EMU_FAST_INSTANTIATE_LAUNCHERS(quantized_gemv,
  launch_quantized_gemv<T, false>(nullptr, nullptr, 1, 0, nullptr, 16, nullptr, 8, 1, 16, 8, nullptr);
  launch_quantized_gemv<T, true>(nullptr, nullptr, 1, 32, nullptr, 32, nullptr, 8, 1, 32, 8, nullptr);)
