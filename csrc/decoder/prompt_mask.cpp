#include "decoder/prompt_mask.h"

#include <c10/util/Exception.h>

#include "ops/checks.h"

namespace emu_fast {

PromptLayout parse_prompts(const char* who, const at::Tensor& embeds, const at::Tensor& attention_mask,
                           const PromptLimits& lim) {
  TORCH_CHECK_VALUE(embeds.dim() == 3 && embeds.size(2) == lim.hidden, who,
                    ": inputs_embeds must be [batch, tokens, ", lim.hidden, "], got ", embeds.sizes());
  TORCH_CHECK_TYPE(embeds.scalar_type() == lim.dtype, who, ": inputs_embeds are ", py_dtype(embeds.scalar_type()),
                   " but the decoder's weights are ", py_dtype(lim.dtype));
  TORCH_CHECK_VALUE(embeds.device() == lim.device, who, ": inputs_embeds are on ", embeds.device(),
                    " but the decoder is on ", lim.device);
  const int64_t B = embeds.size(0), T = embeds.size(1);
  TORCH_CHECK_VALUE(B >= 1, who, ": empty batch");
  TORCH_CHECK_VALUE(B <= lim.max_batch, who, ": batch of ", B, " prompts exceeds the decoder's max_batch of ",
                    lim.max_batch);
  TORCH_CHECK_VALUE(T >= 1 && T <= lim.max_seq_len, who, ": prompts of ", T,
                    " tokens (padded) do not fit the decoder's max_seq_len of ", lim.max_seq_len);
  TORCH_CHECK_VALUE(attention_mask.dim() == 2 && attention_mask.size(0) == B && attention_mask.size(1) == T, who,
                    ": attention_mask must be [", B, ", ", T, "], got ", attention_mask.sizes());
  TORCH_CHECK_TYPE(!c10::isFloatingType(attention_mask.scalar_type()) && !c10::isComplexType(attention_mask.scalar_type()),
                   who, ": attention_mask must be integer or bool, got ", py_dtype(attention_mask.scalar_type()));
  TORCH_CHECK_VALUE(attention_mask.device().is_cpu() || attention_mask.device() == embeds.device(), who,
                    ": attention_mask is on ", attention_mask.device(), "; it must be on the CPU or on ",
                    embeds.device());
  const at::Tensor mask = attention_mask.to(at::kCPU, at::kLong).contiguous();
  const int64_t* m = mask.data_ptr<int64_t>();
  PromptLayout p;
  p.batch = B;
  p.tokens = T;
  p.starts.resize(B);
  p.lens.resize(B);
  for (int64_t b = 0; b < B; ++b) {
    int64_t first = -1, count = 0;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t v = m[b * T + t];
      TORCH_CHECK_VALUE(v == 0 || v == 1, who, ": attention_mask holds ", v, " at (", b, ", ", t,
                        "); only 0 and 1 are allowed");
      if (v == 1) {
        if (first < 0) first = t;
        count++;
      }
    }
    TORCH_CHECK_VALUE(count > 0, who, ": prompt ", b, " has no tokens (attention_mask row is all 0)");
    for (int64_t t = first; t < first + count; ++t)
      TORCH_CHECK_VALUE(m[b * T + t] == 1, who, ": attention_mask row ", b,
                        " is not one run of ones (padding must be on the left or on the right only)");
    p.starts[b] = first;
    p.lens[b] = count;
  }
  return p;
}

}  // namespace emu_fast
