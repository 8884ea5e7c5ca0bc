// EmuDecoder's prompt input: checks inputs_embeds [B, T, H] and attention_mask [B, T] against
// the decoder and reads each row's one run of ones (left or right padding).
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

namespace emu_fast {

struct PromptLayout {
  int64_t batch = 0, tokens = 0;       // B, T (padded)
  std::vector<int64_t> starts, lens;   // per row: first valid token (its left padding), count
};

struct PromptLimits {
  int64_t hidden, max_batch, max_seq_len;
  at::ScalarType dtype;
  at::Device device;
};

// `who` names the caller in messages ("emu_fast.EmuDecoder.prefill"). Reads the mask on the
// host (one small copy); raises ValueError/TypeError naming what is wrong.
PromptLayout parse_prompts(const char* who, const at::Tensor& inputs_embeds, const at::Tensor& attention_mask,
                           const PromptLimits& limits);

}  // namespace emu_fast
