// Small-batch GEMV, y[b, n] = sum_k x'[b, k] W[n, k], for the decode step's projections.
// One warp per output row; lanes stream the row in 16-byte vectors and dot it with every batch
// row, so the weights are read once for the whole batch. With kNorm the kernel first applies
// RMSNorm to x (x' = round(norm_w * round(x * inv_rms(x)))), the regression head's prologue,
// so the normalized activations never go through memory. Accumulation is float32.
#pragma once
#include "common.cuh"
#include "elementwise.cuh"
#include "op_limits.h"

namespace emu_fast::cuda {

constexpr int kGemvWarps = 8;  // rows per block

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
            const T* __restrict__ norm_w, float eps, int k_dim, int n_rows, int64_t ldx, int64_t ldy) {
  __shared__ float inv_rms[kBatch];
  __shared__ float red[32];
  if constexpr (kNorm) {
#pragma unroll 1
    for (int b = 0; b < kBatch; ++b) {
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
    if (lane == 0) y[b * ldy + row] = from_f<T>(s);
  }
}

// The kernel for exactly `batch` rows, batch in [kBatch, kGemvMaxBatch] (recursion over the
// instances, so each batch size has its own).
template <typename T, bool kNorm, int kBatch = 1>
cudaError_t launch_gemv_exact(dim3 grid, dim3 block, const T* w, const T* x, T* y, const T* norm_w, float eps,
                              int batch, int k_dim, int n_rows, int64_t ldx, int64_t ldy, cudaStream_t stream) {
  if constexpr (kBatch < limits::kGemvMaxBatch) {
    if (batch > kBatch)
      return launch_gemv_exact<T, kNorm, kBatch + 1>(grid, block, w, x, y, norm_w, eps, batch, k_dim, n_rows, ldx,
                                                     ldy, stream);
  }
  EMU_FAST_LAUNCH(grid, block, stream, gemv_kernel<T, kBatch, kNorm>)(w, x, y, norm_w, eps, k_dim, n_rows, ldx, ldy);
  return cudaGetLastError();
}

// Host-side launch of the kernel alone; batch must be in [1, kGemvMaxBatch].
template <typename T, bool kNorm>
cudaError_t launch_gemv_kernel(const T* w, const T* x, T* y, const T* norm_w, float eps, int batch, int k_dim,
                               int n_rows, int64_t ldx, int64_t ldy, cudaStream_t stream) {
  const dim3 grid((n_rows + kGemvWarps - 1) / kGemvWarps), block(kGemvWarps * 32);
  return launch_gemv_exact<T, kNorm>(grid, block, w, x, y, norm_w, eps, batch, k_dim, n_rows, ldx, ldy, stream);
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

// y[B, N] = x' @ w^T with x' = x, or rms_norm(x; norm_w, eps) (kNorm): the one launch plan of
// emu_fast::gemv and the regression head. x: unit column stride, row stride ldx; y: row stride
// ldy. Up to kGemvMaxBatch rows the GEMV kernel (norm fused in); above, RMSNorm into `workspace`
// (gemv_workspace_elems) and gemm. Nothing to do for an empty batch or output.
template <typename T, bool kNorm>
cudaError_t launch_gemv(const T* w, const T* x, T* y, const T* norm_w, float eps, int64_t batch, int64_t k_dim,
                        int64_t n_rows, int64_t ldx, int64_t ldy, T* workspace, Gemm gemm, cudaStream_t stream) {
  if (batch == 0 || n_rows == 0) return cudaSuccess;
  if (batch <= kGemvMaxBatch)
    return launch_gemv_kernel<T, kNorm>(w, x, y, norm_w, eps, static_cast<int>(batch), static_cast<int>(k_dim),
                                        static_cast<int>(n_rows), ldx, ldy, stream);
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

// The CUDA backend of the compositions in csrc/compose.h.
template <typename T>
struct GemvBackend {
  T* workspace;  // regression_head_workspace_elems
  Gemm gemm;
  cudaStream_t stream;
  static bool ok(cudaError_t e) { return e == cudaSuccess; }
  cudaError_t gemv(const T* w, const T* x, int64_t ldx, T* y, int64_t batch, int64_t k, int64_t n) {
    return launch_gemv<T, false>(w, x, y, nullptr, 0.f, batch, k, n, ldx, n, nullptr, gemm, stream);
  }
  cudaError_t norm_gemv(const T* w, const T* x, int64_t ldx, T* y, const T* norm_w, float eps, int64_t batch,
                        int64_t k, int64_t n) {
    return launch_gemv<T, true>(w, x, y, norm_w, eps, batch, k, n, ldx, n, workspace, gemm, stream);
  }
};

inline int64_t regression_head_workspace_elems(int64_t batch, int64_t hidden, int64_t ld_hidden) {
  return gemv_workspace_elems(batch, hidden, ld_hidden, true);
}

}  // namespace emu_fast::cuda
