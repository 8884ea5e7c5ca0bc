// The CPU instantiations of decode_attention_head: the generic loops compiled per instruction
// set, and on AVX2 processors (AVX-512 ones too) explicit AVX2 loops for head dims that are a
// multiple of 16, the usual 64 and 128.
//
// Why: the generic scores loop reduces a 16-lane accumulator to one number for every key and
// widens bfloat16 keys with two instructions per 8 values; it takes about 18 ns a key at head
// dim 64 here. The AVX2 loops score 4 keys at a time (one three-step horizontal add for all
// four), widen bfloat16 with one shift or mask per 8 values (each 32-bit lane holds two
// bfloat16, the high half of a float32 each), and keep the query and the weighted sum's
// accumulators in the even/odd order that leaves them in, so nothing is shuffled per key.
#include "kernels/cpu/decode_attention.h"

#include <type_traits>

#include "kernels/cpu/isa.h"

namespace emu_fast::kernels {
namespace {

#ifdef EMU_X86
// 16 consecutive values as two float32 vectors a, b. float: in order. bf16: a bfloat16 is the
// high half of a float32, so the 32-bit lanes of one load give the odd values by masking off the
// low half and the even ones by shifting it up: a holds values 0, 2, .., 14 and b 1, 3, .., 15
// (position_after_load below). Shift and mask need no shuffle unit (unpacking does: one port on
// Intel).
EMU_TARGET_AVX2 EMU_ALWAYS_INLINE void load16(const float* p, __m256& a, __m256& b) {
  a = _mm256_loadu_ps(p);
  b = _mm256_loadu_ps(p + 8);
}
EMU_TARGET_AVX2 EMU_ALWAYS_INLINE void load16(const bf16* p, __m256& a, __m256& b) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  a = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  b = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

// Where value i of 16 lands in a|b (a's 8 lanes, then b's).
template <typename T>
constexpr int position_after_load(int i) {
  if constexpr (std::is_same_v<T, float>) {
    return i;
  } else {
    return i % 2 == 0 ? i / 2 : 8 + i / 2;
  }
}

// The query in load16's order, so that lane by lane it meets the key values it multiplies.
template <typename T>
EMU_ALWAYS_INLINE void to_load_order(float* q, int64_t d) {
  if constexpr (!std::is_same_v<T, float>) {
    float chunk[16];
    for (int64_t c = 0; c < d; c += 16) {
      for (int i = 0; i < 16; ++i) chunk[position_after_load<T>(i)] = q[c + i];
      for (int i = 0; i < 16; ++i) q[c + i] = chunk[i];
    }
  }
}

// Four keys at a time: 4 accumulators over the head dim, then one horizontal add of all four
// (hadd pairs lanes within 128-bit halves; the halves are added last).
template <typename T>
EMU_TARGET_AVX2 float scores_avx2(const float* q, const T* k, int64_t n, int64_t d, float scale, float* s) {
  const __m128 scale_v = _mm_set1_ps(scale);
  __m128 max_v = _mm_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    // two accumulators a key (a and b halves), so no key waits on one FMA chain
    __m256 acc_a[4], acc_b[4];
    for (int r = 0; r < 4; ++r) acc_a[r] = acc_b[r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < d; c += 16) {
      const __m256 qa = _mm256_loadu_ps(q + c), qb = _mm256_loadu_ps(q + c + 8);
      for (int r = 0; r < 4; ++r) {
        __m256 a, b;
        load16(k + (j + r) * d + c, a, b);
        acc_a[r] = _mm256_fmadd_ps(qa, a, acc_a[r]);
        acc_b[r] = _mm256_fmadd_ps(qb, b, acc_b[r]);
      }
    }
    __m256 acc[4];
    for (int r = 0; r < 4; ++r) acc[r] = _mm256_add_ps(acc_a[r], acc_b[r]);
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    const __m128 four = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)), scale_v);
    _mm_storeu_ps(s + j, four);
    max_v = _mm_max_ps(max_v, four);
  }
  alignas(16) float m[4];
  _mm_store_ps(m, max_v);
  float max_score = std::max(std::max(m[0], m[1]), std::max(m[2], m[3]));
  for (; j < n; ++j) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t c = 0; c < d; c += 16) {
      __m256 a, b;
      load16(k + j * d + c, a, b);
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + c + 8), b, _mm256_fmadd_ps(_mm256_loadu_ps(q + c), a, acc));
    }
    s[j] = hsum8(acc) * scale;
    max_score = std::max(max_score, s[j]);
  }
  return max_score;
}

// C chunks of 16 dims (up to 64) from dim c0, accumulated over all keys in 2C registers in
// load16's order, put back in order once at the end.
template <int C, typename T>
EMU_TARGET_AVX2 EMU_ALWAYS_INLINE void weighted_sum_chunks(const float* p, const T* v, int64_t n, int64_t d, int64_t c0,
                                                           float inv, T* o) {
  __m256 acc[2 * C];
  for (int c = 0; c < 2 * C; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m256 pj = _mm256_set1_ps(p[j]);
    for (int c = 0; c < C; ++c) {
      __m256 a, b;
      load16(v + j * d + c0 + 16 * c, a, b);
      acc[2 * c] = _mm256_fmadd_ps(pj, a, acc[2 * c]);
      acc[2 * c + 1] = _mm256_fmadd_ps(pj, b, acc[2 * c + 1]);
    }
  }
  alignas(32) float sums[32 * C];
  for (int c = 0; c < 2 * C; ++c) _mm256_store_ps(sums + 8 * c, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv)));
  for (int c = 0; c < C; ++c)
    for (int i = 0; i < 16; ++i) o[c0 + 16 * c + i] = from_float<T>(sums[16 * c + position_after_load<T>(i)]);
}

template <typename T>
EMU_TARGET_AVX2 void weighted_sum_avx2(const float* p, const T* v, int64_t n, int64_t d, float inv, T* o) {
  int64_t c0 = 0;
  for (; c0 + 64 <= d; c0 += 64) weighted_sum_chunks<4>(p, v, n, d, c0, inv, o);
  switch ((d - c0) / 16) {
    case 3: return weighted_sum_chunks<3>(p, v, n, d, c0, inv, o);
    case 2: return weighted_sum_chunks<2>(p, v, n, d, c0, inv, o);
    case 1: return weighted_sum_chunks<1>(p, v, n, d, c0, inv, o);
    default: return;
  }
}

// For decode_attention_head_with: the rest of the head (RoPE, softmax) stays generic, compiled
// per instruction set by run_best; these inner loops are calls into the AVX2 functions above.
struct Avx2AttentionLoops {
  template <typename T>
  EMU_ALWAYS_INLINE void prepare_query(float* q, int64_t d) const {
    to_load_order<T>(q, d);
  }
  template <typename T>
  EMU_ALWAYS_INLINE float scores(const float* q, const T* k, int64_t n, int64_t d, float scale, float* s) const {
    return scores_avx2(q, k, n, d, scale, s);
  }
  template <typename T>
  EMU_ALWAYS_INLINE void weighted_sum(const float* p, const T* v, int64_t n, int64_t d, float inv, T* o) const {
    weighted_sum_avx2(p, v, n, d, inv, o);
  }
};
#endif  // EMU_X86

template <typename T>
void decode_attention_head_best(const DecodeHeadArgs& a, const T* q, int64_t q_head_stride, const T* k, const T* v,
                                T* k_cache, T* v_cache, float* scratch, T* out, int64_t out_head_stride) {
#ifdef EMU_X86
  if (active_isa() != Isa::kPortable && a.head_dim % 16 == 0)
    return run_best([&]() EMU_LAMBDA_INLINE {
      decode_attention_head_with(a, q, q_head_stride, k, v, k_cache, v_cache, scratch, out, out_head_stride,
                                 Avx2AttentionLoops{});
    });
#endif
  run_best([&]() EMU_LAMBDA_INLINE {
    decode_attention_head(a, q, q_head_stride, k, v, k_cache, v_cache, scratch, out, out_head_stride);
  });
}

}  // namespace

void decode_attention_head_cpu(const DecodeHeadArgs& a, const float* q, int64_t q_head_stride, const float* k,
                               const float* v, float* k_cache, float* v_cache, float* scratch, float* out,
                               int64_t out_head_stride) {
  decode_attention_head_best(a, q, q_head_stride, k, v, k_cache, v_cache, scratch, out, out_head_stride);
}

void decode_attention_head_cpu(const DecodeHeadArgs& a, const bf16* q, int64_t q_head_stride, const bf16* k,
                               const bf16* v, bf16* k_cache, bf16* v_cache, float* scratch, bf16* out,
                               int64_t out_head_stride) {
  decode_attention_head_best(a, q, q_head_stride, k, v, k_cache, v_cache, scratch, out, out_head_stride);
}

}  // namespace emu_fast::kernels
