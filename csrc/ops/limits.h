// What the CUDA kernels support, stated once. Torch-free: the kernels (csrc/kernels/cuda), their
// glue (csrc/ops/<op>.cu), the argument checks (csrc/ops/<op>.cpp) and EmuDecoder's
// constructor all read it.
#pragma once
#include <cstdint>

namespace emu_fast::limits {

// Query heads per KV head in the CUDA decode attention (a block holds the whole group).
constexpr int kMaxQueryGroup = 8;

// Head sizes the CUDA decode attention is compiled for.
constexpr int kCudaHeadDims[] = {64, 128};
constexpr const char* kCudaHeadDimsText = "64 or 128";
constexpr bool cuda_head_dim_supported(int64_t d) {
  for (int h : kCudaHeadDims)
    if (d == h) return true;
  return false;
}

// Batch rows the CUDA-core GEMV kernel takes (its largest template). 16-bit weights whose K is
// a multiple of 32 go to the tensor-core GEMV up to 16 rows (cuda/kernels/gemv.cuh); larger
// batches, and float32 above this, are GEMMs and go to cuBLAS.
constexpr int kGemvMaxBatch = 8;

}  // namespace emu_fast::limits
