// The placeholder splice: token embeddings with image vectors in the slots (the slot numbering is
// done on the host, kernels/cpu/splice_embeddings.h). No torch includes.
#pragma once
#include "common.cuh"

namespace emu_fast::cuda {

// One block per position: out[p] = slot_index[p] >= 0 ? values[slot_index[p]] : table[ids[p]].
template <typename T>
__global__ void splice_kernel(const int64_t* __restrict__ ids, const int64_t* __restrict__ slot_index,
                              const T* __restrict__ table, const T* __restrict__ values, int hidden,
                              T* __restrict__ out) {
  const int64_t p = blockIdx.x;
  const int64_t s = slot_index[p];
  const T* src = s >= 0 ? values + s * hidden : table + ids[p] * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[p * hidden + i] = src[i];
}

// Host-side launch; returns the CUDA launch error, and launches nothing for empty input.
template <typename T>
cudaError_t launch_splice(const int64_t* ids, const int64_t* slot_index, const T* table, const T* values,
                          int64_t positions, int hidden, T* out, cudaStream_t stream) {
  if (positions == 0) return cudaSuccess;
  EMU_FAST_LAUNCH(dim3(static_cast<unsigned>(positions)), 256, stream, splice_kernel<T>)(ids, slot_index, table, values, hidden, out);
  return cudaGetLastError();
}

}  // namespace emu_fast::cuda

EMU_FAST_INSTANTIATE_LAUNCHERS(splice_embeddings,
  launch_splice<T>(nullptr, nullptr, nullptr, nullptr, 1, 8, nullptr, nullptr);)
