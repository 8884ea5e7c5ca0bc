// One decode step of attention for one sequence and one KV head, torch-free.
//
// The new token's key is rotated (RoPE, rotate-half convention as in Hugging Face LLaMA) and
// appended with its value at cache index `len`; each query head of the group is rotated and
// attends over cache entries [0, len]. Scores, softmax and the weighted sum are float32.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/scalar.h"

namespace emu_fast::kernels {

// out[i] = x1*c - x2*s, out[i+h] = x2*c + x1*s with (x1, x2) the two halves of x, h = dim/2.
template <typename T>
inline void rope_rotate(const T* x, const float* cos, const float* sin, int64_t dim, float* out) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
    out[i] = x1 * cos[i] - x2 * sin[i];
    out[i + half] = x2 * cos[i] + x1 * sin[i];
  }
}

struct DecodeHeadArgs {
  int64_t head_dim;
  int64_t group;       // query heads per KV head
  int64_t len;         // entries already in the cache; the new one goes at index len
  float scale;         // softmax scale, 1/sqrt(head_dim)
  const float* cos;    // [head_dim/2] at this token's position
  const float* sin;
};

// q: `group` query heads, query head g at q + g * q_head_stride; k, v: this token's [head_dim].
// k_cache, v_cache: this (sequence, KV head)'s [capacity, head_dim] rows.
// scratch: float32 of at least len + 1 + head_dim; out: group rows at out + g * out_head_stride.
template <typename T>
inline void decode_attention_head(const DecodeHeadArgs& a, const T* q, int64_t q_head_stride,
                                  const T* k, const T* v, T* k_cache, T* v_cache, float* scratch,
                                  T* out, int64_t out_head_stride) {
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
    float max_score = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
      const T* kr = k_cache + j * d;
      float s = 0.f;
      for (int64_t i = 0; i < d; ++i) s += q_rot[i] * to_float(kr[i]);
      s *= a.scale;
      scores[j] = s;
      max_score = std::max(max_score, s);
    }
    float denom = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      scores[j] = std::exp(scores[j] - max_score);
      denom += scores[j];
    }
    // Reuse q_rot as the float32 accumulator for the output row.
    float* acc = q_rot;
    std::fill(acc, acc + d, 0.f);
    for (int64_t j = 0; j < n; ++j) {
      const float p = scores[j];
      const T* vr = v_cache + j * d;
      for (int64_t i = 0; i < d; ++i) acc[i] += p * to_float(vr[i]);
    }
    const float inv = 1.f / denom;
    T* o = out + g * out_head_stride;
    for (int64_t i = 0; i < d; ++i) o[i] = from_float<T>(acc[i] * inv);
  }
}

}  // namespace emu_fast::kernels
