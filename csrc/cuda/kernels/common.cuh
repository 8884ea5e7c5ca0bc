// Shared device helpers for the emu_fast CUDA kernels: float conversion of the storage types
// (float, __nv_bfloat16, __half) and warp/block reductions. No torch includes.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

// Every kernel launch goes through this macro, kernel last (a template-id may hold commas):
//   EMU_FAST_LAUNCH(grid, block, stream, my_kernel<T, 4>)(args...);
// so that tests/cuda_emulation, which compiles these headers with g++ to run the kernels on
// the CPU when no GPU is available, can substitute its own launcher.
#ifndef EMU_FAST_LAUNCH
#define EMU_FAST_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#endif

namespace emu_fast::cuda {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// x rounded to T's precision, as an eager torch op in T would store it.
template <typename T> __device__ __forceinline__ float round_to(float x) { return to_f(from_f<T>(x)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

// 16 bytes of storage elements, for coalesced loads (8 bf16/half or 4 float).
template <typename T>
struct Vec16 {
  static constexpr int kN = 16 / sizeof(T);
  uint4 raw;
  __device__ __forceinline__ float operator[](int i) const { return to_f(reinterpret_cast<const T*>(&raw)[i]); }
};

template <typename T>
__device__ __forceinline__ Vec16<T> load_vec16(const T* p) {
  return Vec16<T>{__ldg(reinterpret_cast<const uint4*>(p))};
}

// Streaming load: weights are read once per step; keep them from evicting reusable lines.
template <typename T>
__device__ __forceinline__ Vec16<T> load_vec16_stream(const T* p) {
  return Vec16<T>{__ldcs(reinterpret_cast<const uint4*>(p))};
}

// E consecutive elements at p (aligned to E * sizeof(T) bytes) as floats, in one 4-, 8- or
// 16-byte load where that size fits.
template <typename T, int E>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[E]) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * E;
  if constexpr (kBytes == 16 || kBytes == 8 || kBytes == 4) {
    using Word = std::conditional_t<kBytes == 16, uint4, std::conditional_t<kBytes == 8, uint2, uint32_t>>;
    const Word w = *reinterpret_cast<const Word*>(p);
    const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
    for (int i = 0; i < E; ++i) out[i] = to_f(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < E; ++i) out[i] = to_f(p[i]);
  }
}

}  // namespace emu_fast::cuda
