// C++ entry points to the emu_fast ops EmuDecoder uses, through the dispatcher, so it runs the
// CPU or CUDA implementation of each op by the device of its tensors.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace emu_fast::ops {

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_lens,
                            const at::Tensor& positions, const at::Tensor& rope_cos,
                            const at::Tensor& rope_sin, double scale);
std::tuple<at::Tensor, at::Tensor> regression_head(const at::Tensor& hidden, const at::Tensor& norm_weight,
                                                   double eps, const at::Tensor& head_weight,
                                                   const c10::optional<at::Tensor>& up_weight);
at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& gate_up);

}  // namespace emu_fast::ops
