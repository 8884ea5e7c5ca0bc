// The generic quantized GEMVs: every (weight, input) pair of the table in portable C++, the
// fallback of every level and the loops of processors without one.
#include <algorithm>
#include <type_traits>

#include "kernels/cpu/quantized_gemv_table.h"

namespace emu_fast::kernels {
namespace {

inline int64_t int16_blocks(int64_t k) { return (k + kInt16Block - 1) / kInt16Block; }

// ---------------------------------------------------------------- float32 inputs

void int8_f32(const QuantizedWeights& w, const PreparedInputs& in, const OutputRows& o) {
  const int8_t* q = w.int8();
  const float *scales = w.scales, *x = in.x;
  const int64_t k_dim = w.k_dim;
  const auto [y, batch, ldy, n_begin, n_end] = o;
  for (int64_t n = n_begin; n < n_end; ++n)
    for (int64_t b = 0; b < batch; ++b) y[b * ldy + n] = dot_portable(q + n * k_dim, x + b * k_dim, k_dim) * scales[n];
}

void int4_f32(const QuantizedWeights& w, const PreparedInputs& in, const OutputRows& o) {
  const uint8_t* q = w.int4();
  const float *scales = w.scales, *x = in.x;
  const int64_t k_dim = w.k_dim, group = w.group;
  const auto [y, batch, ldy, n_begin, n_end] = o;
  const int64_t k_pad = int4_padded_k(k_dim), groups = int4_groups(k_dim, group), half = kInt4Block / 2;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = q + n * (k_pad / 2);
    const float* srow = scales + n * groups;
    for (int64_t b = 0; b < batch; ++b) {
      const float* xb = x + b * k_pad;
      float total = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        int64_t j0, j1;
        int4_group_blocks(g, group, k_pad, &j0, &j1);
        float acc[half] = {};
        for (int64_t j = j0; j < j1; ++j) {
          const uint8_t* bytes = row + j * half;
          const float* xj = xb + j * kInt4Block;
          for (int i = 0; i < half; ++i)
            acc[i] += static_cast<float>((bytes[i] & 15) - 8) * xj[i] +
                      static_cast<float>((bytes[i] >> 4) - 8) * xj[half + i];
        }
        float s = 0.f;
        for (int i = 0; i < half; ++i) s += acc[i];
        total += srow[g] * s;
      }
      y[b * ldy + n] = total;
    }
  }
}

// ---------------------------------------------------------------- int16 inputs

// The exact integer sum of a block, then times the block's step times the weight scale (that
// product first: with huge activations, a block's sum times its step alone can pass float32's
// range where the output does not).
void int8_i16(const QuantizedWeights& w, const PreparedInputs& x, const OutputRows& o) {
  const int8_t* q = w.int8();
  const float* scales = w.scales;
  const Int16Input& in = *x.i16;
  const int64_t k_dim = w.k_dim;
  const auto [y, batch, ldy, n_begin, n_end] = o;
  const int64_t blocks = int16_blocks(k_dim);
  for (int64_t n = n_begin; n < n_end; ++n)
    for (int64_t b = 0; b < batch; ++b) {
      float total = 0.f;
      for (int64_t j = 0; j < blocks; ++j) {
        const int16_t* xv = in.v.data() + (b * blocks + j) * kInt16Block;
        int32_t s = 0;
        for (int64_t k = j * kInt16Block; k < std::min(k_dim, (j + 1) * kInt16Block); ++k)
          s += int32_t(q[n * k_dim + k]) * xv[k - j * kInt16Block];
        total += static_cast<float>(s) * (in.step[b * blocks + j] * scales[n]);
      }
      y[b * ldy + n] = total;
    }
}

void int4_i16(const QuantizedWeights& w, const PreparedInputs& x, const OutputRows& o) {
  const uint8_t* q = w.int4();
  const float* scales = w.scales;
  const Int16Input& in = *x.i16;
  const int64_t k_dim = w.k_dim, group = w.group;
  const auto [y, batch, ldy, n_begin, n_end] = o;
  const int64_t k_pad = int4_padded_k(k_dim), blocks = int16_blocks(k_pad), groups = int4_groups(k_dim, group);
  const int64_t per_group = group / kInt16Block;
  for (int64_t n = n_begin; n < n_end; ++n)
    for (int64_t b = 0; b < batch; ++b) {
      float total = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t j = g * per_group; j < std::min(blocks, (g + 1) * per_group); ++j) {
          const int16_t* xv = in.v.data() + (b * blocks + j) * kInt16Block;
          int32_t s = 0;
          for (int64_t k = j * kInt16Block; k < std::min(k_pad, (j + 1) * kInt16Block); ++k) {
            const uint8_t byte = q[n * (k_pad / 2) + k / kInt4Block * 16 + k % 16];
            const int u = (k % kInt4Block) < 16 ? (byte & 15) : (byte >> 4);
            s += (u - 8) * xv[k - j * kInt16Block];
          }
          total += static_cast<float>(s) * (in.step[b * blocks + j] * scales[n * groups + g]);
        }
      }
      y[b * ldy + n] = total;
    }
}

QuantizedGemvTable make_table() {
  using W = QuantizedWeight;
  using X = QuantizedInput;
  QuantizedGemvTable t;
  t.at(W::kInt8, X::kFloat32) = {int8_f32, InputLayout::kFloat32};
  t.at(W::kInt8, X::kInt16) = {int8_i16, InputLayout::kInt16};
  t.at(W::kInt8, X::kInt8) = {int8_i16, InputLayout::kInt16};  // int8 x int8: the same exact sums in int16
  t.at(W::kInt4, X::kFloat32) = {int4_f32, InputLayout::kFloat32};
  t.at(W::kInt4, X::kInt16) = {int4_i16, InputLayout::kInt16};
  t.at(W::kInt4, X::kInt8) = {int4_i16, InputLayout::kInt16};
  return t;
}

}  // namespace

const QuantizedGemvTable* quantized_gemv_table_generic() {
  static const QuantizedGemvTable table = make_table();
  return &table;
}

// ---------------------------------------------------------------- weights written out (prefill)
// Plain loops the compiler vectorizes, compiled for the best level by run_best.

namespace {

// A value as stored: Out's own rounding, or (float32 out, R = bf16) rounded to bfloat16 and
// kept in float32.
template <typename Out, typename R>
EMU_ALWAYS_INLINE Out store(float v) {
  if constexpr (std::is_same_v<Out, float>)
    return round_to<R>(v);
  else
    return from_float<Out>(v);
}

template <typename Out, typename R>
EMU_ALWAYS_INLINE void int8_rows(const int8_t* q, const float* scales, int64_t K, int64_t n0, int64_t n1, Out* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = q + n * K;
    const float s = scales[n];
    Out* o = out + (n - n0) * K;
    for (int64_t k = 0; k < K; ++k) o[k] = store<Out, R>(static_cast<float>(row[k]) * s);
  }
}

template <typename Out, typename R>
EMU_ALWAYS_INLINE void int4_rows(const uint8_t* q, const float* scales, int64_t group, int64_t K, int64_t n0,
                                 int64_t n1, Out* out) {
  const int64_t row_bytes = int4_row_bytes(K), groups = int4_groups(K, group);
  const int64_t span = std::min(group, K);  // one group a row when the group is the row or longer
  constexpr int64_t half = kInt4Block / 2;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = q + n * row_bytes;
    const float* s = scales + n * groups;
    Out* o = out + (n - n0) * K;
    for (int64_t base = 0; base < K; base += kInt4Block) {
      const uint8_t* b = row + base / 2;
      if (base + kInt4Block <= K && base / span == (base + kInt4Block - 1) / span) {
        const float gs = s[base / span];  // the whole block in one group (groups are multiples of 32)
        for (int64_t i = 0; i < half; ++i) {
          o[base + i] = store<Out, R>(static_cast<float>(static_cast<int>(b[i] & 15) - 8) * gs);
          o[base + half + i] = store<Out, R>(static_cast<float>(static_cast<int>(b[i] >> 4) - 8) * gs);
        }
      } else {  // the row's last, partial block
        for (int64_t i = 0; i < kInt4Block && base + i < K; ++i) {
          const int nib = i < half ? (b[i] & 15) : (b[i - half] >> 4);
          o[base + i] = store<Out, R>(static_cast<float>(nib - 8) * s[(base + i) / span]);
        }
      }
    }
  }
}

}  // namespace

template <typename T>
void dequantize_int8_rows(const int8_t* q, const float* scales, int64_t k_dim, int64_t n0, int64_t n1, T* out,
                          bool bf16_values) {
  if (std::is_same_v<T, float> && bf16_values)
    run_best([&]() EMU_LAMBDA_INLINE { int8_rows<T, bf16>(q, scales, k_dim, n0, n1, out); });
  else
    run_best([&]() EMU_LAMBDA_INLINE { int8_rows<T, T>(q, scales, k_dim, n0, n1, out); });
}

template <typename T>
void dequantize_int4_rows(const uint8_t* q, const float* scales, int64_t group, int64_t k_dim, int64_t n0, int64_t n1,
                          T* out, bool bf16_values) {
  if (std::is_same_v<T, float> && bf16_values)
    run_best([&]() EMU_LAMBDA_INLINE { int4_rows<T, bf16>(q, scales, group, k_dim, n0, n1, out); });
  else
    run_best([&]() EMU_LAMBDA_INLINE { int4_rows<T, T>(q, scales, group, k_dim, n0, n1, out); });
}

template void dequantize_int8_rows<float>(const int8_t*, const float*, int64_t, int64_t, int64_t, float*, bool);
template void dequantize_int8_rows<bf16>(const int8_t*, const float*, int64_t, int64_t, int64_t, bf16*, bool);
template void dequantize_int4_rows<float>(const uint8_t*, const float*, int64_t, int64_t, int64_t, int64_t, float*,
                                          bool);
template void dequantize_int4_rows<bf16>(const uint8_t*, const float*, int64_t, int64_t, int64_t, int64_t, bf16*,
                                         bool);

}  // namespace emu_fast::kernels
