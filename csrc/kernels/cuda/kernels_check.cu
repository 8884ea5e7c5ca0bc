// Instantiates every CUDA kernel and host launcher for every supported type and head size
// without torch, so `make cuda-check` can compile the kernel code with nvcc on a machine
// without a GPU.
#include "ops/compose.h"
#include "decode_attention.cuh"
#include "norm.cuh"
#include "splice_embeddings.cuh"
#include "gemv.cuh"
#include "quantized_gemv.cuh"

namespace emu_fast::cuda {

template <typename T>
void instantiate_all() {
  const Gemm gemm{nullptr, nullptr};
  launch_gemv<T, false>(nullptr, nullptr, nullptr, nullptr, 0.f, 1, 8, 8, 8, 8, nullptr, 0, nullptr, gemm, nullptr);
  launch_gemv<T, true>(nullptr, nullptr, nullptr, nullptr, 0.f, 1, 8, 8, 8, 8, nullptr, 0, nullptr, gemm, nullptr);
  launch_norm_gemv_silu<T>(nullptr, nullptr, nullptr, nullptr, 0.f, 1, 32, 8, 32, nullptr, gemm, nullptr);
  GemvBackend<T> backend{nullptr, gemm, nullptr};
  compose::regression_head<T>(backend, nullptr, 8, nullptr, 0.f, nullptr, nullptr, nullptr, nullptr, 1, 8, 8);
  DecodeAttentionParams p{};
  launch_decode_attention<T>(plan_decode_attention(1, 1, 1, 8, 64, 1), p, 1, 64, nullptr, nullptr);
  launch_rms_norm<T>(nullptr, nullptr, nullptr, 0.f, 1, 8, nullptr, nullptr, nullptr);
  launch_silu_mul<T>(nullptr, 1, 8, nullptr, nullptr);
  launch_splice<T>(nullptr, nullptr, nullptr, nullptr, 1, 8, nullptr, nullptr);
  launch_quantized_gemv<T, false>(nullptr, nullptr, 1, 0, nullptr, 16, nullptr, 8, 1, 16, 8, nullptr);
  launch_quantized_gemv<T, true>(nullptr, nullptr, 1, 32, nullptr, 32, nullptr, 8, 1, 32, 8, nullptr);
}

template void instantiate_all<float>();
template void instantiate_all<__nv_bfloat16>();
template void instantiate_all<__half>();

}  // namespace emu_fast::cuda
