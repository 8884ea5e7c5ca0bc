// CUDA implementations of the weight-only quantized GEMVs (emu_fast::gemv_int8 / gemv_int4):
// the CPU's argument checks, then cuda::launch_quantized_gemv on the current stream. Its own
// file so the rest of the CUDA glue does not recompile with it. float32, bfloat16, float16 x.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/checks.h"
#include "kernels/cuda/quantized_gemv.cuh"
#include "ops/cuda_glue.h"
#include "kernels/cpu/quantized_gemv.h"

namespace emu_fast {
namespace {

using cuda_glue::check_launch;
using cuda_glue::dispatch_float;
using cuda_glue::ptr;

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// The row stride the kernel is given (a single row's stride is arbitrary: its own length).
int64_t row_stride(const at::Tensor& x) { return x.size(0) <= 1 ? std::max<int64_t>(x.size(1), 1) : x.stride(0); }

// x as the kernel reads it: in place where its rows are 16-byte aligned and hold whole vectors;
// otherwise a fresh dense copy (int4: padded with zeros to whole 32-value blocks, which the
// kernel reads; int8: aligned rows, or, for K % 16 != 0, rows for the kernel's scalar loop).
at::Tensor kernel_rows(const at::Tensor& x, bool int4) {
  const int64_t B = x.size(0), K = x.size(1);
  const bool rows_ok = x.stride(1) == 1 && (B <= 1 || x.stride(0) >= K);
  bool vectors_ok = false;
  if (rows_ok) {
    dispatch_float(x.scalar_type(), [&](auto tag) {
      vectors_ok = cuda::quantized_gemv_x_ok(ptr<decltype(tag)>(x), row_stride(x), K, int4);
    });
  }
  if (vectors_ok) return x;
  if (!int4) return rows_ok && K % 16 != 0 ? x : x.clone(at::MemoryFormat::Contiguous);
  at::Tensor rows = at::zeros({B, kernels::int4_padded_k(K)}, x.options());
  rows.narrow(1, 0, K).copy_(x);
  return rows;
}

at::Tensor quantized_gemv(const char* op, const at::Tensor& x_in, const at::Tensor& qweight_in,
                          const at::Tensor& scales, int64_t group_size, bool int4) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t B = x_in.size(0), K = x_in.size(1), N = qweight_in.size(0);
  at::Tensor out = at::empty({B, N}, x_in.options());
  if (B == 0 || N == 0) return out;
  // A view whose first row is not 16-byte aligned (a slice at an odd offset) is read from a copy.
  const at::Tensor qweight = aligned16(qweight_in) ? qweight_in : qweight_in.clone();
  const at::Tensor x = kernel_rows(x_in, int4);
  const int64_t ldx = row_stride(x);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using Tt = decltype(tag);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const uint8_t* q = ptr<uint8_t>(qweight);
    check_launch(int4 ? cuda::launch_quantized_gemv<Tt, true>(q, ptr<float>(scales), scales.size(1),
                                                              static_cast<int>(kernels::int4_kernel_group(K, group_size)),
                                                              ptr<Tt>(x), ldx,
                                                              ptr<Tt>(out), N, B, static_cast<int>(K),
                                                              static_cast<int>(N), stream)
                      : cuda::launch_quantized_gemv<Tt, false>(q, ptr<float>(scales), 1, 0, ptr<Tt>(x), ldx,
                                                               ptr<Tt>(out), N, B, static_cast<int>(K),
                                                               static_cast<int>(N), stream),
                 op);
  });
  return out;
}

at::Tensor gemv_int8_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  check_gemv_int8(x, qweight, scales, true);
  return quantized_gemv("gemv_int8", x, qweight, scales, 0, false);
}

at::Tensor gemv_int4_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          int64_t group_size) {
  check_gemv_int4(x, qweight, scales, group_size, true);
  return quantized_gemv("gemv_int4", x, qweight, scales, group_size, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(emu_fast, CUDA, m) {
  m.impl("gemv_int8", &gemv_int8_cuda);
  m.impl("gemv_int4", &gemv_int4_cuda);
}

}  // namespace emu_fast
