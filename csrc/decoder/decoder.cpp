#include "decoder/decoder.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include "decoder/prompt_mask.h"
#include "ops/op_set.h"

namespace emu_fast {

std::vector<std::tuple<int64_t, int64_t, std::string>> EmuDecoder::segments() const {
  std::vector<std::tuple<int64_t, int64_t, std::string>> out;
  for (const Segment& seg : segs_) out.emplace_back(seg.begin, seg.end, seg.device.str());
  return out;
}

std::string EmuDecoder::kernels() const { return kernels_->name(); }

std::string EmuDecoder::fallback_reason() const { return fallback_reason_; }

std::vector<int64_t> EmuDecoder::lengths() const {
  return std::vector<int64_t>(lengths_.begin(), lengths_.begin() + batch_);
}

void EmuDecoder::reset() {
  const std::lock_guard<std::mutex> lock(mutex_);
  reset_locked();
}

void EmuDecoder::reset_locked() {
  batch_ = 0;
  std::fill(lengths_.begin(), lengths_.end(), 0);
  std::fill(starts_.begin(), starts_.end(), 0);
  for (Segment& seg : segs_) {
    seg.lengths_dev.zero_();
    seg.starts_dev.zero_();
  }
}

at::Tensor EmuDecoder::prefill(const at::Tensor& embeds, const at::Tensor& attention_mask) {
  const std::lock_guard<std::mutex> lock(mutex_);
  const c10::NoGradGuard no_grad;  // inference only: never chain autograd history onto the cache
  const PromptLayout prompts = parse("emu_fast.EmuDecoder.prefill", embeds, attention_mask);
  fit_prompts_locked("emu_fast.EmuDecoder.prefill", prompts, 0);
  return prefill_locked(embeds, prompts);
}

at::Tensor EmuDecoder::generate(const at::Tensor& embeds, const at::Tensor& attention_mask, int64_t n) {
  const std::lock_guard<std::mutex> lock(mutex_);
  const c10::NoGradGuard no_grad;
  TORCH_CHECK_VALUE(n >= 1, kDecoderName, ".generate: n must be positive, got ", n);
  const PromptLayout prompts = parse("emu_fast.EmuDecoder.generate", embeds, attention_mask);
  for (int64_t b = 0; b < prompts.batch; ++b)
    TORCH_CHECK_VALUE(n - 1 <= max_seq_len_ - prompts.lens[b], kDecoderName, ".generate: prompt ", b, " of ",
                      prompts.lens[b], " tokens plus ", n - 1, " generated embeddings exceeds the decoder's max_seq_len of ",
                      max_seq_len_);
  fit_prompts_locked("emu_fast.EmuDecoder.generate", prompts, n - 1);
  at::Tensor result = at::empty({prompts.batch, n, output_size()}, final_norm_.options());
  const at::Tensor first = prefill_locked(embeds, prompts);
  result.select(1, 0).copy_(first);
  if (n > 1) decode_into(first, result.narrow(1, 1, n - 1));
  return result;
}

at::Tensor EmuDecoder::step(const at::Tensor& prev) {
  const std::lock_guard<std::mutex> lock(mutex_);
  const c10::NoGradGuard no_grad;
  check_step_input(prev, "step", 1);
  fit_steps_locked("emu_fast.EmuDecoder.step", 1);
  at::Tensor out = std::get<0>(self_check_due(batch_) ? checked_step(prev) : run_step(next_input(prev)));
  for (int64_t b = 0; b < batch_; ++b) lengths_[b] += 1;
  return out;
}

at::Tensor EmuDecoder::decode(const at::Tensor& prev, int64_t steps) {
  const std::lock_guard<std::mutex> lock(mutex_);
  const c10::NoGradGuard no_grad;
  check_step_input(prev, "decode", steps);
  fit_steps_locked("emu_fast.EmuDecoder.decode", steps);
  at::Tensor result = at::empty({batch_, steps, output_size()}, prev.options());
  if (steps > 0) decode_into(prev, result);
  return result;
}

}  // namespace emu_fast
