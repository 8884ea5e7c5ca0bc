#include "ops/checked.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "ops/schemes.h"

namespace emu_fast {

bool self_check_enabled() {
  const char* v = std::getenv("EMU_FAST_SELF_CHECK");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

double relative_error(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor ad = a.to(at::kDouble), bd = b.to(at::kDouble);
  const at::Tensor b_finite = at::isfinite(bd);
  // Ours non-finite where ATen's is finite: wrong however small the rest of the error.
  if (at::logical_and(b_finite, at::isfinite(ad).logical_not()).any().item<bool>())
    return std::numeric_limits<double>::infinity();
  // Where ATen's is not finite either (an overflowing model), only the finite part compares.
  const at::Tensor zero = at::zeros({}, bd.options());
  const at::Tensor diff = at::where(b_finite, ad - bd, zero), ref = at::where(b_finite, bd, zero);
  const double num = diff.norm().item<double>(), den = ref.norm().item<double>();
  if (num == 0.0) return 0.0;
  return den == 0.0 ? std::numeric_limits<double>::infinity() : num / den;
}

double self_check_bound(at::ScalarType dtype) {
  // float32: the 1e-4 every float32 test holds us to (observed ~1e-6), unless the user let
  // float32 matmuls run in TF32 (ATen's side of the comparison then carries ~1e-3 errors of its
  // own: a correct kernel must not fail for that). 16-bit types: rounding differences compound
  // through the layers (observed up to ~1e-2 in bfloat16 on random tiny models); a wrong kernel
  // is off by order one.
  switch (dtype) {
    case at::kFloat: {
      const auto& ctx = at::globalContext();
      const bool tf32 = ctx.allowTF32CuBLAS() || ctx.float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST;
      return tf32 ? 2e-2 : 1e-4;
    }
    case at::kHalf:
      return 2e-2;
    default:
      return 5e-2;
  }
}

void CheckedKernels::record(const char* op, const Tensor& ours, const Tensor& aten) const {
  const double e = relative_error(ours, aten);
  if (e > bound_ && (worst_name_.empty() || e > worst_)) {
    worst_name_ = op;
    worst_ = e;
  }
}

std::string CheckedKernels::worst_op(double* error) const {
  if (error != nullptr) *error = worst_;
  return worst_name_;
}

at::Tensor CheckedKernels::gemv(const Tensor& x, const Tensor& weight) const {
  return both("gemv", [&](const StepKernels& k) { return k.gemv(x, weight); });
}

at::Tensor CheckedKernels::norm_gemv(const Tensor& x, const Tensor& norm_weight, double eps,
                                     const Tensor& weight) const {
  return both("norm_gemv", [&](const StepKernels& k) { return k.norm_gemv(x, norm_weight, eps, weight); });
}

at::Tensor CheckedKernels::gemv_add(const Tensor& x, const Tensor& weight, const Tensor& residual) const {
  Tensor ref = aten_kernels().gemv_add(x, weight, residual);
  // Compared without the residual: deep in a model the residual stream is tens of times larger
  // than a projection's output, and would hide a wrong product inside the relative error.
  record("gemv_add", custom_kernels().gemv_add(x, weight, residual) - residual, ref - residual);
  return ref;
}

at::Tensor CheckedKernels::norm_gemv_silu(const Tensor& x, const Tensor& norm_weight, double eps,
                                          const Tensor& gate_up_weight) const {
  return both("norm_gemv_silu",
              [&](const StepKernels& k) { return k.norm_gemv_silu(x, norm_weight, eps, gate_up_weight); });
}

at::Tensor CheckedKernels::gemv_quantized(const Tensor& x, const Tensor& qweight, const Tensor& scales, int64_t bits,
                                          int64_t group_size) const {
  return both(quant_scheme(bits)->op,
              [&](const StepKernels& k) { return k.gemv_quantized(x, qweight, scales, bits, group_size); });
}

at::Tensor CheckedKernels::rms_norm(const Tensor& x, const Tensor& weight, double eps) const {
  return both("rms_norm", [&](const StepKernels& k) { return k.rms_norm(x, weight, eps); });
}

StepKernels::Pair CheckedKernels::add_rms_norm(const Tensor& x, const Tensor& residual, const Tensor& weight,
                                               double eps) const {
  return both("add_rms_norm", [&](const StepKernels& k) { return k.add_rms_norm(x, residual, weight, eps); });
}

at::Tensor CheckedKernels::silu_mul(const Tensor& gate_up) const {
  return both("silu_mul", [&](const StepKernels& k) { return k.silu_mul(gate_up); });
}

at::Tensor CheckedKernels::decode_attention(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& k_cache,
                                            Tensor& v_cache, const Tensor& cache_lens, const Tensor& positions,
                                            const Tensor& rope_cos, const Tensor& rope_sin, double scale,
                                            const c10::optional<Tensor>& split_counters) const {
  const Tensor ours = custom_kernels().decode_attention(q, k, v, k_cache, v_cache, cache_lens, positions, rope_cos,
                                                        rope_sin, scale, split_counters);
  Tensor ref = aten_kernels().decode_attention(q, k, v, k_cache, v_cache, cache_lens, positions, rope_cos, rope_sin,
                                               scale, split_counters);
  record("decode_attention", ours, ref);
  return ref;
}

StepKernels::Pair CheckedKernels::regression_head(const Tensor& hidden, const Tensor& norm_weight, double eps,
                                                  const Tensor& head_weight,
                                                  const c10::optional<Tensor>& up_weight) const {
  return both("regression_head",
              [&](const StepKernels& k) { return k.regression_head(hidden, norm_weight, eps, head_weight, up_weight); });
}

}  // namespace emu_fast
