// Pieces of the ATen twins (the emu_fast_aten:: ops) that more than one op's twin is made of.
#pragma once
#include <ATen/ATen.h>

namespace emu_fast::aten_twin {

// Hugging Face LlamaRMSNorm: normalize in float32, round to x's dtype, then scale.
inline at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor normed = xf * at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * normed.to(x.scalar_type());
}

// gate_up [B, 2I] = [gate | up] -> silu(gate) * up.
inline at::Tensor silu_mul(const at::Tensor& gate_up) {
  const int64_t I = gate_up.size(-1) / 2;
  return at::silu(gate_up.narrow(-1, 0, I)) * gate_up.narrow(-1, I, I);
}

}  // namespace emu_fast::aten_twin
