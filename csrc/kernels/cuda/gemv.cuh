// Small-batch GEMV, y[b, n] = sum_k x'[b, k] W[n, k], for the decode step's projections.
// One warp per output row; lanes stream the row in 16-byte vectors and dot it with every batch
// row, so the weights are read once for the whole batch. With kNorm the kernel first applies
// RMSNorm to x (x' = round(norm_w * round(x * inv_rms(x)))), the regression head's prologue,
// so the normalized activations never go through memory. With a residual (row stride ldr), the
// epilogue adds it: y = round(residual + round(x' W^T)), as ATen's residual + linear(x, W) rounds
// (the o and down projections' residual add). Accumulation is float32.
#pragma once
#include "common.cuh"
#include "norm.cuh"
#include "mma.cuh"
#include "ops/limits.h"

namespace emu_fast::cuda {

constexpr int kGemvWarps = 8;  // rows per block

// The epilogue: the dot product s rounded to T, then, with a residual, the residual added and
// rounded again (the sum as ATen's residual + linear(...) gives it).
template <typename T>
__device__ __forceinline__ T gemv_out(float s, const T* residual, int64_t i) {
  return residual != nullptr ? from_f<T>(to_f(residual[i]) + round_to<T>(s)) : from_f<T>(s);
}

// The norm prologue: inv_rms[b] = 1 / sqrt(mean(x[b]^2) + eps) for each batch row, by the whole
// block (`red`: 32 floats of shared scratch); every thread sees the results after the barrier.
template <typename T>
__device__ __forceinline__ void block_inv_rms(const T* x, int64_t ldx, int batch, int k_dim, float eps,
                                              float* inv_rms, float* red) {
#pragma unroll 1
  for (int b = 0; b < batch; ++b) {
    float ss = 0.f;
    for (int k = threadIdx.x; k < k_dim; k += blockDim.x) {
      const float v = to_f(x[b * ldx + k]);
      ss += v * v;
    }
    ss = block_sum(ss, red);
    if (threadIdx.x == 0) inv_rms[b] = rsqrtf(ss / static_cast<float>(k_dim) + eps);
  }
  __syncthreads();
}

// 16-byte weight vectors each lane loads before using any (the loads in flight per lane): enough
// that a warp keeps 1-2 KB of a row on its way from DRAM while it multiplies the previous ones.
// Fewer at larger batches, whose accumulators and x loads take the registers.
template <int kBatch>
constexpr int kGemvVectorsInFlight = kBatch <= 2 ? 4 : 2;

// kBatch is the exact number of batch rows (1..kGemvMaxBatch; one instance each), so no
// per-row branch sits in the inner loop and each weight is converted to float once per load.
template <typename T, int kBatch, bool kNorm>
__global__ void __launch_bounds__(kGemvWarps * 32)
gemv_kernel(const T* __restrict__ w, const T* __restrict__ x, T* __restrict__ y,
            const T* __restrict__ norm_w, float eps, int k_dim, int n_rows, int64_t ldx, int64_t ldy,
            const T* __restrict__ residual, int64_t ldr) {
  __shared__ float inv_rms[kBatch];
  __shared__ float red[32];
  wait_for_prior_grid();  // PDL (common.cuh); this kernel serves fp32 and odd shapes: no prefetch
  allow_dependent_launch();
  if constexpr (kNorm) block_inv_rms(x, ldx, kBatch, k_dim, eps, inv_rms, red);
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * kGemvWarps + (threadIdx.x >> 5);
  if (row >= n_rows) return;
  const T* wr = w + static_cast<int64_t>(row) * k_dim;

  auto xval = [&](int b, int k, float raw) {
    if constexpr (kNorm) return round_to<T>(to_f(norm_w[k]) * round_to<T>(raw * inv_rms[b]));
    else return raw;
  };

  float acc[kBatch];
#pragma unroll
  for (int b = 0; b < kBatch; ++b) acc[b] = 0.f;

  constexpr int kN = Vec16<T>::kN;
  // acc[b] += w[k .. k+kN) . x'[b, k .. k+kN), the weights already in floats.
  auto dot = [&](const float (&wf)[kN], int k) {
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const Vec16<T> xv = load_vec16(x + b * ldx + k);
#pragma unroll
      for (int i = 0; i < kN; ++i) acc[b] += wf[i] * xval(b, k + i, xv[i]);
    }
  };
  const bool vec_ok = (k_dim % kN == 0) && (ldx % kN == 0) &&
                      (reinterpret_cast<uintptr_t>(w) % 16 == 0) && (reinterpret_cast<uintptr_t>(x) % 16 == 0);
  if (vec_ok) {
    constexpr int kU = kGemvVectorsInFlight<kBatch>;
    constexpr int kStride = 32 * kN;  // elements between a lane's consecutive vectors
    int k = lane * kN;
    // kU vectors per lane per iteration, all loaded before any is used (no branch between the
    // loads: the loop bound keeps every one of them inside the row).
    for (; k + (kU - 1) * kStride < k_dim; k += kU * kStride) {
      Vec16<T> wv[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) wv[u] = load_vec16_stream(wr + k + u * kStride);
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        float wf[kN];
#pragma unroll
        for (int i = 0; i < kN; ++i) wf[i] = wv[u][i];
        dot(wf, k + u * kStride);
      }
    }
    for (; k < k_dim; k += kStride) {  // the row's last vectors, fewer than kU per lane
      const Vec16<T> wv = load_vec16_stream(wr + k);
      float wf[kN];
#pragma unroll
      for (int i = 0; i < kN; ++i) wf[i] = wv[i];
      dot(wf, k);
    }
  } else {
    for (int k = lane; k < k_dim; k += 32) {
      const float wk = to_f(wr[k]);
#pragma unroll
      for (int b = 0; b < kBatch; ++b) acc[b] += wk * xval(b, k, to_f(x[b * ldx + k]));
    }
  }
#pragma unroll
  for (int b = 0; b < kBatch; ++b) {
    const float s = warp_sum(acc[b]);
    if (lane == 0) y[b * ldy + row] = gemv_out(s, residual, b * ldr + row);
  }
}

// 16-bit weights on tensor cores: one block of kGemvWarps warps per 16 output rows, the batch as
// the mma's N (kTiles tiles of 8 rows: batches up to 8 or 16). Warp w takes the 32-element
// chunks w, w + kGemvWarps, ... of K; per chunk, lane 4 g + t loads 16 bytes of weight row g and
// of row g + 8 (elements 8t .. 8t+7) and 16 bytes of batch row g's x, and issues two m16n8k16
// mmas. Any order of k inside a chunk gives the same sum, so A and B are loaded in the order
// that makes each lane's loads 16 bytes wide: mma k pairs (2t, 2t+1 | 2t+8, 2t+9) stand for the
// chunk's elements (8t, 8t+1 | 8t+2, 8t+3) in the first mma and (8t+4, 8t+5 | 8t+6, 8t+7) in the
// second. A few instructions per 16 bytes of weight (the CUDA-core kernel above needs ~40 at
// batch 1 and ~200 at batch 8, converting every element). The warps' partial tiles are summed
// in shared memory. With kNorm, x is RMS-normalized on the way in, as gemv_kernel does.
// With kSilu (w = [gate rows; up rows], n_rows = 2 * inter, inter % 8 == 0), block j takes gate
// rows [8j, 8j + 8) as its first 8 rows and the matching up rows [inter + 8j, inter + 8j + 8) as
// its last 8, and the epilogue writes y[b, 8j + m] = silu(gate) * up, each product rounded to T
// first (as norm_gemv then silu_mul round it; y has inter columns).
constexpr int kMmaRows = 16;   // output rows per block
constexpr int kMmaChunk = 32;  // K elements per warp per step
constexpr int kMmaChunksInFlight = 4;

template <typename T, int kTiles, bool kNorm, bool kSilu = false>
__global__ void __launch_bounds__(kGemvWarps * 32, 2)
gemv_mma_kernel(const T* __restrict__ w, const T* __restrict__ x, T* __restrict__ y,
                const T* __restrict__ norm_w, float eps, int batch, int k_dim, int n_rows, int64_t ldx, int64_t ldy,
                const T* __restrict__ residual, int64_t ldr) {
  __shared__ float inv_rms[8 * kTiles];
  __shared__ float red[32];
  __shared__ float tile[kGemvWarps][kMmaRows][8 * kTiles];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * kMmaRows;
  const int lo_row = kSilu ? blockIdx.x * 8 + g : row0 + g;
  const int hi_row = kSilu ? n_rows / 2 + blockIdx.x * 8 + g : row0 + g + 8;
  // Rows past the end read the last row (a valid address) and are never written.
  const T* w_lo = w + static_cast<int64_t>(min(lo_row, n_rows - 1)) * k_dim + 8 * t;
  const T* w_hi = w + static_cast<int64_t>(min(hi_row, n_rows - 1)) * k_dim + 8 * t;
  // B's column g of tile j is batch row 8 j + g (zeros past the batch).
  const T* x_row[kTiles];
  bool x_live[kTiles];
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
    x_live[j] = 8 * j + g < batch;
    x_row[j] = x + (x_live[j] ? 8 * j + g : 0) * ldx + 8 * t;
  }
  const int chunks = k_dim / kMmaChunk;
  int c = warp;
  // kMmaChunksInFlight chunks per iteration, every weight load issued before the first mma.
  uint4 lo[kMmaChunksInFlight], hi[kMmaChunksInFlight];
  auto load_weights = [&](int c0) {
#pragma unroll
    for (int u = 0; u < kMmaChunksInFlight; ++u) {
      const int k = (c0 + u * kGemvWarps) * kMmaChunk;
      lo[u] = __ldcs(reinterpret_cast<const uint4*>(w_lo + k));
      hi[u] = __ldcs(reinterpret_cast<const uint4*>(w_hi + k));
    }
  };
  bool full = c + (kMmaChunksInFlight - 1) * kGemvWarps < chunks;
  // The first weights are on their way before the wait (PDL, common.cuh: no kernel of the step
  // writes them), while the kernel that produces x drains.
  if (full) load_weights(c);
  wait_for_prior_grid();
  allow_dependent_launch();
  if constexpr (kNorm) block_inv_rms(x, ldx, batch, k_dim, eps, inv_rms, red);
  float d[kTiles][4];
#pragma unroll
  for (int j = 0; j < kTiles; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) d[j][i] = 0.f;

  // B for one chunk at k (this lane's 8 elements of x, normalized with kNorm), as mma pairs.
  auto x_pairs = [&](int j, int k) {
    uint4 v = x_live[j] ? __ldg(reinterpret_cast<const uint4*>(x_row[j] + k)) : make_uint4(0, 0, 0, 0);
    if constexpr (kNorm) {
      if (x_live[j]) {
        const uint4 nw = __ldg(reinterpret_cast<const uint4*>(norm_w + k + 8 * t));
        T* e = reinterpret_cast<T*>(&v);
        const T* n = reinterpret_cast<const T*>(&nw);
        const float r = inv_rms[8 * j + g];
#pragma unroll
        for (int i = 0; i < 8; ++i) e[i] = from_f<T>(to_f(n[i]) * round_to<T>(to_f(e[i]) * r));
      }
    }
    return v;
  };
  auto step = [&](const uint4& lo, const uint4& hi, int k) {
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
      const uint4 xv = x_pairs(j, k);
      const uint32_t a1[4] = {lo.x, hi.x, lo.y, hi.y}, b1[2] = {xv.x, xv.y};
      const uint32_t a2[4] = {lo.z, hi.z, lo.w, hi.w}, b2[2] = {xv.z, xv.w};
      mma_16816<T>(d[j], a1, b1);
      mma_16816<T>(d[j], a2, b2);
    }
  };
  while (full) {
#pragma unroll
    for (int u = 0; u < kMmaChunksInFlight; ++u) step(lo[u], hi[u], (c + u * kGemvWarps) * kMmaChunk);
    c += kMmaChunksInFlight * kGemvWarps;
    full = c + (kMmaChunksInFlight - 1) * kGemvWarps < chunks;
    if (full) load_weights(c);
  }
  for (; c < chunks; c += kGemvWarps) {
    const int k = c * kMmaChunk;
    step(__ldcs(reinterpret_cast<const uint4*>(w_lo + k)), __ldcs(reinterpret_cast<const uint4*>(w_hi + k)), k);
  }

  // Sum the warps' tiles: lane 4 g + t holds D[g][2t, 2t+1] and D[g+8][2t, 2t+1] of each tile.
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
    tile[warp][g][8 * j + 2 * t] = d[j][0];
    tile[warp][g][8 * j + 2 * t + 1] = d[j][1];
    tile[warp][g + 8][8 * j + 2 * t] = d[j][2];
    tile[warp][g + 8][8 * j + 2 * t + 1] = d[j][3];
  }
  __syncthreads();
  if constexpr (kSilu) {
    for (int i = threadIdx.x; i < 8 * 8 * kTiles; i += blockDim.x) {
      const int m = i / (8 * kTiles), b = i % (8 * kTiles);
      if (b >= batch) continue;
      float gate = 0.f, up = 0.f;
#pragma unroll
      for (int v = 0; v < kGemvWarps; ++v) {
        gate += tile[v][m][b];
        up += tile[v][m + 8][b];
      }
      y[b * ldy + blockIdx.x * 8 + m] = silu_mul_out<T>(round_to<T>(gate), round_to<T>(up));
    }
  } else {
    for (int i = threadIdx.x; i < kMmaRows * 8 * kTiles; i += blockDim.x) {
      const int m = i / (8 * kTiles), b = i % (8 * kTiles);
      if (b >= batch || row0 + m >= n_rows) continue;
      float sum = 0.f;
#pragma unroll
      for (int v = 0; v < kGemvWarps; ++v) sum += tile[v][m][b];
      y[b * ldy + row0 + m] = gemv_out(sum, residual, b * ldr + row0 + m);
    }
  }
}

// Whether the tensor-core kernel takes this call: 16-bit types, K in whole chunks, 16-byte
// aligned rows (x's and the norm weight's too) and batches up to kGemvMmaMaxBatch.
constexpr int kGemvMmaMaxBatch = 16;
template <typename T>
bool gemv_mma_fits(const T* w, const T* x, const T* norm_w, int64_t batch, int64_t k_dim, int64_t ldx) {
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return batch >= 1 && batch <= kGemvMmaMaxBatch && k_dim % kMmaChunk == 0 && ldx % 8 == 0 && aligned(w) &&
         aligned(x) && (norm_w == nullptr || aligned(norm_w));
}

// kSilu: n_rows = 2 * inter gate and up rows in, inter columns out (8 per block).
template <typename T, bool kNorm, bool kSilu = false>
cudaError_t launch_gemv_mma(const T* w, const T* x, T* y, const T* norm_w, float eps, int batch, int k_dim,
                            int n_rows, int64_t ldx, int64_t ldy, const T* residual, int64_t ldr,
                            cudaStream_t stream) {
  const dim3 grid(kSilu ? n_rows / 16 : (n_rows + kMmaRows - 1) / kMmaRows), block(kGemvWarps * 32);
  if (batch <= 8)
    EMU_FAST_LAUNCH_PDL(grid, block, stream, gemv_mma_kernel<T, 1, kNorm, kSilu>)(w, x, y, norm_w, eps, batch,
                                                                                  k_dim, n_rows, ldx, ldy, residual,
                                                                                  ldr);
  else
    EMU_FAST_LAUNCH_PDL(grid, block, stream, gemv_mma_kernel<T, 2, kNorm, kSilu>)(w, x, y, norm_w, eps, batch,
                                                                                  k_dim, n_rows, ldx, ldy, residual,
                                                                                  ldr);
  return cudaGetLastError();
}

// The kernel for exactly `batch` rows, batch in [kBatch, kGemvMaxBatch] (recursion over the
// instances, so each batch size has its own).
template <typename T, bool kNorm, int kBatch = 1>
cudaError_t launch_gemv_exact(dim3 grid, dim3 block, const T* w, const T* x, T* y, const T* norm_w, float eps,
                              int batch, int k_dim, int n_rows, int64_t ldx, int64_t ldy, const T* residual,
                              int64_t ldr, cudaStream_t stream) {
  if constexpr (kBatch < limits::kGemvMaxBatch) {
    if (batch > kBatch)
      return launch_gemv_exact<T, kNorm, kBatch + 1>(grid, block, w, x, y, norm_w, eps, batch, k_dim, n_rows, ldx,
                                                     ldy, residual, ldr, stream);
  }
  EMU_FAST_LAUNCH_PDL(grid, block, stream, gemv_kernel<T, kBatch, kNorm>)(w, x, y, norm_w, eps, k_dim, n_rows, ldx,
                                                                          ldy, residual, ldr);
  return cudaGetLastError();
}

// Host-side launch of the kernel alone; batch must be in [1, kGemvMaxBatch].
template <typename T, bool kNorm>
cudaError_t launch_gemv_kernel(const T* w, const T* x, T* y, const T* norm_w, float eps, int batch, int k_dim,
                               int n_rows, int64_t ldx, int64_t ldy, const T* residual, int64_t ldr,
                               cudaStream_t stream) {
  const dim3 grid((n_rows + kGemvWarps - 1) / kGemvWarps), block(kGemvWarps * 32);
  return launch_gemv_exact<T, kNorm>(grid, block, w, x, y, norm_w, eps, batch, k_dim, n_rows, ldx, ldy, residual,
                                     ldr, stream);
}

constexpr int kGemvMaxBatch = limits::kGemvMaxBatch;  // the largest template above

// Batches above kGemvMaxBatch are GEMMs: the caller supplies one (cuBLAS in the torch glue, a
// plain loop in the emulator). y[b * ldy + n] = sum_k x[b * ldx + k] w[n * k_dim + k], T storage.
struct Gemm {
  cudaError_t (*fn)(void* ctx, const void* w, const void* x, int64_t ldx, void* y, int64_t ldy, int64_t batch,
                    int64_t k_dim, int64_t n_rows, cudaStream_t stream);
  void* ctx;
};

// Elements of T the workspace of launch_gemv needs: the normalized rows when a norm prologue
// runs ahead of a GEMM (and a dense copy of x first when its rows are strided).
inline int64_t gemv_workspace_elems(int64_t batch, int64_t k_dim, int64_t ldx, bool norm) {
  if (!norm || batch <= kGemvMaxBatch) return 0;
  return batch * k_dim * (ldx == k_dim ? 1 : 2);
}

// The GEMM path of launch_gemv: RMSNorm into `workspace` first with kNorm, then gemm.
template <typename T, bool kNorm>
cudaError_t launch_gemm(const T* w, const T* x, T* y, const T* norm_w, float eps, int64_t batch, int64_t k_dim,
                        int64_t n_rows, int64_t ldx, int64_t ldy, T* workspace, Gemm gemm, cudaStream_t stream) {
  if constexpr (kNorm) {
    const T* rows = x;
    T* normed = workspace;
    if (ldx != k_dim) {  // the norm kernel takes dense rows
      const cudaError_t err = cudaMemcpy2DAsync(workspace, k_dim * sizeof(T), x, ldx * sizeof(T), k_dim * sizeof(T),
                                                batch, cudaMemcpyDeviceToDevice, stream);
      if (err != cudaSuccess) return err;
      rows = workspace;
      normed = workspace + batch * k_dim;
    }
    const cudaError_t err = launch_rms_norm<T>(rows, nullptr, norm_w, eps, batch, static_cast<int>(k_dim), normed,
                                               nullptr, stream);
    if (err != cudaSuccess) return err;
    return gemm.fn(gemm.ctx, w, normed, k_dim, y, ldy, batch, k_dim, n_rows, stream);
  } else {
    return gemm.fn(gemm.ctx, w, x, ldx, y, ldy, batch, k_dim, n_rows, stream);
  }
}

// The GEMM path's epilogue: y = round(y + residual), y already rounded to T by the gemm.
template <typename T>
__global__ void add_residual_kernel(T* __restrict__ y, int64_t ldy, const T* __restrict__ residual, int64_t ldr,
                                    int64_t batch, int64_t n_rows) {
  wait_for_prior_grid();
  allow_dependent_launch();
  const int64_t total = batch * n_rows;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / n_rows, n = i % n_rows;
    y[b * ldy + n] = from_f<T>(to_f(residual[b * ldr + n]) + to_f(y[b * ldy + n]));
  }
}

// y[B, N] = x' @ w^T with x' = x, or rms_norm(x; norm_w, eps) (kNorm), plus the residual when one
// is given (row stride ldr; nullptr for none): the one launch plan of emu_fast::gemv, norm_gemv,
// gemv_add and the regression head. x: unit column stride, row stride ldx; y: row stride ldy.
// 16-bit weights in whole chunks, up to kGemvMmaMaxBatch rows: the tensor-core kernel; otherwise
// up to kGemvMaxBatch rows the CUDA-core GEMV kernel (norm and residual fused in either way);
// above, RMSNorm into `workspace` (gemv_workspace_elems), gemm, then the residual added. Nothing
// to do for an empty batch or output.
template <typename T, bool kNorm>
cudaError_t launch_gemv(const T* w, const T* x, T* y, const T* norm_w, float eps, int64_t batch, int64_t k_dim,
                        int64_t n_rows, int64_t ldx, int64_t ldy, const T* residual, int64_t ldr, T* workspace,
                        Gemm gemm, cudaStream_t stream) {
  if (batch == 0 || n_rows == 0) return cudaSuccess;
  if constexpr (!std::is_same_v<T, float>) {
    if (gemv_mma_fits(w, x, kNorm ? norm_w : nullptr, batch, k_dim, ldx))
      return launch_gemv_mma<T, kNorm>(w, x, y, norm_w, eps, static_cast<int>(batch), static_cast<int>(k_dim),
                                       static_cast<int>(n_rows), ldx, ldy, residual, ldr, stream);
  }
  if (batch <= kGemvMaxBatch)
    return launch_gemv_kernel<T, kNorm>(w, x, y, norm_w, eps, static_cast<int>(batch), static_cast<int>(k_dim),
                                        static_cast<int>(n_rows), ldx, ldy, residual, ldr, stream);
  const cudaError_t err = launch_gemm<T, kNorm>(w, x, y, norm_w, eps, batch, k_dim, n_rows, ldx, ldy, workspace, gemm,
                                                stream);
  if (err != cudaSuccess || residual == nullptr) return err;
  const int64_t blocks = (batch * n_rows + 255) / 256;
  EMU_FAST_LAUNCH_PDL(dim3(static_cast<unsigned>(blocks < 4096 ? blocks : 4096)), 256, stream,
                      add_residual_kernel<T>)(y, ldy, residual, ldr, batch, n_rows);
  return cudaGetLastError();
}

// Elements of T the workspace of launch_norm_gemv_silu needs: gate_up [B, 2I] and launch_gemv's
// for the two-kernel composition (allocated whatever the path: it depends on alignment too).
inline int64_t norm_gemv_silu_workspace_elems(int64_t batch, int64_t k_dim, int64_t ldx, int64_t inter) {
  return batch * 2 * inter + gemv_workspace_elems(batch, k_dim, ldx, true);
}

// y[B, I] (dense) = silu_mul(norm_gemv(x; norm_w, eps, w)) for w = [gate rows; up rows] [2I, K]:
// emu_fast::norm_gemv_silu. Where the tensor-core kernel takes the call and I % 8 == 0, one
// launch with SiLU * mul in its epilogue; otherwise norm_gemv into `workspace`
// (norm_gemv_silu_workspace_elems), then silu_mul: the same roundings either way.
template <typename T>
cudaError_t launch_norm_gemv_silu(const T* w, const T* x, T* y, const T* norm_w, float eps, int64_t batch,
                                  int64_t k_dim, int64_t inter, int64_t ldx, T* workspace, Gemm gemm,
                                  cudaStream_t stream) {
  if (batch == 0 || inter == 0) return cudaSuccess;
  if constexpr (!std::is_same_v<T, float>) {
    if (inter % 8 == 0 && gemv_mma_fits(w, x, norm_w, batch, k_dim, ldx))
      return launch_gemv_mma<T, true, true>(w, x, y, norm_w, eps, static_cast<int>(batch), static_cast<int>(k_dim),
                                            static_cast<int>(2 * inter), ldx, inter, nullptr, 0, stream);
  }
  T* gate_up = workspace;
  const cudaError_t err = launch_gemv<T, true>(w, x, gate_up, norm_w, eps, batch, k_dim, 2 * inter, ldx, 2 * inter,
                                               nullptr, 0, workspace + batch * 2 * inter, gemm, stream);
  if (err != cudaSuccess) return err;
  return launch_silu_mul<T>(gate_up, batch, static_cast<int>(inter), y, stream);
}

// The CUDA backend of the compositions in csrc/compose.h.
template <typename T>
struct GemvBackend {
  T* workspace;  // regression_head_workspace_elems
  Gemm gemm;
  cudaStream_t stream;
  static bool ok(cudaError_t e) { return e == cudaSuccess; }
  cudaError_t gemv(const T* w, const T* x, int64_t ldx, T* y, int64_t batch, int64_t k, int64_t n) {
    return launch_gemv<T, false>(w, x, y, nullptr, 0.f, batch, k, n, ldx, n, nullptr, 0, nullptr, gemm, stream);
  }
  cudaError_t norm_gemv(const T* w, const T* x, int64_t ldx, T* y, const T* norm_w, float eps, int64_t batch,
                        int64_t k, int64_t n) {
    return launch_gemv<T, true>(w, x, y, norm_w, eps, batch, k, n, ldx, n, nullptr, 0, workspace, gemm, stream);
  }
};

inline int64_t regression_head_workspace_elems(int64_t batch, int64_t hidden, int64_t ld_hidden) {
  return gemv_workspace_elems(batch, hidden, ld_hidden, true);
}

}  // namespace emu_fast::cuda

#include "ops/compose.h"  // regression_head, composed of this file's launchers
EMU_FAST_INSTANTIATE_LAUNCHERS(gemv,
  const Gemm gemm{nullptr, nullptr};
  launch_gemv<T, false>(nullptr, nullptr, nullptr, nullptr, 0.f, 1, 8, 8, 8, 8, nullptr, 0, nullptr, gemm, nullptr);
  launch_gemv<T, true>(nullptr, nullptr, nullptr, nullptr, 0.f, 1, 8, 8, 8, 8, nullptr, 0, nullptr, gemm, nullptr);
  launch_norm_gemv_silu<T>(nullptr, nullptr, nullptr, nullptr, 0.f, 1, 32, 8, 32, nullptr, gemm, nullptr);
  GemvBackend<T> backend{nullptr, gemm, nullptr};
  compose::regression_head<T>(backend, nullptr, 8, nullptr, 0.f, nullptr, nullptr, nullptr, nullptr, 1, 8, 8);)
