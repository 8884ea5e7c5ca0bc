// What the CUDA op files (ops_cuda.cu, quantized_ops_cuda.cu) share to unwrap tensors for the
// launchers of csrc/kernels/cuda/: the storage type of a dtype, raw pointers, launch errors.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "ops/checks.h"

namespace emu_fast::cuda_glue {

// Calls f(T{}) with T the CUDA storage type of s.
template <typename F>
inline void dispatch_float(at::ScalarType s, F&& f) {
  switch (s) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(__nv_bfloat16{});
    case at::kHalf: return f(__half{});
    default: TORCH_CHECK_TYPE(false, "emu_fast: unsupported dtype ", py_dtype(s), " on CUDA");
  }
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "emu_fast.", op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace emu_fast::cuda_glue
