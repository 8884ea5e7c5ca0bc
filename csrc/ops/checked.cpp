#include "ops/checked.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "ops/op_set.h"

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

// The checked op set's record (ops/op_set.h).
void OpSet::record(const char* op, const at::Tensor& ours, const at::Tensor& aten) const {
  const double e = relative_error(ours, aten);
  if (e > bound_ && (worst_name_.empty() || e > worst_)) {
    worst_name_ = op;
    worst_ = e;
  }
}

std::string OpSet::worst_op(double* error) const {
  if (error != nullptr) *error = worst_;
  return worst_name_;
}

}  // namespace emu_fast
