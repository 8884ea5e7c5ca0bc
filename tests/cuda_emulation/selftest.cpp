// Kernels that use CUDA correctly and incorrectly on purpose, so that the tests can show the
// emulator computes the one and catches each of the others (tests/emulators/test_cuda_emulation.py).
#include "cuda_runtime.h"
#include "kernels/cuda/common.cuh"  // the kernels' PDL calls

using emu_fast::cuda::allow_dependent_launch;
using emu_fast::cuda::wait_for_prior_grid;

namespace {

// Sum of each warp's 32 values by xor-shuffle, as the real kernels reduce.
__global__ void warp_sums(const float* x, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = x[i];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) out[i / 32] = v;
}

__global__ void barrier_after_return(float* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void shuffle_missing_a_lane(float* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

// A race: every thread writes the same shared word before the barrier; which value survives
// depends on an order CUDA does not define.
__global__ void racy_shared_write(float* out) {
  __shared__ float last;
  last = static_cast<float>(threadIdx.x);
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = last;
}

// One element past the end of out ([blocks * threads]).
__global__ void write_past_the_end(float* out) {
  out[blockIdx.x * blockDim.x + threadIdx.x + 1] = 0.f;
}

// A 16-byte load from an address that is only 4-byte aligned: a misaligned-address fault on a
// GPU, undefined behaviour (reported by UBSan) here.
__global__ void misaligned_vector_load(const float* in, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(in + 1);
  out[threadIdx.x] = static_cast<float>(v.x);
}

// Reads a shared word no thread of the block wrote: garbage on a GPU, NaN here.
__global__ void read_unwritten_shared(float* out) {
  __shared__ float words[64];
  if (threadIdx.x < 32) words[threadIdx.x] = 1.f;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = words[threadIdx.x];
}

__global__ void shuffle_partial_mask(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.f, 1);
}

__global__ void null_dereference(float* out) {
  float* volatile p = nullptr;
  out[threadIdx.x] = *p;
}

// Group sums over `width` lanes (8) by xor, and lane 3 of each group by index: out[0 .. n) the
// sums, out[n .. 2n) the broadcasts.
__global__ void shuffle_width_8(const float* in, float* out) {
  const int i = threadIdx.x, n = blockDim.x;
  float v = in[i];
  for (int o = 4; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o, 8);
  out[i] = v;
  out[n + i] = __shfl_sync(0xffffffffu, in[i], 3, 8);
}

// Programmatic dependent launch, kept to its rules (common.cuh): wait, then allow the next.
__global__ void pdl_copy(const float* in, float* out) {
  wait_for_prior_grid();
  allow_dependent_launch();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = in[i];
}

// An early exit that skips the wait: the next kernel could overtake the one before this.
__global__ void pdl_exit_without_wait(const float* in, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i == 7) return;
  wait_for_prior_grid();
  out[i] = in[i];
}

__global__ void pdl_trigger_before_wait(const float* in, float* out) {
  allow_dependent_launch();
  wait_for_prior_grid();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = in[i];
}

}  // namespace

extern "C" int emu_selftest(int which, const float* in, float* out, int blocks, int threads) {
  switch (which) {
    case 0: EMU_FAST_LAUNCH(blocks, threads, nullptr, warp_sums)(in, out); break;
    case 1: EMU_FAST_LAUNCH(blocks, threads, nullptr, barrier_after_return)(out); break;
    case 2: EMU_FAST_LAUNCH(blocks, threads, nullptr, shuffle_missing_a_lane)(out); break;
    case 3: EMU_FAST_LAUNCH(blocks, threads, nullptr, racy_shared_write)(out); break;
    case 4: EMU_FAST_LAUNCH(blocks, threads, nullptr, write_past_the_end)(out); break;
    case 5: EMU_FAST_LAUNCH(blocks, threads, nullptr, misaligned_vector_load)(in, out); break;
    case 6: EMU_FAST_LAUNCH(blocks, threads, nullptr, read_unwritten_shared)(out); break;
    case 7: EMU_FAST_LAUNCH(blocks, threads, nullptr, shuffle_partial_mask)(out); break;
    case 8: EMU_FAST_LAUNCH(blocks, threads, nullptr, null_dereference)(out); break;
    case 9: EMU_FAST_LAUNCH(blocks, threads, nullptr, shuffle_width_8)(in, out); break;
    case 10: EMU_FAST_LAUNCH_PDL(blocks, threads, nullptr, pdl_copy)(in, out); break;
    case 11: EMU_FAST_LAUNCH_PDL(blocks, threads, nullptr, pdl_exit_without_wait)(in, out); break;
    case 12: EMU_FAST_LAUNCH_PDL(blocks, threads, nullptr, pdl_trigger_before_wait)(in, out); break;
    // The same kernels launched without PDL: their rules do not apply.
    case 13: EMU_FAST_LAUNCH(blocks, threads, nullptr, pdl_exit_without_wait)(in, out); break;
    default: return -1;
  }
  return static_cast<int>(cudaGetLastError());
}

extern "C" int64_t emu_last_launch_waits() { return emu_fast::emulation::last_launch_waits(); }
