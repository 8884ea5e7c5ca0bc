// The first-use self-check: before a decoder trusts our kernels at a batch size, one decode
// step runs on them and on the ATen step (ops/op_set.h) from the same cache and input, and
// every op is compared with its ATen twin on the same inputs. A mismatch (an error over the
// dtype's bound, or a non-finite value where ATen's is finite) makes the decoder warn once,
// naming the op and the batch size, and fall back to the ATen step for good. Our kernels have
// only been run on a CPU emulator of CUDA; on a user's GPU this is what stands between a
// wrong kernel and a wrong image. EMU_FAST_SELF_CHECK=0 turns it off.
#pragma once
#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "ops/op_set.h"

namespace emu_fast {

// Off only when the environment says EMU_FAST_SELF_CHECK=0 (read at each check).
bool self_check_enabled();

// ||a - b|| / ||b|| over all elements in float64 (0 when both are zero); +inf when a has a
// non-finite value where b is finite. Syncs with the device.
double relative_error(const at::Tensor& a, const at::Tensor& b);

// The largest relative error (as above) a step or an op may show against ATen in this dtype:
// rounding differences only (accumulation order, one ulp of the storage type per op).
double self_check_bound(at::ScalarType dtype);

// Runs each op on our kernels and on ATen's from the same inputs and returns ATen's result, so
// a whole step through it is the ATen step; records each op's worst error. decode_attention:
// ours appends first, then ATen's appends the same entries over it.
class CheckedKernels final : public StepKernels {
 public:
  explicit CheckedKernels(double bound) : bound_(bound) {}
  const char* name() const override { return "checked"; }
  Tensor gemv(const Tensor& x, const Tensor& weight) const override;
  Tensor norm_gemv(const Tensor& x, const Tensor& norm_weight, double eps, const Tensor& weight) const override;
  Tensor gemv_add(const Tensor& x, const Tensor& weight, const Tensor& residual) const override;
  Tensor norm_gemv_silu(const Tensor& x, const Tensor& norm_weight, double eps,
                        const Tensor& gate_up_weight) const override;
  Tensor gemv_quantized(const Tensor& x, const Tensor& qweight, const Tensor& scales, int64_t bits,
                        int64_t group_size) const override;
  Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) const override;
  Pair add_rms_norm(const Tensor& x, const Tensor& residual, const Tensor& weight, double eps) const override;
  Tensor silu_mul(const Tensor& gate_up) const override;
  Tensor decode_attention(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& k_cache, Tensor& v_cache,
                          const Tensor& cache_lens, const Tensor& positions, const Tensor& rope_cos,
                          const Tensor& rope_sin, double scale,
                          const c10::optional<Tensor>& split_counters) const override;
  Pair regression_head(const Tensor& hidden, const Tensor& norm_weight, double eps, const Tensor& head_weight,
                       const c10::optional<Tensor>& up_weight) const override;

  // The op with the largest error over the bound ("" if none), and that error.
  std::string worst_op(double* error) const;

 private:
  void record(const char* op, const Tensor& ours, const Tensor& aten) const;
  void record(const char* op, const Pair& ours, const Pair& aten) const {
    record(op, std::get<0>(ours), std::get<0>(aten));
    record(op, std::get<1>(ours), std::get<1>(aten));
  }
  // run(kernels) on ATen's kernels, then on ours from the same inputs; records the op's error and
  // returns ATen's result (a Tensor or a Pair).
  template <typename Run>
  auto both(const char* op, Run&& run) const {
    auto ref = run(aten_kernels());
    record(op, run(custom_kernels()), ref);
    return ref;
  }
  double bound_;
  mutable std::string worst_name_;
  mutable double worst_ = 0.0;
};

}  // namespace emu_fast
