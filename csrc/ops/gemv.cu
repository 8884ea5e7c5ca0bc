// The GEMV ops on CUDA (gemv, norm_gemv, gemv_add, norm_gemv_silu, regression_head): the checks
// (gemv.cpp), then kernels/cuda/gemv.cuh's launchers on the current stream (cuBLAS for the
// batches they hand back), compositions through compose.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "kernels/cuda/gemv.cuh"
#include "ops/checks.h"
#include "ops/compose.h"
#include "ops/cuda_glue.h"

namespace emu_fast {
namespace {

using cuda_glue::check_launch;
using cuda_glue::dispatch_float;
using cuda_glue::ptr;

// Rows the launchers take as they are: unit column stride and rows that do not overlap (a row
// stride of at least the row's length; the GEMM path's 2-D copy refuses a smaller pitch). An
// expanded or otherwise overlapping x is copied dense first.
bool rows_usable(const at::Tensor& x) {
  return x.stride(1) == 1 && (x.size(0) <= 1 || x.stride(0) >= x.size(1));
}

// cuBLAS for the GEMV batches our kernels do not take (cuda::launch_gemv decides): the pointers
// it is handed wrapped as tensors of `options` for at::mm_out.
cudaError_t cublas_gemm(void* ctx, const void* w, const void* x, int64_t ldx, void* y, int64_t ldy, int64_t batch,
                        int64_t k_dim, int64_t n_rows, cudaStream_t) {
  const auto& options = *static_cast<const at::TensorOptions*>(ctx);
  const at::Tensor xt = at::from_blob(const_cast<void*>(x), {batch, k_dim}, {ldx, 1}, options);
  const at::Tensor wt = at::from_blob(const_cast<void*>(w), {n_rows, k_dim}, {k_dim, 1}, options);
  at::Tensor yt = at::from_blob(y, {batch, n_rows}, {ldy, 1}, options);
  at::mm_out(yt, xt, wt.t());
  return cudaSuccess;
}

// y = x' @ weight^T (+ residual) through cuda::launch_gemv, x' = x or rms_norm(x) (norm_weight):
// emu_fast::gemv, norm_gemv and gemv_add.
at::Tensor gemv_impl(const char* op, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor* norm_weight,
                     double eps, const at::Tensor* residual_in) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_usable(x_in) ? x_in : x_in.contiguous();
  const int64_t B = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor residual;
  if (residual_in != nullptr) residual = residual_in->stride(1) == 1 ? *residual_in : residual_in->contiguous();
  at::Tensor out = at::empty({B, N}, x.options());
  const at::Tensor workspace =
      at::empty({cuda::gemv_workspace_elems(B, K, x.stride(0), norm_weight != nullptr)}, x.options());
  at::TensorOptions options = x.options();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using Tt = decltype(tag);
    const Tt* r = residual_in != nullptr ? ptr<Tt>(residual) : nullptr;
    const int64_t ldr = residual_in != nullptr ? residual.stride(0) : 0;
    const cuda::Gemm gemm{&cublas_gemm, &options};
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    check_launch(norm_weight != nullptr
                     ? cuda::launch_gemv<Tt, true>(ptr<Tt>(weight), ptr<Tt>(x), ptr<Tt>(out), ptr<Tt>(*norm_weight),
                                                   static_cast<float>(eps), B, K, N, x.stride(0), N, r, ldr,
                                                   ptr<Tt>(workspace), gemm, stream)
                     : cuda::launch_gemv<Tt, false>(ptr<Tt>(weight), ptr<Tt>(x), ptr<Tt>(out), nullptr, 0.f, B, K, N,
                                                    x.stride(0), N, r, ldr, nullptr, gemm, stream),
                 op);
  });
  return out;
}

at::Tensor gemv_cuda(const at::Tensor& x, const at::Tensor& weight) {
  check_gemv(x, weight, true);
  return gemv_impl("gemv", x, weight, nullptr, 0.0, nullptr);
}

at::Tensor norm_gemv_cuda(const at::Tensor& x, const at::Tensor& norm_weight, double eps, const at::Tensor& weight) {
  check_norm_gemv(x, norm_weight, weight, true);
  return gemv_impl("norm_gemv", x, weight, &norm_weight, eps, nullptr);
}

at::Tensor gemv_add_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& residual) {
  check_gemv_add(x, weight, residual, true);
  return gemv_impl("gemv_add", x, weight, nullptr, 0.0, &residual);
}

at::Tensor norm_gemv_silu_cuda(const at::Tensor& x_in, const at::Tensor& norm_weight, double eps,
                               const at::Tensor& gate_up_weight) {
  check_norm_gemv_silu(x_in, norm_weight, gate_up_weight, true);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_usable(x_in) ? x_in : x_in.contiguous();
  const int64_t B = x.size(0), K = x.size(1), I = gate_up_weight.size(0) / 2;
  at::Tensor out = at::empty({B, I}, x.options());
  const at::Tensor workspace =
      at::empty({cuda::norm_gemv_silu_workspace_elems(B, K, x.stride(0), I)}, x.options());
  at::TensorOptions options = x.options();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using Tt = decltype(tag);
    check_launch(cuda::launch_norm_gemv_silu<Tt>(ptr<Tt>(gate_up_weight), ptr<Tt>(x), ptr<Tt>(out),
                                                 ptr<Tt>(norm_weight), static_cast<float>(eps), B, K, I, x.stride(0),
                                                 ptr<Tt>(workspace), {&cublas_gemm, &options},
                                                 c10::cuda::getCurrentCUDAStream()),
                 "norm_gemv_silu");
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> regression_head_cuda(const at::Tensor& hidden_in, const at::Tensor& norm_weight,
                                                        double eps, const at::Tensor& head_weight,
                                                        const c10::optional<at::Tensor>& up_weight) {
  check_regression_head(hidden_in, norm_weight, head_weight, up_weight, true);
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const at::Tensor hidden = rows_usable(hidden_in) ? hidden_in : hidden_in.contiguous();
  const int64_t B = hidden.size(0), H = hidden.size(1), Dout = head_weight.size(0), ld = hidden.stride(0);
  at::Tensor out = at::empty({B, Dout}, hidden.options());
  at::Tensor next = at::empty({B, up_weight.has_value() ? H : 0}, hidden.options());
  const at::Tensor workspace = at::empty({cuda::regression_head_workspace_elems(B, H, ld)}, hidden.options());
  at::TensorOptions options = hidden.options();
  dispatch_float(hidden.scalar_type(), [&](auto tag) {
    using Tt = decltype(tag);
    cuda::GemvBackend<Tt> gpu{ptr<Tt>(workspace), {&cublas_gemm, &options}, c10::cuda::getCurrentCUDAStream()};
    check_launch(compose::regression_head<Tt>(gpu, ptr<Tt>(hidden), ld, ptr<Tt>(norm_weight), static_cast<float>(eps),
                                              ptr<Tt>(head_weight), up_weight ? ptr<Tt>(*up_weight) : nullptr,
                                              ptr<Tt>(out), ptr<Tt>(next), B, H, Dout),
                 "regression_head");
  });
  return {out, next};
}

}  // namespace

TORCH_LIBRARY_IMPL(emu_fast, CUDA, m) {
  m.impl("gemv", &gemv_cuda);
  m.impl("norm_gemv", &norm_gemv_cuda);
  m.impl("gemv_add", &gemv_add_cuda);
  m.impl("norm_gemv_silu", &norm_gemv_silu_cuda);
  m.impl("regression_head", &regression_head_cuda);
}

}  // namespace emu_fast
