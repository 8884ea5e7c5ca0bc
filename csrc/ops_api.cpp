#include "ops_api.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace emu_fast::ops {
namespace {

// The typed handle for emu_fast::<name>, looked up once.
template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_lens,
                            const at::Tensor& positions, const at::Tensor& rope_cos,
                            const at::Tensor& rope_sin, double scale) {
  static auto op = handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                                     at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, double)>("emu_fast::decode_attention");
  return op.call(q, k, v, k_cache, v_cache, cache_lens, positions, rope_cos, rope_sin, scale);
}

std::tuple<at::Tensor, at::Tensor> regression_head(const at::Tensor& hidden, const at::Tensor& norm_weight,
                                                   double eps, const at::Tensor& head_weight,
                                                   const c10::optional<at::Tensor>& up_weight) {
  static auto op = handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, double, const at::Tensor&, const c10::optional<at::Tensor>&)>(
      "emu_fast::regression_head");
  return op.call(hidden, norm_weight, eps, head_weight, up_weight);
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight) {
  static auto op = handle<at::Tensor(const at::Tensor&, const at::Tensor&)>("emu_fast::gemv");
  return op.call(x, weight);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  static auto op = handle<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("emu_fast::rms_norm");
  return op.call(x, weight, eps);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  static auto op = handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                             const at::Tensor&, double)>(
      "emu_fast::add_rms_norm");
  return op.call(x, residual, weight, eps);
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  static auto op = handle<at::Tensor(const at::Tensor&)>("emu_fast::silu_mul");
  return op.call(gate_up);
}

}  // namespace emu_fast::ops
