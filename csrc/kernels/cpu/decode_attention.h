// One decode step of attention for one sequence and one KV head, torch-free.
//
// The new token's key is rotated (RoPE, rotate-half convention as in Hugging Face LLaMA) and
// appended with its value at cache index `len`; each query head of the group is rotated and
// attends over cache entries [0, len]. Scores, softmax and the weighted sum are float32.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/cpu/fast_math.h"
#include "kernels/cpu/isa.h"
#include "kernels/cpu/scalar.h"

namespace emu_fast::kernels {

// out[i] = x1*c - x2*s, out[i+h] = x2*c + x1*s with (x1, x2) the two halves of x, h = dim/2.
template <typename T>
EMU_ALWAYS_INLINE void rope_rotate(const T* x, const float* cos, const float* sin, int64_t dim, float* out) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
    out[i] = x1 * cos[i] - x2 * sin[i];
    out[i + half] = x2 * cos[i] + x1 * sin[i];
  }
}

// sum_i a[i] * b[i] with 16 independent float lanes, so it vectorizes without -ffast-math.
template <typename T>
EMU_ALWAYS_INLINE float dot_lanes(const float* a, const T* b, int64_t n) {
  constexpr int kLanes = 16;
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * to_float(b[i + j]);
  float s = 0.f;
  for (; i < n; ++i) s += a[i] * to_float(b[i]);
  // Pairwise: four vectorizable halvings instead of a 16-long dependent chain.
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return s + acc[0];
}

struct DecodeHeadArgs {
  int64_t head_dim;
  int64_t group;       // query heads per KV head
  int64_t len;         // entries already in the cache; the new one goes at index len
  float scale;         // softmax scale, 1/sqrt(head_dim)
  const float* cos;    // [head_dim/2] at this token's position
  const float* sin;
};

// scores[j] = scale * q . k_row j for j < n (k rows of d), returning the largest.
template <typename T>
EMU_ALWAYS_INLINE float attention_scores(const float* q, const T* k, int64_t n, int64_t d, float scale, float* scores) {
  float max_score = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    const float s = dot_lanes(q, k + j * d, d) * scale;
    scores[j] = s;
    max_score = std::max(max_score, s);
  }
  return max_score;
}

// out = inv * sum_j p_j v_row j, in chunks of 32 dims so the accumulator lives in registers and
// each value row is read once per chunk.
template <typename T>
EMU_ALWAYS_INLINE void attention_weighted_sum(const float* p, const T* v, int64_t n, int64_t d, float inv, T* o) {
  constexpr int64_t kChunk = 32;
  int64_t i0 = 0;
  for (; i0 + kChunk <= d; i0 += kChunk) {
    float acc[kChunk] = {};
    for (int64_t j = 0; j < n; ++j) {
      const float pj = p[j];
      const T* vr = v + j * d + i0;
      for (int64_t t = 0; t < kChunk; ++t) acc[t] += pj * to_float(vr[t]);
    }
    for (int64_t t = 0; t < kChunk; ++t) o[i0 + t] = from_float<T>(acc[t] * inv);
  }
  for (; i0 < d; ++i0) {
    float acc = 0.f;
    for (int64_t j = 0; j < n; ++j) acc += p[j] * to_float(v[j * d + i0]);
    o[i0] = from_float<T>(acc * inv);
  }
}

// The generic inner loops above, for decode_attention_head_with.
struct GenericAttentionLoops {
  template <typename T>
  EMU_ALWAYS_INLINE void prepare_query(float*, int64_t) const {}
  template <typename T>
  EMU_ALWAYS_INLINE float scores(const float* q, const T* k, int64_t n, int64_t d, float scale, float* s) const {
    return attention_scores(q, k, n, d, scale, s);
  }
  template <typename T>
  EMU_ALWAYS_INLINE void weighted_sum(const float* p, const T* v, int64_t n, int64_t d, float inv, T* o) const {
    attention_weighted_sum(p, v, n, d, inv, o);
  }
};

// q: `group` query heads, query head g at q + g * q_head_stride; k, v: this token's [head_dim].
// k_cache, v_cache: this (sequence, KV head)'s [capacity, head_dim] rows.
// scratch: float32 of at least len + 1 + head_dim; out: group rows at out + g * out_head_stride.
// Loops: the scores and weighted-sum loops (GenericAttentionLoops, or a vectorized set that
// first puts the rotated query in its own order, prepare_query).
template <typename T, typename Loops>
EMU_ALWAYS_INLINE void decode_attention_head_with(const DecodeHeadArgs& a, const T* q, int64_t q_head_stride,
                                                  const T* k, const T* v, T* k_cache, T* v_cache, float* scratch,
                                                  T* out, int64_t out_head_stride, const Loops& loops) {
  const int64_t d = a.head_dim, n = a.len + 1;
  float* q_rot = scratch;       // [d]
  float* scores = scratch + d;  // [n]

  // Append: the cache holds keys already rotated, in the storage type.
  rope_rotate(k, a.cos, a.sin, d, q_rot);
  for (int64_t i = 0; i < d; ++i) {
    k_cache[a.len * d + i] = from_float<T>(q_rot[i]);
    v_cache[a.len * d + i] = v[i];
  }

  for (int64_t g = 0; g < a.group; ++g) {
    rope_rotate(q + g * q_head_stride, a.cos, a.sin, d, q_rot);
    loops.template prepare_query<T>(q_rot, d);
    const float max_score = loops.scores(q_rot, k_cache, n, d, a.scale, scores);
    for (int64_t j = 0; j < n; ++j) scores[j] = exp_nonpositive(scores[j] - max_score);
    float denom = 0.f;
    for (int64_t j = 0; j < n; ++j) denom += scores[j];
    loops.weighted_sum(scores, v_cache, n, d, 1.f / denom, out + g * out_head_stride);
  }
}

template <typename T>
EMU_ALWAYS_INLINE void decode_attention_head(const DecodeHeadArgs& a, const T* q, int64_t q_head_stride, const T* k,
                                             const T* v, T* k_cache, T* v_cache, float* scratch, T* out,
                                             int64_t out_head_stride) {
  decode_attention_head_with(a, q, q_head_stride, k, v, k_cache, v_cache, scratch, out, out_head_stride,
                             GenericAttentionLoops{});
}

// The two CPU instantiations, compiled per instruction set (decode_attention_cpu.cpp).
void decode_attention_head_cpu(const DecodeHeadArgs& a, const float* q, int64_t q_head_stride,
                               const float* k, const float* v, float* k_cache, float* v_cache,
                               float* scratch, float* out, int64_t out_head_stride);
void decode_attention_head_cpu(const DecodeHeadArgs& a, const bf16* q, int64_t q_head_stride,
                               const bf16* k, const bf16* v, bf16* k_cache, bf16* v_cache,
                               float* scratch, bf16* out, int64_t out_head_stride);

// A batch's decode attention as (sequence, KV head) tasks, so callers can split them across
// threads: q [B, Hq, D], k/v [B, Hkv, D] (rows at the given batch strides, e.g. slices of one
// fused QKV row), caches [Bmax, Hkv, capacity, D], out [B, Hq, D] contiguous.
template <typename T>
struct DecodeBatch {
  const T *q, *k, *v;
  int64_t q_stride, k_stride, v_stride;
  T *k_cache, *v_cache, *out;
  int64_t heads, kv_heads, head_dim, capacity;
  const int64_t *lengths, *positions;
  const float *rope_cos, *rope_sin;  // [P, D/2]
  float scale;
};

// Runs tasks [t0, t1); task t is sequence t / kv_heads, KV head t % kv_heads.
template <typename T>
void decode_attention_tasks(const DecodeBatch<T>& a, int64_t t0, int64_t t1, std::vector<float>& scratch) {
  const int64_t D = a.head_dim, group = a.heads / a.kv_heads;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / a.kv_heads, h = t % a.kv_heads, len = a.lengths[b];
    scratch.resize(len + 1 + D);
    const DecodeHeadArgs args{D, group, len, a.scale, a.rope_cos + a.positions[b] * (D / 2),
                              a.rope_sin + a.positions[b] * (D / 2)};
    const int64_t cache_off = (b * a.kv_heads + h) * a.capacity * D;
    decode_attention_head_cpu(args, a.q + b * a.q_stride + h * group * D, D, a.k + b * a.k_stride + h * D,
                              a.v + b * a.v_stride + h * D, a.k_cache + cache_off, a.v_cache + cache_off,
                              scratch.data(), a.out + (b * a.heads + h * group) * D, D);
  }
}

}  // namespace emu_fast::kernels
