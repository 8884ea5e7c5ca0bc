// Rows that come and go, for in-flight batching (emu_fast.Engine): new prompts prefilled into
// the rows after the active ones while the rows in progress keep their cache, and finished rows
// removed with the rows after them moved down. Each row keeps its own length and first position,
// so the step already serves rows at different steps of their loops.
#include "decoder/decoder.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "decoder/prompt_mask.h"

namespace emu_fast {

at::Tensor EmuDecoder::admit(const at::Tensor& embeds, const at::Tensor& attention_mask, int64_t steps) {
  const std::lock_guard<std::mutex> lock(mutex_);
  const c10::NoGradGuard no_grad;
  const char* who = "emu_fast.EmuDecoder.admit";
  TORCH_CHECK_VALUE(steps >= 0, who, ": steps must be >= 0, got ", steps);
  const PromptLayout prompts = parse(who, embeds, attention_mask);
  const int64_t A = prompts.batch;
  TORCH_CHECK_VALUE(A <= max_batch_ - batch_, who, ": ", A, " new row(s) beside the ", batch_,
                    " active exceed the decoder's max_batch of ", max_batch_);
  int64_t len = 0, positions = 0;
  for (int64_t b = 0; b < A; ++b) {
    TORCH_CHECK_VALUE(steps <= max_seq_len_ - prompts.lens[b], who, ": prompt ", b, " of ", prompts.lens[b],
                      " tokens plus ", steps, " decode steps exceeds the decoder's max_seq_len of ", max_seq_len_);
    len = std::max(len, prompts.lens[b] + steps);
    positions = std::max(positions, prompts.starts[b] + prompts.lens[b] + steps);
  }
  for (int64_t b = 0; b < batch_; ++b) {  // the rows in progress keep what they hold
    len = std::max(len, lengths_[b]);
    positions = std::max(positions, starts_[b] + lengths_[b]);
  }
  grow_locked(batch_ + A, len, true);
  ensure_rope_locked(who, positions);
  return prefill_rows_locked(embeds, prompts, batch_);
}

void EmuDecoder::retire(const std::vector<int64_t>& rows) {
  const std::lock_guard<std::mutex> lock(mutex_);
  const c10::NoGradGuard no_grad;
  std::vector<bool> gone(batch_, false);
  for (const int64_t r : rows) {
    TORCH_CHECK_VALUE(r >= 0 && r < batch_, "emu_fast.EmuDecoder.retire: row ", r, " is not active (", batch_,
                      " active rows)");
    TORCH_CHECK_VALUE(!gone[r], "emu_fast.EmuDecoder.retire: row ", r, " given twice");
    gone[r] = true;
  }
  int64_t kept = 0;
  for (int64_t src = 0; src < batch_; ++src) {
    if (gone[src]) continue;
    if (src != kept) {
      // Row src's cached keys and values (its first lengths_[src] positions) move to row kept.
      const int64_t used = lengths_[src];
      for (Segment& seg : segs_) {
        if (used > 0) seg.kv.select(2, kept).narrow(3, 0, used).copy_(seg.kv.select(2, src).narrow(3, 0, used));
        seg.lengths_dev.narrow(0, kept, 1).copy_(seg.lengths_dev.narrow(0, src, 1));
        seg.starts_dev.narrow(0, kept, 1).copy_(seg.starts_dev.narrow(0, src, 1));
      }
      lengths_[kept] = lengths_[src];
      starts_[kept] = starts_[src];
    }
    ++kept;
  }
  for (int64_t b = kept; b < batch_; ++b) {
    lengths_[b] = 0;
    starts_[b] = 0;
  }
  for (Segment& seg : segs_) {
    seg.lengths_dev.narrow(0, kept, batch_ - kept).zero_();
    seg.starts_dev.narrow(0, kept, batch_ - kept).zero_();
  }
  batch_ = kept;
}

}  // namespace emu_fast
