// The GEMV ops of a decode step: emu_fast::gemv, norm_gemv (rms_norm as the GEMV's prologue),
// gemv_add (the residual add as its epilogue), norm_gemv_silu (SiLU * mul as its epilogue) and
// regression_head (compose.h). Their schemas, argument checks, CPU implementations
// (kernels/cpu/gemv.h) and ATen twins; CUDA: gemv.cu.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "kernels/cpu/gemv.h"
#include "ops/aten_twin.h"
#include "ops/checks.h"
#include "ops/compose.h"
#include "ops/cpu_glue.h"
#include "ops/registration.h"

namespace emu_fast {

namespace {

// The schemas, defined for emu_fast:: (our kernels) and emu_fast_aten:: (their ATen twins).
constexpr const char* kSchemas[] = {
    // Per-step glue. gemv: x [B,K] @ weight[N,K]^T with float32 accumulation, for small B.
    "gemv(Tensor x, Tensor weight) -> Tensor",
    // The decode step's fused projections. norm_gemv: rms_norm(x; norm_weight, eps) @ weight^T,
    // the normalized rows rounded to the dtype as rms_norm rounds them (the QKV and gate/up
    // projections with their norm as the GEMV's prologue). gemv_add: residual + x @ weight^T, the
    // product rounded to the dtype, then the sum (the o and down projections with the residual
    // add as their epilogue). residual is [B, N].
    "norm_gemv(Tensor x, Tensor norm_weight, float eps, Tensor weight) -> Tensor",
    "gemv_add(Tensor x, Tensor weight, Tensor residual) -> Tensor",
    // The gate/up projection with SiLU * mul as its epilogue: gate_up_weight [2I, K] = [gate rows;
    // up rows] -> silu_mul(norm_gemv(x, norm_weight, eps, gate_up_weight)) [B, I], rounded as that
    // composition rounds (each product to the dtype, silu(gate) to the dtype, then the product).
    "norm_gemv_silu(Tensor x, Tensor norm_weight, float eps, Tensor gate_up_weight) -> Tensor",
    // The regression head: out = rms_norm(hidden) @ head_weight^T, and, when up_weight is given,
    // next_input = out @ up_weight^T (Emu2's project_up); otherwise next_input is [B,0] and the
    // output itself is the next input (Emu1). Each weight is read once for the whole batch.
    "regression_head(Tensor hidden, Tensor norm_weight, float eps, Tensor head_weight, Tensor? up_weight) -> (Tensor, Tensor)",
};

// x [B, K] @ weight [N, K]^T (named `name` in messages), for each GEMV op.
void check_gemv_operands(const char* op, const at::Tensor& x, const at::Tensor& weight, bool allow_half,
                         const char* name = "weight") {
  check_dim(op, "x", x, 2);
  check_dim(op, name, weight, 2);
  check_float_dtype(op, "x", x, allow_half);
  check_same_dtype(op, x, name, weight);
  check_same_device(op, x, name, weight);
  TORCH_CHECK_VALUE(x.size(1) == weight.size(1), "emu_fast.", op, ": x ", x.sizes(), " does not match ", name, " ",
                    weight.sizes(), " (inner sizes differ)");
  check_contiguous(op, name, weight);
}

// A further operand of a GEMV op: `dim` dimensions, x's dtype and device.
void check_operand(const char* op, const at::Tensor& x, const char* name, const at::Tensor& t, int64_t dim) {
  check_dim(op, name, t, dim);
  check_same_dtype(op, x, name, t);
  check_same_device(op, x, name, t);
}

// x [B, K], norm_weight [K], weight [N, K] (named `name`): the operands of the norm GEMV ops.
void check_norm_gemv_operands(const char* op, const at::Tensor& x, const at::Tensor& norm_weight,
                              const at::Tensor& weight, bool allow_half, const char* name) {
  check_gemv_operands(op, x, weight, allow_half, name);
  check_operand(op, x, "norm_weight", norm_weight, 1);
  TORCH_CHECK_VALUE(norm_weight.size(0) == x.size(1), "emu_fast.", op, ": norm_weight ", norm_weight.sizes(),
                    " does not match x ", x.sizes());
  check_contiguous(op, "norm_weight", norm_weight);
}

}  // namespace

void check_gemv(const at::Tensor& x, const at::Tensor& weight, bool allow_half) {
  check_gemv_operands("gemv", x, weight, allow_half);
}

void check_norm_gemv(const at::Tensor& x, const at::Tensor& norm_weight, const at::Tensor& weight, bool allow_half) {
  check_norm_gemv_operands("norm_gemv", x, norm_weight, weight, allow_half, "weight");
}

void check_norm_gemv_silu(const at::Tensor& x, const at::Tensor& norm_weight, const at::Tensor& gate_up_weight,
                          bool allow_half) {
  const char* op = "norm_gemv_silu";
  check_norm_gemv_operands(op, x, norm_weight, gate_up_weight, allow_half, "gate_up_weight");
  TORCH_CHECK_VALUE(gate_up_weight.size(0) % 2 == 0, "emu_fast.", op,
                    ": gate_up_weight must be [gate rows; up rows]; its ", gate_up_weight.size(0), " rows are odd");
}

void check_gemv_add(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& residual, bool allow_half) {
  const char* op = "gemv_add";
  check_gemv_operands(op, x, weight, allow_half);
  check_operand(op, x, "residual", residual, 2);
  TORCH_CHECK_VALUE(residual.size(0) == x.size(0) && residual.size(1) == weight.size(0), "emu_fast.", op,
                    ": residual ", residual.sizes(), " is not [", x.size(0), ", ", weight.size(0), "]");
}

void check_regression_head(const at::Tensor& hidden, const at::Tensor& norm_weight,
                           const at::Tensor& head_weight, const c10::optional<at::Tensor>& up_weight,
                           bool allow_half) {
  const char* op = "regression_head";
  check_dim(op, "hidden", hidden, 2);
  check_dim(op, "norm_weight", norm_weight, 1);
  check_dim(op, "head_weight", head_weight, 2);
  check_float_dtype(op, "hidden", hidden, allow_half);
  check_same_dtype(op, hidden, "norm_weight", norm_weight);
  check_same_dtype(op, hidden, "head_weight", head_weight);
  check_same_device(op, hidden, "norm_weight", norm_weight);
  check_same_device(op, hidden, "head_weight", head_weight);
  const int64_t H = hidden.size(1);
  TORCH_CHECK_VALUE(norm_weight.size(0) == H && head_weight.size(1) == H, "emu_fast.", op,
                    ": hidden size ", H, " does not match norm_weight ", norm_weight.sizes(),
                    " and head_weight ", head_weight.sizes());
  check_contiguous(op, "head_weight", head_weight);
  check_contiguous(op, "norm_weight", norm_weight);
  if (up_weight.has_value()) {
    const auto& up = *up_weight;
    check_dim(op, "up_weight", up, 2);
    check_same_dtype(op, hidden, "up_weight", up);
    check_same_device(op, hidden, "up_weight", up);
    TORCH_CHECK_VALUE(up.size(1) == head_weight.size(0), "emu_fast.", op, ": up_weight ", up.sizes(),
                      " does not take the head's output size ", head_weight.size(0));
    check_contiguous(op, "up_weight", up);
  }
}

namespace {

using namespace cpu_glue;

// ---- CPU ----

// y [B, N] = xf [B, K] (widened to float32) @ w^T, float32 accumulation, rounded to T once.
template <typename T>
void gemv_widened(const T* w, const float* xf, T* out, int64_t B, int64_t K, int64_t N) {
  if (B == 0 || N == 0) return;
  into_output(out, B, N, [&](float* y) {
    at::parallel_for(0, N, grain_rows(K * B), [&](int64_t n0, int64_t n1) {
      kernels::gemv_rows(w, xf, y, B, K, N, n0, n1);
    });
  });
}

// The CPU backend of the compositions in compose.h.
template <typename T>
struct CpuBackend {
  static bool ok(bool) { return true; }
  bool gemv(const T* w, const T* x, int64_t ldx, T* y, int64_t B, int64_t K, int64_t N) {
    std::vector<float> xf(B * K);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < K; ++k) xf[b * K + k] = kernels::to_float(x[b * ldx + k]);
    gemv_widened(w, xf.data(), y, B, K, N);
    return true;
  }
  bool norm_gemv(const T* w, const T* x, int64_t ldx, T* y, const T* norm_w, float eps, int64_t B, int64_t K,
                 int64_t N) {
    std::vector<T> normed(B * K);
    rms_norm_rows(x, ldx, norm_w, eps, B, K, normed.data());
    return gemv(w, normed.data(), K, y, B, K, N);
  }
};

at::Tensor gemv_cpu(const at::Tensor& x, const at::Tensor& weight) {
  check_gemv(x, weight, false);
  const int64_t B = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor out = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return out;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    gemv_widened(ptr<T>(weight), widen_rows<T>(x).data(), ptr<T>(out), B, K, N);
  });
  return out;
}

// x [B, K] with unit column stride: as it is, else a contiguous copy (what the backend takes).
at::Tensor unit_columns(const at::Tensor& x) { return x.stride(1) == 1 ? x : x.contiguous(); }

// rms_norm(x) @ weight^T, the operands already checked (norm_gemv, norm_gemv_silu).
at::Tensor norm_gemv_unchecked(const at::Tensor& x_in, const at::Tensor& norm_weight, double eps,
                               const at::Tensor& weight) {
  const at::Tensor x = unit_columns(x_in);
  const int64_t B = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor out = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return out;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    CpuBackend<T>{}.norm_gemv(ptr<T>(weight), ptr<T>(x), x.stride(0), ptr<T>(out), ptr<T>(norm_weight),
                              static_cast<float>(eps), B, K, N);
  });
  return out;
}

at::Tensor norm_gemv_cpu(const at::Tensor& x, const at::Tensor& norm_weight, double eps, const at::Tensor& weight) {
  check_norm_gemv(x, norm_weight, weight, false);
  return norm_gemv_unchecked(x, norm_weight, eps, weight);
}

// residual + x @ weight^T: the product rounded to the dtype, then the sum (as ATen's
// residual + linear(x, weight), and as the fused CPU step adds a projection to the residual).
at::Tensor gemv_add_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& residual_in) {
  check_gemv_add(x, weight, residual_in, false);
  const int64_t B = x.size(0), K = x.size(1), N = weight.size(0);
  const at::Tensor residual = residual_in.contiguous();
  at::Tensor out = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return out;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    T* y = ptr<T>(out);
    const T* r = ptr<T>(residual);
    gemv_widened(ptr<T>(weight), widen_rows<T>(x).data(), y, B, K, N);
    for (int64_t i = 0; i < B * N; ++i) y[i] = kernels::from_float<T>(kernels::to_float(r[i]) + kernels::to_float(y[i]));
  });
  return out;
}

// The composition itself: the CPU decode step fuses it (decoder/cpu_decode_step.cpp), not this op.
at::Tensor norm_gemv_silu_cpu(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                              const at::Tensor& gate_up_weight) {
  check_norm_gemv_silu(x, norm_weight, gate_up_weight, false);
  return silu_mul_unchecked(norm_gemv_unchecked(x, norm_weight, eps, gate_up_weight));
}

std::tuple<at::Tensor, at::Tensor> regression_head_cpu(const at::Tensor& hidden, const at::Tensor& norm_weight,
                                                       double eps, const at::Tensor& head_weight,
                                                       const c10::optional<at::Tensor>& up_weight) {
  check_regression_head(hidden, norm_weight, head_weight, up_weight, false);
  const at::Tensor h = hidden.contiguous();
  const int64_t B = h.size(0), H = h.size(1), Dout = head_weight.size(0);
  at::Tensor out = at::empty({B, Dout}, h.options());
  at::Tensor next = at::empty({B, up_weight.has_value() ? H : 0}, h.options());
  dispatch_float(h.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    CpuBackend<T> cpu;
    compose::regression_head<T>(cpu, ptr<T>(h), H, ptr<T>(norm_weight), static_cast<float>(eps), ptr<T>(head_weight),
                                up_weight.has_value() ? ptr<T>(*up_weight) : nullptr, ptr<T>(out), ptr<T>(next), B, H,
                                Dout);
  });
  return {out, next};
}

// ---- ATen twins: the same op in plain ATen (any device; the portable step) ----

// float32 accumulation, one rounding (as cuBLAS/oneDNN do for bf16 and as the reference does).
at::Tensor gemv_aten(const at::Tensor& x, const at::Tensor& weight) { return at::linear(x, weight); }

at::Tensor norm_gemv_aten(const at::Tensor& x, const at::Tensor& norm_weight, double eps, const at::Tensor& weight) {
  return at::linear(aten_twin::rms_norm(x, norm_weight, eps), weight);
}

at::Tensor norm_gemv_silu_aten(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                               const at::Tensor& gate_up_weight) {
  return aten_twin::silu_mul(norm_gemv_aten(x, norm_weight, eps, gate_up_weight));
}

// The product rounded to the dtype, then the sum: as the kernels' epilogue rounds it.
at::Tensor gemv_add_aten(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& residual) {
  return residual + at::linear(x, weight);
}

std::tuple<at::Tensor, at::Tensor> regression_head_aten(const at::Tensor& hidden, const at::Tensor& norm_weight,
                                                        double eps, const at::Tensor& head_weight,
                                                        const c10::optional<at::Tensor>& up_weight) {
  const at::Tensor out = norm_gemv_aten(hidden, norm_weight, eps, head_weight);
  if (!up_weight.has_value()) return {out, hidden.new_empty({hidden.size(0), 0})};
  return {out, at::linear(out, *up_weight)};
}

}  // namespace

EMU_FAST_DEFINE_OP_AND_TWIN(kSchemas)

TORCH_LIBRARY_IMPL(emu_fast, CPU, m) {
  m.impl("gemv", &gemv_cpu);
  m.impl("norm_gemv", &norm_gemv_cpu);
  m.impl("gemv_add", &gemv_add_cpu);
  m.impl("norm_gemv_silu", &norm_gemv_silu_cpu);
  m.impl("regression_head", &regression_head_cpu);
}

TORCH_LIBRARY_IMPL(emu_fast_aten, CompositeExplicitAutograd, m) {
  m.impl("gemv", &gemv_aten);
  m.impl("norm_gemv", &norm_gemv_aten);
  m.impl("gemv_add", &gemv_add_aten);
  m.impl("norm_gemv_silu", &norm_gemv_silu_aten);
  m.impl("regression_head", &regression_head_aten);
}

}  // namespace emu_fast
