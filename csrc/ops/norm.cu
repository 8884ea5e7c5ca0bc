// The norm and activation ops on CUDA (rms_norm, add_rms_norm, silu_mul): the checks (norm.cpp),
// then kernels/cuda/norm.cuh's launchers on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "kernels/cuda/norm.cuh"
#include "ops/checks.h"
#include "ops/cuda_glue.h"

namespace emu_fast {
namespace {

using cuda_glue::check_launch;
using cuda_glue::dispatch_float;
using cuda_glue::ptr;

std::tuple<at::Tensor, at::Tensor> norm_impl(const at::Tensor& x_in, const at::Tensor* residual_in,
                                             const at::Tensor& weight, double eps) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor residual = residual_in ? residual_in->contiguous() : at::Tensor();
  const int64_t B = x.size(0), H = x.size(1);
  at::Tensor y = at::empty({B, H}, x.options());
  at::Tensor sum = residual_in ? at::empty({B, H}, x.options()) : at::Tensor();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using Tt = decltype(tag);
    check_launch(cuda::launch_rms_norm<Tt>(ptr<Tt>(x), residual_in ? ptr<Tt>(residual) : nullptr, ptr<Tt>(weight),
                                           static_cast<float>(eps), B, static_cast<int>(H), ptr<Tt>(y),
                                           residual_in ? ptr<Tt>(sum) : nullptr, c10::cuda::getCurrentCUDAStream()),
                 "rms_norm");
  });
  return {y, sum};
}

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm("rms_norm", x, weight, true);
  return std::get<0>(norm_impl(x, nullptr, weight, eps));
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps) {
  check_add_rms_norm(x, residual, weight, true);
  return norm_impl(x, &residual, weight, eps);
}

at::Tensor silu_mul_cuda(const at::Tensor& gate_up_in) {
  check_silu_mul(gate_up_in, true);
  const c10::cuda::CUDAGuard guard(gate_up_in.device());
  const at::Tensor gate_up = gate_up_in.contiguous();
  const int64_t B = gate_up.size(0), I = gate_up.size(1) / 2;
  at::Tensor out = at::empty({B, I}, gate_up.options());
  dispatch_float(gate_up.scalar_type(), [&](auto tag) {
    using Tt = decltype(tag);
    check_launch(cuda::launch_silu_mul<Tt>(ptr<Tt>(gate_up), B, static_cast<int>(I), ptr<Tt>(out),
                                           c10::cuda::getCurrentCUDAStream()),
                 "silu_mul");
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(emu_fast, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("add_rms_norm", &add_rms_norm_cuda);
  m.impl("silu_mul", &silu_mul_cuda);
}

}  // namespace emu_fast
