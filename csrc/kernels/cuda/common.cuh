// Shared device helpers for the emu_fast CUDA kernels: float conversion of the storage types
// (float, __nv_bfloat16, __half) and warp/block reductions. No torch includes.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#ifndef EMU_FAST_EMULATED_CUDA
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>
#endif

// Every kernel launch goes through this macro, kernel last (a template-id may hold commas):
//   EMU_FAST_LAUNCH(grid, block, stream, my_kernel<T, 4>)(args...);
// so that tests/cuda_emulation, which compiles these headers with g++ to run the kernels on
// the CPU when no GPU is available, can substitute its own launcher.
#ifndef EMU_FAST_LAUNCH
#define EMU_FAST_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#endif

// The decode step's kernels launch with programmatic dependent launch (PDL, sm_90+): the next
// kernel's blocks start while this one drains and stream their weights (which no kernel of the
// step writes) before waiting for it, instead of starting after a launch gap:
//   EMU_FAST_LAUNCH_PDL(grid, block, stream, my_kernel<T>)(args...);
// Every kernel launched so keeps one rule on every path, including early exits:
//   * before wait_for_prior_grid() it reads only what kernels two or more launches back wrote
//     (weights, the cache rows of earlier steps, lengths, RoPE tables) and writes nothing;
//   * it calls allow_dependent_launch() only after the wait.
// So kernel N's blocks start only once every block of N - 1 has passed its wait, that is, once
// N - 2 has finished and its writes are visible. tests/cuda_emulation checks the second rule and
// that every thread waits. Without sm_90 code (or with EMU_FAST_PDL=0) the launch is ordinary
// and the two calls compile to nothing.
// Each kernel file ends with EMU_FAST_INSTANTIATE_LAUNCHERS(file, calls...): its launchers
// instantiated for every storage type T, compiled only where EMU_FAST_INSTANTIATE_KERNELS is
// defined (`make cuda-check` and the static report compile every csrc/kernels/cuda/*.cuh so,
// without a GPU and without torch).
#ifdef EMU_FAST_INSTANTIATE_KERNELS
#define EMU_FAST_INSTANTIATE_LAUNCHERS(file, ...)  \
  namespace emu_fast::cuda {                       \
  template <typename T>                            \
  void instantiate_##file() {                      \
    __VA_ARGS__                                    \
  }                                                \
  template void instantiate_##file<float>();       \
  template void instantiate_##file<__nv_bfloat16>(); \
  template void instantiate_##file<__half>();      \
  }
#else
#define EMU_FAST_INSTANTIATE_LAUNCHERS(file, ...)
#endif

#ifndef EMU_FAST_LAUNCH_PDL
#define EMU_FAST_LAUNCH_PDL(grid, block, stream, ...) \
  ::emu_fast::cuda::PdlLaunch((grid), (block), (stream), __VA_ARGS__)
#endif

namespace emu_fast::cuda {

__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(EMU_FAST_EMULATED_CUDA)
  ::emu_fast::emulation::grid_dependency_wait();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependent_launch() {
#if defined(EMU_FAST_EMULATED_CUDA)
  ::emu_fast::emulation::launch_dependents();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

#ifndef EMU_FAST_EMULATED_CUDA
// Whether `kernel` may launch with PDL on the current device: its code there was compiled for
// sm_90 or later (so it holds the griddepcontrol instructions above; older code JIT-compiled on
// a newer GPU would not wait) and EMU_FAST_PDL is not "0". Cached per kernel and device.
inline bool pdl_allowed(const void* kernel) {
  static const bool enabled = [] {
    const char* env = std::getenv("EMU_FAST_PDL");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  int device = 0;
  if (!enabled || cudaGetDevice(&device) != cudaSuccess) return false;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, bool> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(kernel, device);
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  cudaFuncAttributes attr{};
  const bool ok = cudaFuncGetAttributes(&attr, kernel) == cudaSuccess && attr.binaryVersion >= 90;
  if (!ok) (void)cudaGetLastError();  // not an error of the launch: it goes without PDL
  return cache[key] = ok;
}

// kernel<<<grid, block, 0, stream>>>(args...) with the programmatic-serialization attribute
// where pdl_allowed; the launch error is left for cudaGetLastError as with <<<>>>.
template <typename... P>
struct PdlLaunch {
  dim3 grid, block;
  cudaStream_t stream;
  void (*kernel)(P...);
  PdlLaunch(dim3 g, dim3 b, cudaStream_t s, void (*k)(P...)) : grid(g), block(b), stream(s), kernel(k) {}
  template <typename... A>
  void operator()(A&&... args) const {
    cudaLaunchAttribute attr[1] = {};
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = 0;
    config.stream = stream;
    config.attrs = attr;
    config.numAttrs = pdl_allowed(reinterpret_cast<const void*>(kernel)) ? 1 : 0;
    (void)cudaLaunchKernelEx(&config, kernel, static_cast<P>(std::forward<A>(args))...);
  }
};
#endif

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
