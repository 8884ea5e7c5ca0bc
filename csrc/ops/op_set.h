// The operations a decode step is made of (and the non-GEMM parts of prefill), as a set the
// decoder calls: our kernels, their ATen twins, or both side by side (the self-check, checked.h).
// Every set has the emu_fast ops' semantics (the schemas in ops/<op>.cpp) and the same KV-cache
// layout; emu_fast/reference.py is their oracle.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <optional>
#include <string>
#include <tuple>

namespace emu_fast {

class StepKernels {
 public:
  using Tensor = at::Tensor;
  using Pair = std::tuple<at::Tensor, at::Tensor>;
  virtual ~StepKernels() = default;
  virtual const char* name() const = 0;  // "custom" or "aten"

  virtual Tensor gemv(const Tensor& x, const Tensor& weight) const = 0;
  // rms_norm(x) @ weight^T (the QKV and gate/up projections), residual + x @ weight^T (o, down).
  virtual Tensor norm_gemv(const Tensor& x, const Tensor& norm_weight, double eps, const Tensor& weight) const = 0;
  virtual Tensor gemv_add(const Tensor& x, const Tensor& weight, const Tensor& residual) const = 0;
  // silu_mul(norm_gemv(x, norm_weight, eps, gate_up_weight)): the gate/up projection and SiLU * mul.
  virtual Tensor norm_gemv_silu(const Tensor& x, const Tensor& norm_weight, double eps,
                                const Tensor& gate_up_weight) const = 0;
  // x [B, K] @ W^T for a weight-only quantized W (emu_fast/quant/schemes.py, layouts in
  // kernels/cpu/quantized_gemv.h): bits 8: qweight int8 [N, K], scales float32 [N]; bits 4: qweight
  // uint8 [N, ceil(K/32)*16], scales float32 [N, ceil(K/group_size)]. [B, N] in x's dtype.
  virtual Tensor gemv_quantized(const Tensor& x, const Tensor& qweight, const Tensor& scales, int64_t bits,
                                int64_t group_size) const = 0;
  virtual Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) const = 0;
  virtual Pair add_rms_norm(const Tensor& x, const Tensor& residual, const Tensor& weight, double eps) const = 0;
  virtual Tensor silu_mul(const Tensor& gate_up) const = 0;
  // Appends the rotated k and v at cache_lens[b] and attends over entries [0, cache_lens[b]].
  // split_counters: the op's (zeroed int32, one per sequence and KV head; ours use it on CUDA to
  // merge the split-KV partials in the same launch, ATen's ignores it).
  virtual Tensor decode_attention(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& k_cache,
                                  Tensor& v_cache, const Tensor& cache_lens, const Tensor& positions,
                                  const Tensor& rope_cos, const Tensor& rope_sin, double scale,
                                  const c10::optional<Tensor>& split_counters) const = 0;
  virtual Pair regression_head(const Tensor& hidden, const Tensor& norm_weight, double eps, const Tensor& head_weight,
                               const c10::optional<Tensor>& up_weight) const = 0;
};

// The op sets. Each is the same class over an op namespace, through the dispatcher (so a CUDA
// graph captures either): ours, emu_fast:: (the CPU or CUDA kernel by device), and their ATen
// twins, emu_fast_aten:: (registered beside each op in ops/<op>.cpp; any torch device: CUDA
// without our kernels, MPS, XPU, CPU; capturable: no host syncs, fixed shapes for a fixed cache).
// checked.h compares the two.
const StepKernels& custom_kernels();
const StepKernels& aten_kernels();

// The weight a quantized projection computes with ([N, in_features], float32 inside, then
// `dtype`): emu_fast.quant.schemes.dequantize_int8 / dequantize_int4 in ATen, on qweight's device.
at::Tensor dequantize_weight(const at::Tensor& qweight, const at::Tensor& scales, int64_t bits, int64_t group_size,
                             int64_t in_features, at::ScalarType dtype);
// Rows [first, first + out.size(0)) of the same into out [rows, in_features] (contiguous), bitwise
// equal, rounded to `values` (default: out's dtype; bfloat16 values in a float32 out is what a
// bfloat16 model's prefill multiplies by in float32); on the CPU one pass
// (kernels/cpu/quantized_gemv.h), elsewhere the composition above.
void dequantize_weight_rows(const at::Tensor& qweight, const at::Tensor& scales, int64_t bits, int64_t group_size,
                            int64_t first, const at::Tensor& out, std::optional<at::ScalarType> values = std::nullopt);

// Whether our kernels run on `device` for `dtype` (with a head size and query group the CUDA
// attention takes); if not, `why` says what is missing.
bool custom_kernels_support(const at::Device& device, at::ScalarType dtype, int64_t head_dim, int64_t group,
                            std::string* why);

// Whether the quantized GEMV op for `bits` (emu_fast::gemv_int8 / gemv_int4) has a kernel for
// `device`'s backend (the CPU always; CUDA where one is registered); if not, `why` says so.
bool custom_quantized_support(const at::Device& device, int64_t bits, std::string* why);

// Test-only (ops/test_faults.cpp): makes the named custom kernel wrong on purpose ("gemv", "norm_gemv", "gemv_add",
// "norm_gemv_silu", "rms_norm", "add_rms_norm", "silu_mul", "decode_attention", "gemv_int8", "gemv_int4",
// "regression_head", or "decode_step": the fused CPU step), so
// the tests can show the self-check catches it and the fallback gives the right answer; or
// "flip_quantized_input": the self-check's own step runs with int8 quantized inputs set and
// then the setting set back, as another thread may do (the check must not judge that step).
// "" to clear. Process-wide; never set outside tests.
void set_test_fault(const std::string& op);
bool test_fault(const char* op);
// t, or t + 1 when `op` is the fault set.
at::Tensor apply_test_fault(const char* op, at::Tensor t);

}  // namespace emu_fast
