// The self-check policy: when a step is checked (the first at each batch size and quantized-input
// setting, in "auto" mode), how (the checked ATen step, then ours from the same cache), and what a
// mismatch does (a warning naming the op, then the ATen step for good).
#include "decoder/decoder.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "kernels/cpu/quantized_gemv.h"
#include "ops/checked.h"
#include "ops/checks.h"
#include "ops/op_set.h"

namespace emu_fast {

namespace {
// The process-wide quantized-input setting (set_quantized_activations) as a bit: a step checked
// under one setting says nothing about the CPU quantized GEMVs under another, so each is checked.
uint8_t setting_bit(std::optional<kernels::QuantizedInput> forced) {
  return static_cast<uint8_t>(1u << (forced ? 1 + static_cast<int>(*forced) : 0));
}
uint8_t input_setting_bit() { return setting_bit(kernels::quantized_input_override()); }
}  // namespace

bool EmuDecoder::self_check_due(int64_t batch) const {
  return mode_ == "auto" && kernels_ == &custom_kernels() &&
         (static_cast<size_t>(batch) >= self_checked_.size() || !(self_checked_[batch] & input_setting_bit())) &&
         self_check_enabled();
}

void EmuDecoder::fall_back_locked(const std::string& reason) {
  fallback_reason_ = reason;
  kernels_ = &aten_kernels();
  rebuild_step_locked();  // drops the fused CPU steps and the captured graphs
}

std::tuple<at::Tensor, at::Tensor> EmuDecoder::checked_step(const at::Tensor& prev) {
  const int64_t B = prev.size(0);
  const bool fused = fused_cpu_step_ && segs_.front().fused != nullptr;
  // The step through a checked op set first: every op ours and ATen's on the same inputs, ATen's
  // result carried on, so what comes out is the ATen step's. Then, from the same cache, our step
  // as it runs for real (the fused CPU step, or op by op): it writes its cache entries last, so
  // a passing check leaves the decoder exactly as an unchecked step would.
  const double bound = self_check_bound(final_norm_.scalar_type());
  const uint64_t generation = kernels::quantized_input_generation();  // before the setting is read
  const auto forced = kernels::quantized_input_override();
  const uint8_t setting = setting_bit(forced);
  const OpSet checked(OpSet::Kind::kChecked, bound);
  const at::Tensor x_ref = up_.has_value() ? checked.call<ops::gemv>(prev.contiguous(), *up_) : prev.contiguous();
  const auto ref = run_step_with(x_ref, checked, /*fused=*/false);
  rewind_lengths_locked(B);
  const bool flip = test_fault("flip_quantized_input");  // what another thread may do meanwhile
  if (flip) kernels::set_quantized_input_override(kernels::QuantizedInput::kInt8);
  auto ours = run_step(next_input(prev));
  if (flip) kernels::set_quantized_input_override(forced);
  double op_error = 0.0;
  const std::string op = checked.worst_op(&op_error);
  const double step_error = std::max(relative_error(std::get<0>(ours), std::get<0>(ref)),
                                     relative_error(std::get<1>(ours), std::get<1>(ref)));
  // Under int8 activations (set_quantized_activations, the CPU kernels) the whole step is held
  // more loosely than each op: the ops agree to float32 rounding (checked at `bound` above), but a
  // last-bit difference between the two steps' float32 sums can flip one input's int8 rounding,
  // a whole step (max / 127) of its block: up to 1.6e-3 seen on tiny random models. A wrong
  // kernel is off by order one.
  const bool int8_inputs =
      quant_.bits != 0 && segs_.front().device.is_cpu() && forced == kernels::QuantizedInput::kInt8;
  const double step_bound = int8_inputs ? std::max(bound, 2e-2) : bound;
  // The setting was set (from another thread) while the two steps ran, even if set back to what
  // it was: they may have taken different inputs, which says nothing about the kernels. Ours
  // stands, unchecked; the next step of this batch size checks again.
  const bool changed = kernels::quantized_input_generation() != generation;
  const bool passed_here = changed || (op.empty() && step_error <= step_bound);
  // Tensor parallelism: every rank checked its own shard; all fall back if any failed, so that
  // the ranks go on running the same steps (the same collectives).
  bool passed = passed_here;
  if (tp_size_ > 1) {
    const at::Tensor failures = at::full({1}, passed_here ? 0.f : 1.f, final_norm_.options().dtype(at::kFloat));
    all_reduce_(failures);
    passed = failures.item<float>() == 0.f;
  }
  if (passed) {
    if (!changed) {
      if (self_checked_.size() <= static_cast<size_t>(B)) self_checked_.resize(B + 1, 0);
      self_checked_[B] |= setting;
    }
    return ours;
  }
  std::ostringstream why;
  why << "emu_fast: self-check failed at batch size " << B << ": ";
  if (passed_here) {
    why << "on another tensor-parallel rank (this rank's shard agreed with ATen";
  } else if (!op.empty()) {
    why << "the custom " << op << " kernel disagrees with ATen (relative error " << op_error;
  } else {
    why << "the " << (fused ? "fused CPU decode step" : "decode step")
        << " disagrees with the ATen step although each op agrees (relative error " << step_error;
  }
  why << " > " << (op.empty() ? step_bound : bound) << " for " << py_dtype(final_norm_.scalar_type()) << ") on "
      << segs_.front().device << ". This decoder now runs the ATen step (same results, slower). Please report "
      << "this with your GPU, driver and torch versions; EMU_FAST_SELF_CHECK=0 skips the check.";
  fall_back_locked(why.str());
  // Our step's cache entries may be wrong: the ATen step once more, from the same cache.
  rewind_lengths_locked(B);
  return run_step(x_ref);
}

}  // namespace emu_fast
