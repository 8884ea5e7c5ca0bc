// Row-wise and element-wise kernels of the decode step: RMSNorm, residual add + RMSNorm and
// SiLU*mul. Rounding mirrors Hugging Face LLaMA in the storage type (see kernels/cpu/norm.h).
// No torch includes.
#pragma once
#include "common.cuh"

namespace emu_fast::cuda {

constexpr int kRowThreads = 256;

// Values a thread keeps in registers between the sum of squares and the scaling: rows up to
// kRowThreads * kRowRegs = 8192 wide (Emu1 5120, Emu2 6656) are read once.
constexpr int kRowRegs = 32;

// One block per row. With `residual`, sum = x + residual is stored first and normalized.
// Each thread keeps its (rounded) inputs in registers and scales those: reading back the sums it
// stored would go through the read-only path the compiler picks for const __restrict__ inputs
// (ld.global.nc), which is not coherent with this kernel's own stores. Wider rows re-read them
// with a coherent load (__ldcg, L2).
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ w, float eps,
                int hidden, T* __restrict__ y, T* __restrict__ sum_out) {
  __shared__ float red[32];
  wait_for_prior_grid();  // PDL (common.cuh)
  allow_dependent_launch();
  const int64_t row = blockIdx.x;
  const T* xr = x + row * hidden;
  // This row's input at i, rounded as Hugging Face rounds it; with residual, stores the sum.
  auto input = [&](int i) {
    float v = to_f(xr[i]);
    if (residual != nullptr) {
      v = round_to<T>(v + to_f(residual[row * hidden + i]));
      sum_out[row * hidden + i] = from_f<T>(v);
    }
    return v;
  };
  auto store = [&](int i, float v, float r) { y[row * hidden + i] = from_f<T>(to_f(w[i]) * round_to<T>(v * r)); };
  const int stride = static_cast<int>(blockDim.x);
  if (hidden <= kRowRegs * stride) {  // the same for the whole block
    float kept[kRowRegs];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < kRowRegs; ++k) {
      const int i = static_cast<int>(threadIdx.x) + k * stride;
      kept[k] = i < hidden ? input(i) : 0.f;
      ss += kept[k] * kept[k];
    }
    const float r = rsqrtf(block_sum(ss, red) / static_cast<float>(hidden) + eps);
#pragma unroll
    for (int k = 0; k < kRowRegs; ++k) {
      const int i = static_cast<int>(threadIdx.x) + k * stride;
      if (i < hidden) store(i, kept[k], r);
    }
    return;
  }
  float ss = 0.f;
  for (int i = threadIdx.x; i < hidden; i += stride) {
    const float v = input(i);
    ss += v * v;
  }
  const float r = rsqrtf(block_sum(ss, red) / static_cast<float>(hidden) + eps);
  for (int i = threadIdx.x; i < hidden; i += stride)
    store(i, residual != nullptr ? to_f(__ldcg(sum_out + row * hidden + i)) : to_f(xr[i]), r);
}

// silu(g) * u for a gate g and an up value u (both already T values): silu(g) rounded to T,
// then the product (silu_mul_kernel and the gate/up GEMV's epilogue, gemv.cuh).
template <typename T>
__device__ __forceinline__ T silu_mul_out(float g, float u) {
  return from_f<T>(round_to<T>(g / (1.f + __expf(-g))) * u);
}

// gate_up rows [gate | up] of width 2*inter -> silu(gate) * up.
template <typename T>
__global__ void silu_mul_kernel(const T* __restrict__ gate_up, int64_t rows, int inter, T* __restrict__ y) {
  wait_for_prior_grid();  // PDL (common.cuh)
  allow_dependent_launch();
  const int64_t total = rows * inter;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / inter, c = i % inter;
    y[i] = silu_mul_out<T>(to_f(gate_up[r * 2 * inter + c]), to_f(gate_up[r * 2 * inter + inter + c]));
  }
}

// Host-side launches; each returns the CUDA launch error, and launches nothing for empty input.
// With residual, sum_out = x + residual is stored too (add_rms_norm).
template <typename T>
cudaError_t launch_rms_norm(const T* x, const T* residual, const T* w, float eps, int64_t rows, int hidden, T* y,
                            T* sum_out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  EMU_FAST_LAUNCH_PDL(dim3(static_cast<unsigned>(rows)), kRowThreads, stream, rms_norm_kernel<T>)(x, residual, w, eps, hidden, y, sum_out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_silu_mul(const T* gate_up, int64_t rows, int inter, T* y, cudaStream_t stream) {
  if (rows * inter == 0) return cudaSuccess;
  const int64_t needed = (rows * inter + 255) / 256;
  EMU_FAST_LAUNCH_PDL(dim3(static_cast<unsigned>(needed < 4096 ? needed : 4096)), 256, stream, silu_mul_kernel<T>)(gate_up, rows, inter, y);
  return cudaGetLastError();
}

}  // namespace emu_fast::cuda

EMU_FAST_INSTANTIATE_LAUNCHERS(norm,
  launch_rms_norm<T>(nullptr, nullptr, nullptr, 0.f, 1, 8, nullptr, nullptr, nullptr);
  launch_silu_mul<T>(nullptr, 1, 8, nullptr, nullptr);)
