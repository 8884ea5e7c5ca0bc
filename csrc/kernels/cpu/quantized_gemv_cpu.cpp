// CPU GEMV over int8 / int4 weights (layouts in quantized_gemv.h): AVX-512 and AVX2 inner loops
// picked at run time (quantized_gemv_isa()), and a portable fallback.
//
// Memory is the bound at batch 1 (int8 reads 1 byte a weight, int4 half a byte), so each loop
// widens the weight bytes to float32 in registers and multiply-adds them with the float32
// inputs; nothing is written back but y. As in gemv_cpu.cpp, kRows weight rows are dotted
// against the same inputs at once (independent FMA chains; each input load feeds every row),
// and for batch > 1 those rows stay in L1 while each batch row passes over them.
//
// int4 takes the "- 8" of each nibble in the inner loop, in integers before the convert (one
// subtract per vector of 8 or 16 weights). Not the cheaper rewrite
//   sum (u - 8) x = sum u x - 8 sum x,
// which cancels catastrophically: one input huge beside the others (1e8) whose weight is 0
// enters both float32 sums and leaves nothing of the rest. The integer-input paths
// (quantized_gemv_int16 / _int8_input) may subtract offsets: their block sums are exact integers.
#include "kernels/cpu/quantized_gemv.h"

#include "kernels/cpu/gemv.h"
#include "kernels/cpu/quantized_gemv_int16.h"
#include "kernels/cpu/quantized_gemv_int8_input.h"
#include "kernels/cpu/x86_reduce.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <atomic>
#include <vector>

#ifdef EMU_X86
#include <immintrin.h>
#endif

namespace emu_fast::kernels {
namespace {

constexpr int kRows = 4;

std::atomic<int> g_isa_override{-1};
std::atomic<int> g_input_override{-1};
std::atomic<uint64_t> g_input_generation{0};

// The float32-input products sum raw weights (int8 up to 127, int4 up to 8) times x
// before any scale is applied, so inputs near float32's top (|x| ~ 1e36) would overflow where
// the product itself does not. Such x (largest |x| at least 2^64, every input finite) is scaled
// down by a power of two first and the outputs up again: exact both ways, but for inputs below
// 2^-190 of the largest, which become subnormal (far below the sums' own rounding).
struct TamedInputs {
  const float* x;
  float up;  // 1, or the power of two the outputs are multiplied back by
  void restore(float* y, int64_t batch, int64_t ldy, int64_t n_begin, int64_t n_end) const {
    if (up == 1.f) return;
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t n = n_begin; n < n_end; ++n) y[b * ldy + n] *= up;
  }
};

TamedInputs tame_large_inputs(const float* x, int64_t n) {
  uint32_t top = 0;  // the largest |x| as bits (integer max: vectorizes, and NaN sorts above inf)
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, 4);
    top = std::max(top, bits & 0x7fffffffu);
  }
  constexpr uint32_t kTwoTo64 = (127u + 64u) << 23, kInf = 0x7f800000u;
  if (top < kTwoTo64 || top >= kInf) return {x, 1.f};  // the usual case; or NaN / inf flow through
  const int s = static_cast<int>(top >> 23) - 127 - 63;  // largest < 2^(e + 1): times 2^-s, < 2^64
  thread_local std::vector<float> scaled;
  scaled.resize(n);
  for (int64_t i = 0; i < n; ++i) scaled[i] = std::ldexp(x[i], -s);
  return {scaled.data(), std::ldexp(1.f, s)};
}

// The blocks of kInt4Block values group g spans, in a row padded to int4_padded_k(k_dim).
inline void group_blocks(int64_t g, int64_t group, int64_t k_pad, int64_t* j0, int64_t* j1) {
  *j0 = g * group / kInt4Block;
  *j1 = std::min(k_pad, (g + 1) * group) / kInt4Block;
}

// ---------------------------------------------------------------- portable

void int8_portable(const int8_t* q, const float* scales, const float* x, float* y, int64_t batch, int64_t k_dim,
                   int64_t ldy, int64_t n_begin, int64_t n_end) {
  constexpr int kLanes = 16;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* row = q + n * k_dim;
    for (int64_t b = 0; b < batch; ++b) {
      const float* xb = x + b * k_dim;
      float acc[kLanes] = {};
      int64_t k = 0;
      for (; k + kLanes <= k_dim; k += kLanes)
        for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<float>(row[k + j]) * xb[k + j];
      float s = 0.f;
      for (; k < k_dim; ++k) s += static_cast<float>(row[k]) * xb[k];
      for (int j = 0; j < kLanes; ++j) s += acc[j];
      y[b * ldy + n] = s * scales[n];
    }
  }
}

void int4_portable(const uint8_t* q, const float* scales, int64_t group, const float* x, float* y, int64_t batch,
                   int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end) {
  const int64_t k_pad = int4_padded_k(k_dim), groups = int4_groups(k_dim, group), half = kInt4Block / 2;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = q + n * (k_pad / 2);
    const float* srow = scales + n * groups;
    for (int64_t b = 0; b < batch; ++b) {
      const float* xb = x + b * k_pad;
      float total = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        int64_t j0, j1;
        group_blocks(g, group, k_pad, &j0, &j1);
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

#ifdef EMU_X86

// ---------------------------------------------------------------- AVX-512: 16 floats a vector

template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void int8_avx512_block(
    const int8_t* q, const float* scales, const float* x, float* y, int64_t batch, int64_t k_dim, int64_t ldy,
    int64_t n) {
  const int64_t k_main = k_dim & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (k_dim - k_main)) - 1u);
  const int8_t* r[R];
  for (int i = 0; i < R; ++i) r[i] = q + (n + i) * k_dim;
  for (int64_t b = 0; b < batch; ++b) {
    const float* xb = x + b * k_dim;
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < k_main; k += 16) {
      const __m512 xv = _mm512_loadu_ps(xb + k);
      for (int i = 0; i < R; ++i) {
        const __m128i w8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[i] + k));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(w8)), xv, acc[i]);
      }
    }
    if (tail) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, xb + k_main);
      for (int i = 0; i < R; ++i) {
        const __m128i w8 = _mm_maskz_loadu_epi8(tail, r[i] + k_main);
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(w8)), xv, acc[i]);
      }
    }
    for (int i = 0; i < R; ++i) y[b * ldy + n + i] = _mm512_reduce_add_ps(acc[i]) * scales[n + i];
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void int8_avx512(
    const int8_t* q, const float* scales, const float* x, float* y, int64_t batch, int64_t k_dim, int64_t ldy,
    int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + kRows <= n_end; n += kRows) int8_avx512_block<kRows>(q, scales, x, y, batch, k_dim, ldy, n);
  for (; n < n_end; ++n) int8_avx512_block<1>(q, scales, x, y, batch, k_dim, ldy, n);
}

// One block of 32 nibbles (16 bytes) widened: low nibbles = values 0..15, high = 16..31.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void int4_avx512_block(
    const uint8_t* q, const float* scales, int64_t group, const float* x, float* y,
    int64_t batch, int64_t k_dim, int64_t ldy, int64_t n) {
  const int64_t k_pad = int4_padded_k(k_dim), groups = int4_groups(k_dim, group), row_bytes = k_pad / 2;
  const __m512i low = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
  const uint8_t* r[R];
  for (int i = 0; i < R; ++i) r[i] = q + (n + i) * row_bytes;
  for (int64_t b = 0; b < batch; ++b) {
    const float* xb = x + b * k_pad;
    __m512 total[R];
    for (int i = 0; i < R; ++i) total[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      int64_t j0, j1;
      group_blocks(g, group, k_pad, &j0, &j1);
      __m512 acc_lo[R], acc_hi[R];
      for (int i = 0; i < R; ++i) acc_lo[i] = acc_hi[i] = _mm512_setzero_ps();
      for (int64_t j = j0; j < j1; ++j) {
        const __m512 x_lo = _mm512_loadu_ps(xb + j * kInt4Block);
        const __m512 x_hi = _mm512_loadu_ps(xb + j * kInt4Block + 16);
        for (int i = 0; i < R; ++i) {
          const __m512i v =
              _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r[i] + j * 16)));
          const __m512i w_lo = _mm512_sub_epi32(_mm512_and_si512(v, low), eight);
          const __m512i w_hi = _mm512_sub_epi32(_mm512_srli_epi32(v, 4), eight);
          acc_lo[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(w_lo), x_lo, acc_lo[i]);
          acc_hi[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(w_hi), x_hi, acc_hi[i]);
        }
      }
      for (int i = 0; i < R; ++i)
        total[i] = _mm512_fmadd_ps(_mm512_add_ps(acc_lo[i], acc_hi[i]),
                                   _mm512_set1_ps(scales[(n + i) * groups + g]), total[i]);
    }
    for (int i = 0; i < R; ++i)
      y[b * ldy + n + i] = _mm512_reduce_add_ps(total[i]);
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void int4_avx512(
    const uint8_t* q, const float* scales, int64_t group, const float* x, float* y,
    int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + kRows <= n_end; n += kRows)
    int4_avx512_block<kRows>(q, scales, group, x, y, batch, k_dim, ldy, n);
  for (; n < n_end; ++n) int4_avx512_block<1>(q, scales, group, x, y, batch, k_dim, ldy, n);
}

// ---------------------------------------------------------------- AVX2 + FMA: 8 floats a vector

__attribute__((target("avx2,fma"))) inline __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Two accumulators per row (alternate runs of 8 values): with one, each row's FMAs form a single
// chain and FMA latency, not memory, sets the pace. The weights go a cache line (64 values) of
// each row at a time, the same line of a later block prefetched first (gemv.h says why;
// prefetcht0 never faults, so the last blocks prefetch past the rows harmlessly).
template <int R>
__attribute__((target("avx2,fma"))) inline void int8_avx2_block(const int8_t* q, const float* scales, const float* x,
                                                                float* y, int64_t batch, int64_t k_dim, int64_t ldy,
                                                                int64_t n, bool prefetch) {
  const int64_t k64 = k_dim & ~int64_t(63), k_main = k_dim & ~int64_t(7), pfd = gemv_prefetch_distance(R * k_dim);
  const int8_t* r[R];
  for (int i = 0; i < R; ++i) r[i] = q + (n + i) * k_dim;
  for (int64_t b = 0; b < batch; ++b) {
    const float* xb = x + b * k_dim;
    __m256 acc[R], acc2[R];
    for (int i = 0; i < R; ++i) acc[i] = acc2[i] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k < k64; k += 64) {
      if (prefetch && b == 0)
        for (int i = 0; i < R; ++i) _mm_prefetch(reinterpret_cast<const char*>(r[i] + pfd + k), _MM_HINT_T0);
      for (int u = 0; u < 64; u += 16) {
        const __m256 xv = _mm256_loadu_ps(xb + k + u), xv2 = _mm256_loadu_ps(xb + k + u + 8);
        for (int i = 0; i < R; ++i) {
          acc[i] = _mm256_fmadd_ps(widen8(r[i] + k + u), xv, acc[i]);
          acc2[i] = _mm256_fmadd_ps(widen8(r[i] + k + u + 8), xv2, acc2[i]);
        }
      }
    }
    for (; k < k_main; k += 8) {
      const __m256 xv = _mm256_loadu_ps(xb + k);
      for (int i = 0; i < R; ++i) acc[i] = _mm256_fmadd_ps(widen8(r[i] + k), xv, acc[i]);
    }
    for (int i = 0; i < R; ++i) {
      float s = hsum8(_mm256_add_ps(acc[i], acc2[i]));
      for (int64_t k = k_main; k < k_dim; ++k) s += static_cast<float>(r[i][k]) * xb[k];
      y[b * ldy + n + i] = s * scales[n + i];
    }
  }
}

__attribute__((target("avx2,fma"))) void int8_avx2(const int8_t* q, const float* scales, const float* x, float* y,
                                                   int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin,
                                                   int64_t n_end) {
  int64_t n = n_begin;
  for (; n + kRows <= n_end; n += kRows) int8_avx2_block<kRows>(q, scales, x, y, batch, k_dim, ldy, n, true);
  for (; n < n_end; ++n) int8_avx2_block<1>(q, scales, x, y, batch, k_dim, ldy, n, false);
}

// 16 bytes = one block of 32 nibbles, taken 8 bytes at a time: bytes h*8 .. h*8+7 give values
// h*8 .. h*8+7 (low nibbles) and 16+h*8 .. 16+h*8+7 (high nibbles). Low and high nibbles
// accumulate apart (two FMA chains a row, as in the int8 loop); each group's sum is scaled into
// a vector total, reduced once a row; the group's lines of a later block are prefetched first.
template <int R>
__attribute__((target("avx2,fma"))) inline void int4_avx2_block(const uint8_t* q, const float* scales, int64_t group,
                                                                const float* x, float* y,
                                                                int64_t batch, int64_t k_dim, int64_t ldy, int64_t n, bool prefetch) {
  const int64_t k_pad = int4_padded_k(k_dim), groups = int4_groups(k_dim, group), row_bytes = k_pad / 2;
  const int64_t pfd = gemv_prefetch_distance(R * row_bytes);
  const __m256i low = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
  const uint8_t* r[R];
  for (int i = 0; i < R; ++i) r[i] = q + (n + i) * row_bytes;
  for (int64_t b = 0; b < batch; ++b) {
    const float* xb = x + b * k_pad;
    __m256 total[R];
    for (int i = 0; i < R; ++i) total[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      int64_t j0, j1;
      group_blocks(g, group, k_pad, &j0, &j1);
      if (prefetch && b == 0)
        for (int64_t off = j0 * 16; off < j1 * 16; off += 64)
          for (int i = 0; i < R; ++i)
            _mm_prefetch(reinterpret_cast<const char*>(r[i] + pfd + off), _MM_HINT_T0);
      __m256 acc[R], acc2[R];
      for (int i = 0; i < R; ++i) acc[i] = acc2[i] = _mm256_setzero_ps();
      for (int64_t j = j0; j < j1; ++j) {
        const float* xj = xb + j * kInt4Block;
        for (int h = 0; h < 2; ++h) {
          const __m256 x_lo = _mm256_loadu_ps(xj + h * 8);
          const __m256 x_hi = _mm256_loadu_ps(xj + 16 + h * 8);
          for (int i = 0; i < R; ++i) {
            const __m256i v =
                _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r[i] + j * 16 + h * 8)));
            const __m256i w_lo = _mm256_sub_epi32(_mm256_and_si256(v, low), eight);
            const __m256i w_hi = _mm256_sub_epi32(_mm256_srli_epi32(v, 4), eight);
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(w_lo), x_lo, acc[i]);
            acc2[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(w_hi), x_hi, acc2[i]);
          }
        }
      }
      for (int i = 0; i < R; ++i)
        total[i] = _mm256_fmadd_ps(_mm256_add_ps(acc[i], acc2[i]), _mm256_set1_ps(scales[(n + i) * groups + g]),
                                   total[i]);
    }
    for (int i = 0; i < R; ++i)
      y[b * ldy + n + i] = hsum8(total[i]);
  }
}

__attribute__((target("avx2,fma"))) void int4_avx2(const uint8_t* q, const float* scales, int64_t group,
                                                   const float* x, float* y, int64_t batch,
                                                   int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + kRows <= n_end; n += kRows)
    int4_avx2_block<kRows>(q, scales, group, x, y, batch, k_dim, ldy, n, true);
  for (; n < n_end; ++n) int4_avx2_block<1>(q, scales, group, x, y, batch, k_dim, ldy, n, false);
}

#endif  // EMU_X86

}  // namespace

Isa quantized_gemv_isa() {
  const int forced = g_isa_override.load(std::memory_order_relaxed);
  return forced < 0 ? cpu_isa() : static_cast<Isa>(forced);
}

bool set_quantized_gemv_isa(Isa isa) {
  if (static_cast<int>(isa) > static_cast<int>(cpu_isa())) return false;
  g_isa_override.store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

// The int16 inputs of one call (each thread rounds x for itself: K values against its rows' N/T
// times K weights; the buffers stay allocated between calls).
Int16Input& int16_scratch() {
  thread_local Int16Input in;
  return in;
}
Int8Input& int8_scratch() {
  thread_local Int8Input in;
  return in;
}

void set_quantized_input_override(std::optional<QuantizedInput> input) {
  g_input_override.store(input ? static_cast<int>(*input) : -1);
  g_input_generation.fetch_add(1);  // after the store: a reader that saw the old count rereads it
}

uint64_t quantized_input_generation() { return g_input_generation.load(); }

std::optional<QuantizedInput> quantized_input_override() {
  const int forced = g_input_override.load(std::memory_order_relaxed);
  return forced < 0 ? std::nullopt : std::optional<QuantizedInput>(static_cast<QuantizedInput>(forced));
}

void gemv_int8_rows(const int8_t* q, const float* scales, const float* x, float* y, int64_t batch, int64_t k_dim,
                    int64_t ldy, int64_t n_begin, int64_t n_end, QuantizedInput input) {
  if (n_begin >= n_end) return;
  const Isa isa = quantized_gemv_isa();
  const bool vector = isa != Isa::kPortable;
  if (input == QuantizedInput::kInt16) {
    Int16Input& in = int16_scratch();
    if (round_inputs_to_int16(x, batch, k_dim, k_dim, Int16Order::kNatural, vector, &in))
      return gemv_int8_rows_int16(isa, q, scales, in, y, batch, k_dim, ldy, n_begin, n_end);
  }
  if (input == QuantizedInput::kInt8) {  // int8 x int8 has no faster AVX2 product than the int16 one
    Int8Input& in8 = int8_scratch();
    Int16Input& in = int16_scratch();
    if (round_inputs_to_int8(x, batch, k_dim, k_dim, Int8Order::kNatural, vector, &in8)) {
      widen_int8_input(in8, batch, k_dim, &in);
      return gemv_int8_rows_int16(isa, q, scales, in, y, batch, k_dim, ldy, n_begin, n_end);
    }
  }
  const TamedInputs in = tame_large_inputs(x, batch * k_dim);
  switch (isa) {
#ifdef EMU_X86
    case Isa::kAvx512: int8_avx512(q, scales, in.x, y, batch, k_dim, ldy, n_begin, n_end); break;
    case Isa::kAvx2: int8_avx2(q, scales, in.x, y, batch, k_dim, ldy, n_begin, n_end); break;
#endif
    default: int8_portable(q, scales, in.x, y, batch, k_dim, ldy, n_begin, n_end);
  }
  in.restore(y, batch, ldy, n_begin, n_end);
}

void gemv_int4_rows(const uint8_t* q, const float* scales, int64_t group, const float* x, float* y, int64_t batch,
                    int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end, QuantizedInput input) {
  if (n_begin >= n_end) return;
  const Isa isa = quantized_gemv_isa();
  const int64_t k_pad = int4_padded_k(k_dim);
  const bool vector = isa != Isa::kPortable;
  if (input == QuantizedInput::kInt16 && int4_group_takes_integer_inputs(group)) {
    Int16Input& in = int16_scratch();
    if (round_inputs_to_int16(x, batch, k_pad, k_pad, int4_input_order(isa), vector, &in))
      return gemv_int4_rows_int16(isa, q, scales, group, in, y, batch, k_dim, ldy, n_begin, n_end);
  }
  if (input == QuantizedInput::kInt8 && int4_group_takes_integer_inputs(group)) {
    Int8Input& in8 = int8_scratch();
    const Int8Order order = int4_int8_input_order(isa, group);
    if (round_inputs_to_int8(x, batch, k_pad, k_pad, order, vector, &in8)) {
      if (order == Int8Order::kInt4Avx512)
        return gemv_int4_rows_int8_avx512(q, scales, group, in8, y, batch, k_dim, ldy, n_begin, n_end);
      if (order == Int8Order::kInt4Avx2)
        return gemv_int4_rows_int8_avx2(q, scales, group, in8, y, batch, k_dim, ldy, n_begin, n_end);
      Int16Input& in = int16_scratch();  // the portable loop: the same exact sums in int16
      widen_int8_input(in8, batch, k_pad, &in);
      return gemv_int4_rows_int16(isa, q, scales, group, in, y, batch, k_dim, ldy, n_begin, n_end);
    }
  }
  const TamedInputs in = tame_large_inputs(x, batch * k_pad);
  switch (isa) {
#ifdef EMU_X86
    case Isa::kAvx512: int4_avx512(q, scales, group, in.x, y, batch, k_dim, ldy, n_begin, n_end); break;
    case Isa::kAvx2: int4_avx2(q, scales, group, in.x, y, batch, k_dim, ldy, n_begin, n_end); break;
#endif
    default: int4_portable(q, scales, group, in.x, y, batch, k_dim, ldy, n_begin, n_end);
  }
  in.restore(y, batch, ldy, n_begin, n_end);
}

}  // namespace emu_fast::kernels
