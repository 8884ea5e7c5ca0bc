// The CPU instantiations of decode_attention_head, one per instruction set.
#include "kernels/decode_attention.h"
#include "kernels/multiversion.h"

namespace emu_fast::kernels {

#define EMU_ATTENTION_INSTANTIATE(T)                                                                    \
  void decode_attention_head_cpu(const DecodeHeadArgs& a, const T* q, int64_t q_head_stride, const T* k, \
                                 const T* v, T* k_cache, T* v_cache, float* scratch, T* out,             \
                                 int64_t out_head_stride) {                                              \
    run_best([&]() EMU_LAMBDA_INLINE {                                                                   \
      decode_attention_head(a, q, q_head_stride, k, v, k_cache, v_cache, scratch, out, out_head_stride); \
    });                                                                                                  \
  }

EMU_ATTENTION_INSTANTIATE(float)
EMU_ATTENTION_INSTANTIATE(bf16)

}  // namespace emu_fast::kernels
