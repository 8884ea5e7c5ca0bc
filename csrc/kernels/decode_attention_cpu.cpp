// The CPU instantiations of decode_attention_head, one per instruction set.
#include "kernels/decode_attention.h"
#include "kernels/multiversion.h"

namespace emu_fast::kernels {
namespace {

#define EMU_ATTENTION_ARGS(T)                                                                      \
  const DecodeHeadArgs &a, const T *q, int64_t q_head_stride, const T *k, const T *v, T *k_cache, \
      T *v_cache, float *scratch, T *out, int64_t out_head_stride
#define EMU_ATTENTION_CALL decode_attention_head(a, q, q_head_stride, k, v, k_cache, v_cache, scratch, out, out_head_stride)

template <typename T>
void head_portable(EMU_ATTENTION_ARGS(T)) { EMU_ATTENTION_CALL; }

#ifdef EMU_X86
template <typename T>
EMU_TARGET_AVX512 void head_avx512(EMU_ATTENTION_ARGS(T)) { EMU_ATTENTION_CALL; }
template <typename T>
EMU_TARGET_AVX2 void head_avx2(EMU_ATTENTION_ARGS(T)) { EMU_ATTENTION_CALL; }
#endif

template <typename T>
void head(EMU_ATTENTION_ARGS(T)) {
  switch (cpu_isa()) {
#ifdef EMU_X86
    case Isa::kAvx512: return head_avx512<T>(a, q, q_head_stride, k, v, k_cache, v_cache, scratch, out, out_head_stride);
    case Isa::kAvx2: return head_avx2<T>(a, q, q_head_stride, k, v, k_cache, v_cache, scratch, out, out_head_stride);
#endif
    default: return head_portable<T>(a, q, q_head_stride, k, v, k_cache, v_cache, scratch, out, out_head_stride);
  }
}

}  // namespace

void decode_attention_head_cpu(EMU_ATTENTION_ARGS(float)) { head<float>(a, q, q_head_stride, k, v, k_cache, v_cache, scratch, out, out_head_stride); }
void decode_attention_head_cpu(EMU_ATTENTION_ARGS(bf16)) { head<bf16>(a, q, q_head_stride, k, v, k_cache, v_cache, scratch, out, out_head_stride); }

}  // namespace emu_fast::kernels
