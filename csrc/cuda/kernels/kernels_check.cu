// Instantiates every CUDA kernel for every supported type and head size without torch, so
// `make cuda-check` can compile the kernel code with nvcc on a machine without a GPU.
#include "decode_attention.cuh"
#include "elementwise.cuh"
#include "gemv.cuh"

namespace emu_fast::cuda {

template <typename T>
void instantiate_all() {
  launch_gemv<T, false>(nullptr, nullptr, nullptr, nullptr, 0.f, 1, 8, 8, 8, 8, nullptr);
  launch_gemv<T, true>(nullptr, nullptr, nullptr, nullptr, 0.f, 1, 8, 8, 8, 8, nullptr);
  DecodeAttentionParams p{};
  launch_decode_attention<T, 64>(p, 1, nullptr, nullptr);
  launch_decode_attention<T, 128>(p, 1, nullptr, nullptr);
  launch_rms_norm<T>(nullptr, nullptr, nullptr, 0.f, 1, 8, nullptr, nullptr, nullptr);
  launch_silu_mul<T>(nullptr, 1, 8, nullptr, nullptr);
  launch_splice<T>(nullptr, nullptr, nullptr, nullptr, 1, 8, nullptr, nullptr);
}

template void instantiate_all<float>();
template void instantiate_all<__nv_bfloat16>();
template void instantiate_all<__half>();

}  // namespace emu_fast::cuda
