// The operations a decode step is made of (and the non-GEMM parts of prefill), as a set the
// decoder calls: our kernels, their ATen twins, or both side by side (the self-check, checked.h).
// A caller names the op by its handle (ops/checks.h, op::<name>: name and C++ signature), so one
// generic call serves every op and every set: `kernels.call<op::gemv>(x, w)`. Every set has the
// emu_fast ops' semantics (the schemas in ops/<op>.cpp) and the same KV-cache layout;
// emu_fast/reference.py is their oracle.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Optional.h>

#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "ops/checks.h"

namespace emu_fast {

// Test-only (ops/test_faults.cpp): makes the named custom kernel wrong on purpose (an op's name,
// as "gemv" or "gemv_int4", or "decode_step": the fused CPU step), so the tests can show the
// self-check catches it and the fallback gives the right answer; or "flip_quantized_input": the
// self-check's own step runs with int8 quantized inputs set and then the setting set back, as
// another thread may do (the check must not judge that step). "" to clear. Process-wide; never
// set outside tests.
void set_test_fault(const std::string& op);
bool test_fault(const char* op);
// t, or t + 1 when `op` is the fault set.
at::Tensor apply_test_fault(const char* op, at::Tensor t);

// The registered schema `ns::name` (ns: "emu_fast" or "emu_fast_aten"); throws if there is none.
c10::OperatorHandle find_op(const char* ns, const char* name);

class OpSet {
 public:
  // Ours: emu_fast:: (the CPU or CUDA kernel by device). ATen's: their twins, emu_fast_aten::
  // (registered beside each op in ops/<op>.cpp; any torch device: CUDA without our kernels, MPS,
  // XPU, CPU; capturable: no host syncs, fixed shapes for a fixed cache). Both go through the
  // dispatcher, so a CUDA graph captures either. Checked: each op on ours, then on ATen's from the
  // same inputs; ATen's result is returned (a step through it is the ATen step; an op that writes,
  // decode_attention's cache, leaves ATen's entries) and each op's error is recorded.
  enum class Kind { kOurs, kAten, kChecked };
  explicit OpSet(Kind kind, double bound = 0.0) : kind_(kind), bound_(bound) {}
  const char* name() const { return kind_ == Kind::kOurs ? "custom" : kind_ == Kind::kAten ? "aten" : "checked"; }

  template <typename Op, typename... A>
  typename Op::Result call(A&&... a) const {
    if (kind_ != Kind::kChecked) return run<Op>(kind_ == Kind::kAten, a...);
    typename Op::Result ours = run<Op>(false, a...);
    typename Op::Result ref = run<Op>(true, a...);
    if constexpr (Op::residual >= 0) {
      // Compared without the residual: deep in a model the residual stream is tens of times
      // larger than a projection's output, and would hide a wrong product in the relative error.
      const at::Tensor& r = std::get<Op::residual>(std::forward_as_tuple(a...));
      record(Op::name, ours - r, ref - r);
    } else if constexpr (std::is_same_v<typename Op::Result, at::Tensor>) {
      record(Op::name, ours, ref);
    } else {
      [&]<size_t... I>(std::index_sequence<I...>) {
        (record(Op::name, std::get<I>(ours), std::get<I>(ref)), ...);
      }(std::make_index_sequence<std::tuple_size_v<typename Op::Result>>{});
    }
    return ref;
  }

  // Checked sets: the op with the largest error over the bound ("" if none), and that error.
  std::string worst_op(double* error) const;

 private:
  template <typename Op>
  static const c10::TypedOperatorHandle<typename Op::Sig>& handle(bool aten) {
    static const auto ours = find_op("emu_fast", Op::name).template typed<typename Op::Sig>();
    static const auto twin = find_op("emu_fast_aten", Op::name).template typed<typename Op::Sig>();
    return aten ? twin : ours;
  }
  template <typename Op, typename... A>
  static typename Op::Result run(bool aten, A&... a) {
    typename Op::Result r = handle<Op>(aten).call(a...);
    if (aten) return r;
    // Our outputs pass through the test-only faults (nothing while none is set).
    if constexpr (std::is_same_v<typename Op::Result, at::Tensor>) {
      return apply_test_fault(Op::name, std::move(r));
    } else {
      std::get<0>(r) = apply_test_fault(Op::name, std::move(std::get<0>(r)));
      return r;
    }
  }
  void record(const char* op, const at::Tensor& ours, const at::Tensor& aten) const;

  Kind kind_;
  double bound_;
  mutable std::string worst_name_;
  mutable double worst_ = 0.0;
};

// The process-wide sets, ours and ATen's (a checked set is made for each self-check).
const OpSet& custom_kernels();
const OpSet& aten_kernels();

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

}  // namespace emu_fast
