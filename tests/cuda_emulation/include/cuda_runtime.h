// CPU stand-in for <cuda_runtime.h>, for the CUDA kernel emulator only (see ../README.md): just
// the CUDA surface csrc/kernels/cuda/*.cuh uses, so g++ can compile those headers unchanged
// and run their kernels on the CPU. Nothing here is built into emu_fast.
#pragma once
// The kernels' PDL calls (common.cuh) go to the emulator's checks.
#define EMU_FAST_EMULATED_CUDA 1
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// No __shared__ here: tests/cuda_emulator.py rewrites every declaration of the kernel sources
// to emulation::shared_array, one block's memory, poisoned for every block (see emulator.h).

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetLastError();  // returns and clears the last launch error, as CUDA does

// Host memory is device memory here: copies are plain copies, done at once.
enum cudaMemcpyKind { cudaMemcpyDeviceToDevice = 3 };
inline cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                                     size_t height, cudaMemcpyKind, cudaStream_t) {
  if (width > dpitch || width > spitch) return cudaErrorInvalidValue;
  for (size_t r = 0; r < height; ++r)
    std::memcpy(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width);
  return cudaSuccess;
}

inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

// Read-only / streaming / L2-only loads are plain loads here.
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }

#include "emulator.h"

#define threadIdx (::emu_fast::emulation::thread_idx())
#define blockIdx (::emu_fast::emulation::block_idx())
#define blockDim (::emu_fast::emulation::block_dim())
#define gridDim (::emu_fast::emulation::grid_dim())

inline void __syncthreads() { ::emu_fast::emulation::sync_threads(); }

// One block runs at a time, on one OS thread: atomics are plain read-modify-writes and fences
// have nothing to order. (Blocks still run in a random order with a seed, so a result that
// depends on which block comes last shows.)
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = old + v;
  return old;
}
inline void __threadfence() {}

// As the CUDA Programming Guide defines them for width a power of two up to 32: __shfl_sync
// reads lane src_lane mod width of the caller's group of `width` lanes; __shfl_xor_sync reads
// lane ^ lane_mask, or the caller's own value if that lane is in a later group.
template <typename T>
inline T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32) {
  return ::emu_fast::emulation::shuffle(mask, value, [=](int lane) { return (lane & ~(width - 1)) + (src_lane & (width - 1)); });
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return ::emu_fast::emulation::shuffle(mask, value, [=](int lane) {
    const int src = (lane ^ lane_mask) & 31;
    return (src & ~(width - 1)) > (lane & ~(width - 1)) ? lane : src;
  });
}

#define EMU_FAST_LAUNCH(grid, block, stream, ...) ::emu_fast::emulation::Launch((grid), (block), (stream), __VA_ARGS__)
// A programmatic dependent launch: run like any other, with its PDL rules checked (emulator.h).
#define EMU_FAST_LAUNCH_PDL(grid, block, stream, ...) \
  ::emu_fast::emulation::Launch((grid), (block), (stream), __VA_ARGS__, true)
