// The norm and activation ops of a decode step: emu_fast::rms_norm, add_rms_norm (the residual
// add, then the norm) and silu_mul. Their schemas, argument checks, CPU implementations
// (kernels/cpu/norm.h) and ATen twins; CUDA: norm.cu.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "kernels/cpu/norm.h"
#include "ops/aten_twin.h"
#include "ops/checks.h"
#include "ops/cpu_glue.h"
#include "ops/registration.h"

namespace emu_fast {

namespace {

// The schemas, defined for emu_fast:: (our kernels) and emu_fast_aten:: (their ATen twins).
constexpr const char* kSchemas[] = {
    "rms_norm(Tensor x, Tensor weight, float eps) -> Tensor",
    // Returns (rms_norm(x + residual), x + residual).
    "add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)",
    // gate_up [B, 2I] = [gate | up] -> silu(gate) * up [B, I].
    "silu_mul(Tensor gate_up) -> Tensor",
};

}  // namespace

void check_rms_norm(const char* op, const at::Tensor& x, const at::Tensor& weight, bool allow_half) {
  check_dim(op, "x", x, 2);
  check_dim(op, "weight", weight, 1);
  check_float_dtype(op, "x", x, allow_half);
  check_same_dtype(op, x, "weight", weight);
  check_same_device(op, x, "weight", weight);
  TORCH_CHECK_VALUE(weight.size(0) == x.size(1), "emu_fast.", op, ": weight ", weight.sizes(),
                    " does not match x ", x.sizes());
  check_contiguous(op, "weight", weight);
}

void check_add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                        bool allow_half) {
  const char* op = "add_rms_norm";
  check_rms_norm(op, x, weight, allow_half);
  check_same_dtype(op, x, "residual", residual);
  check_same_device(op, x, "residual", residual);
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes(), "emu_fast.", op, ": residual ", residual.sizes(),
                    " does not match x ", x.sizes());
}

void check_silu_mul(const at::Tensor& gate_up, bool allow_half) {
  const char* op = "silu_mul";
  check_dim(op, "gate_up", gate_up, 2);
  check_float_dtype(op, "gate_up", gate_up, allow_half);
  TORCH_CHECK_VALUE(gate_up.size(1) % 2 == 0, "emu_fast.", op, ": gate_up must be [gate | up]; its width ",
                    gate_up.size(1), " is odd");
}

namespace {

using namespace cpu_glue;

// ---- CPU ----

at::Tensor rms_norm_cpu(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  check_rms_norm("rms_norm", x_in, weight, false);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), H = x.size(1);
  at::Tensor out = at::empty({B, H}, x.options());
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    rms_norm_rows(ptr<T>(x), H, ptr<T>(weight), static_cast<float>(eps), B, H, ptr<T>(out));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x_in, const at::Tensor& residual_in,
                                                    const at::Tensor& weight, double eps) {
  check_add_rms_norm(x_in, residual_in, weight, false);
  const at::Tensor x = x_in.contiguous(), residual = residual_in.contiguous();
  const int64_t B = x.size(0), H = x.size(1);
  at::Tensor normed = at::empty({B, H}, x.options());
  at::Tensor sum = at::empty({B, H}, x.options());
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, B, grain_rows(H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        kernels::add_rms_norm_row_cpu(ptr<T>(x) + b * H, ptr<T>(residual) + b * H, ptr<T>(weight),
                                  static_cast<float>(eps), H, ptr<T>(sum) + b * H, ptr<T>(normed) + b * H);
    });
  });
  return {normed, sum};
}

at::Tensor silu_mul_cpu(const at::Tensor& gate_up) {
  check_silu_mul(gate_up, false);
  return silu_mul_unchecked(gate_up);
}

// ---- ATen twins: the same op in plain ATen (any device; the portable step) ----

std::tuple<at::Tensor, at::Tensor> add_rms_norm_aten(const at::Tensor& x, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps) {
  const at::Tensor sum = x + residual;  // rounded to the dtype before the norm, as the kernels do
  return {aten_twin::rms_norm(sum, weight, eps), sum};
}

}  // namespace

EMU_FAST_DEFINE_OP_AND_TWIN(kSchemas)

TORCH_LIBRARY_IMPL(emu_fast, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("add_rms_norm", &add_rms_norm_cpu);
  m.impl("silu_mul", &silu_mul_cpu);
}

TORCH_LIBRARY_IMPL(emu_fast_aten, CompositeExplicitAutograd, m) {
  m.impl("rms_norm", &aten_twin::rms_norm);
  m.impl("add_rms_norm", &add_rms_norm_aten);
  m.impl("silu_mul", &aten_twin::silu_mul);
}

}  // namespace emu_fast
