// The quantized GEMVs with int16 inputs (QuantizedInput::kInt16, quantized_gemv.h): x rounded
// to int16 blocks, then integer dot products (AVX2 vpmaddwd: 16 int16 products, summed in pairs
// into 8 int32 lanes, one instruction), one float32 scaling per block and row.
//
// Why: with float32 inputs each weight must become a float32 before its FMA (AVX2: widen,
// convert, FMA, plus the nibble split for int4: 3 to 3.5 vector instructions per 8 weights), and
// a core then converts weights more slowly than DRAM delivers them. In int16 a weight only
// needs widening to 16 bits and vpmaddwd takes 16 at a time: about 2 instructions per 8 weights.
//
// Within a block of kInt16Block inputs the sums are exact integers: int8 |q x| <= 127 * 32767,
// int4 |(u - 8) x| <= 15 * 32767 (u the stored nibble), 64 of them < 2^31.
#include "kernels/cpu/quantized_gemv_int16.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/block_abs_max.h"
#include "kernels/cpu/gemv.h"
#include "kernels/cpu/quantized_row_blocks.h"
#include "kernels/cpu/x86_reduce.h"

#ifdef EMU_X86
#include <immintrin.h>
#endif

namespace emu_fast::kernels {
namespace {

// The int4 kernel's order of the 64 inputs of a block (AVX2: see int4_lanes below): input
// int4_input_at[i] goes to position i. One 32-byte load holds two int4 blocks of 32 values
// (bytes 0..15: values 0..31, bytes 16..31: values 32..63); read as 16 words, word j holds the
// nibbles of bytes 2j and 2j+1, so its 4 nibbles (low to high) are values v, v + 16, v + 1,
// v + 17 with v = 2j (j < 8) or 32 + 2(j - 8). Shift r*4 and mask gives run r of 16 words.
struct Int4InputOrder {
  int at[kInt16Block];
  constexpr Int4InputOrder() : at() {
    constexpr int nibble_offset[4] = {0, 16, 1, 17};
    for (int r = 0; r < 4; ++r)
      for (int j = 0; j < 16; ++j) at[r * 16 + j] = (j < 8 ? 2 * j : 32 + 2 * (j - 8)) + nibble_offset[r];
  }
};
constexpr Int4InputOrder kInt4Order;

// Scalar rounding of one block (any magnitude: ldexp is exact where a float multiply by the
// power of two would not be representable). Returns false for a non-finite input.
bool round_block_scalar(const float* x, int64_t n, int16_t* v, float* step) {
  float m;
  if (!finite_abs_max(x, n, &m)) return false;
  std::fill(v, v + kInt16Block, int16_t(0));
  if (m == 0.f) {
    *step = 1.f;
    return true;
  }
  int e;
  std::frexp(m, &e);  // m < 2^e
  for (int64_t i = 0; i < n; ++i) {
    const float r = std::nearbyint(std::ldexp(x[i], 15 - e));
    v[i] = static_cast<int16_t>(std::min(r, 32767.f));
  }
  *step = std::ldexp(1.f, e - 15);
  return true;
}

#ifdef EMU_X86
// The same rounding, 8 floats at a time, for blocks whose largest |x| is a normal float at least
// 2^-112 (so 2^(15 - e) is a normal float too); other blocks go to round_block_scalar.
// cvtps2dq rounds half to even like nearbyint; packs saturates 32768 to 32767 like the min.
EMU_TARGET_AVX2 bool round_block_avx2(const float* x, int16_t* v, float* step) {
  float mx;
  if (!abs_max_avx2(x, kInt16Block / 8, &mx)) return false;
  uint32_t bits;
  std::memcpy(&bits, &mx, 4);
  const int biased = static_cast<int>(bits >> 23);  // m = 1.f * 2^(biased - 127) < 2^(biased - 126)
  if (biased < 15 || biased >= 255) return round_block_scalar(x, kInt16Block, v, step);  // inf too
  const int e = biased - 126;
  uint32_t scale_bits = static_cast<uint32_t>(15 - e + 127) << 23, step_bits = static_cast<uint32_t>(e - 15 + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, 4);
  std::memcpy(step, &step_bits, 4);
  const __m256 sv = _mm256_set1_ps(scale);
  for (int i = 0; i < 8; i += 2) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * i), sv));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * i + 8), sv));
    // packs works within 128-bit lanes: a0..3 b0..3 a4..7 b4..7; the permute restores order
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(v + 8 * i), p);
  }
  return true;
}

EMU_TARGET_AVX2 EMU_ALWAYS_INLINE __m256i even_words(__m256i a) {
  return _mm256_srai_epi32(_mm256_slli_epi32(a, 16), 16);
}
EMU_TARGET_AVX2 EMU_ALWAYS_INLINE __m256i odd_words(__m256i a) { return _mm256_srai_epi32(a, 16); }
// int32 lanes a0..7, b0..7 (int16 values) to words a0..7 b0..7 (packs works per 128-bit lane).
EMU_TARGET_AVX2 EMU_ALWAYS_INLINE __m256i join_words(__m256i a, __m256i b) {
  return _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8);
}

// A block in natural order to Int4InputOrder, and its offsets: run 0 holds the even inputs of
// 0..15 and 32..47, run 1 those of 16..31 and 48..63, runs 2 and 3 the odd ones.
EMU_TARGET_AVX2 void to_int4_order_avx2(const int16_t* natural, int16_t* v, int32_t* offset) {
  __m256i n[4];
  for (int s = 0; s < 4; ++s) n[s] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(natural + 16 * s));
  const __m256i runs[4] = {join_words(even_words(n[0]), even_words(n[2])),
                           join_words(even_words(n[1]), even_words(n[3])),
                           join_words(odd_words(n[0]), odd_words(n[2])), join_words(odd_words(n[1]), odd_words(n[3]))};
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i sum = _mm256_setzero_si256();
  for (int r = 0; r < 4; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(v + 16 * r), runs[r]);
    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(runs[r], ones));
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(offset), _mm256_slli_epi32(sum, 3));
}
#endif

// A block in natural order to Int4InputOrder, and its offsets (vpmaddwd's lane l sums words
// 2l and 2l + 1 of each of the 4 runs).
void to_int4_order(const int16_t* natural, bool vector, int16_t* v, int32_t* offset) {
#ifdef EMU_X86
  if (vector) return to_int4_order_avx2(natural, v, offset);
#endif
  (void)vector;
  for (int i = 0; i < kInt16Block; ++i) v[i] = natural[kInt4Order.at[i]];
  for (int l = 0; l < 8; ++l) {
    int32_t s = 0;
    for (int r = 0; r < 4; ++r) s += v[r * 16 + 2 * l] + v[r * 16 + 2 * l + 1];
    offset[l] = 8 * s;
  }
}

// One block: the vector path when it exists and the block is whole, else the scalar one.
bool round_block(const float* x, int64_t n, bool vector, int16_t* v, float* step) {
#ifdef EMU_X86
  if (vector && n == kInt16Block) return round_block_avx2(x, v, step);
#endif
  (void)vector;
  return round_block_scalar(x, n, v, step);
}

inline int64_t x_blocks(int64_t k) { return (k + kInt16Block - 1) / kInt16Block; }

// ---------------------------------------------------------------- portable

// The exact integer sum of a block, then times the block's step times the weight scale (that
// product first: with huge activations, a block's sum times its step alone can pass float32's
// range where the output does not).
void int8_i16_portable(const int8_t* q, const float* scales, const Int16Input& in, float* y, int64_t batch,
                       int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end) {
  const int64_t blocks = x_blocks(k_dim);
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

void int4_i16_portable(const uint8_t* q, const float* scales, int64_t group, const Int16Input& in, float* y,
                       int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end) {
  const int64_t k_pad = int4_padded_k(k_dim), blocks = x_blocks(k_pad), groups = int4_groups(k_dim, group);
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

#ifdef EMU_X86

// ---------------------------------------------------------------- AVX2

EMU_TARGET_AVX2 EMU_ALWAYS_INLINE __m256i load_x(const int16_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

EMU_TARGET_AVX2 EMU_ALWAYS_INLINE __m256i widen16(const int8_t* w) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
}

// sum over the block of u_r * x_r, r = 0..3: 4 vpmaddwd (16 products each, in pairs), 3 adds.
EMU_TARGET_AVX2 EMU_ALWAYS_INLINE __m256i block_dot(const __m256i* u, const int16_t* x) {
  return _mm256_add_epi32(_mm256_add_epi32(_mm256_madd_epi16(u[0], load_x(x)), _mm256_madd_epi16(u[1], load_x(x + 16))),
                          _mm256_add_epi32(_mm256_madd_epi16(u[2], load_x(x + 32)),
                                           _mm256_madd_epi16(u[3], load_x(x + 48))));
}

// R rows from n against BC batch rows from b0. A block's weights are widened to int16 once
// (4 vectors of 16) and dotted with each batch row's inputs; the first batch rows prefetch.
//
// int8: the block is 64 bytes of the row, widened 16 at a time (natural order).
template <int R, int BC>
EMU_TARGET_AVX2 EMU_ALWAYS_INLINE void int8_i16_avx2_rows(const int8_t* q, const float* scales, const Int16Input& in,
                                                          float* y, int64_t b0, int64_t k_dim, int64_t ldy,
                                                          int64_t n) {
  const int64_t blocks = x_blocks(k_dim), pfd = gemv_prefetch_distance(R * k_dim);
  const RowBlocks<int8_t, R, kInt16Block> rows(q, n, k_dim);
  __m256 acc[R][BC];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < BC; ++c) acc[i][c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < blocks; ++j) {
    const int8_t* w[R];
    rows.get(j, R > 1 && b0 == 0, pfd, w);
    for (int i = 0; i < R; ++i) {
      const __m256i u[4] = {widen16(w[i]), widen16(w[i] + 16), widen16(w[i] + 32), widen16(w[i] + 48)};
      for (int c = 0; c < BC; ++c) {
        const int64_t bj = (b0 + c) * blocks + j;
        const __m256i s = block_dot(u, in.v.data() + bj * kInt16Block);
        acc[i][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(in.step[bj] * scales[n + i]), acc[i][c]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < BC; ++c) y[(b0 + c) * ldy + n + i] = hsum8(acc[i][c]);
}

// int4: the block is 32 bytes of the row (two blocks of kInt4Block), split into 4 runs of 16
// int16 nibbles by shift and mask (x is stored in the matching order, Int4InputOrder). The
// stored nibbles are u = q + 8: subtracting `offset` (per lane, 8 * the inputs that lane's
// products took) leaves the block's integer sum of q x exactly. Each block's sum is scaled by
// its step times its group's scale (a flat loop over the blocks, no per-group accumulators).
template <int R, int BC>
EMU_TARGET_AVX2 EMU_ALWAYS_INLINE void int4_i16_avx2_rows(const uint8_t* q, const float* scales, int64_t group,
                                                          const Int16Input& in, float* y, int64_t b0,
                                                          int64_t k_dim, int64_t ldy, int64_t n) {
  constexpr int64_t kBytes = kInt16Block / 2;
  const int64_t k_pad = int4_padded_k(k_dim), row_bytes = k_pad / 2, blocks = x_blocks(k_pad);
  const int64_t groups = int4_groups(k_dim, group), per_group = group / kInt16Block;
  const int64_t pfd = gemv_prefetch_distance(R * row_bytes);
  const RowBlocks<uint8_t, R, kBytes> rows(q, n, row_bytes);
  const __m256i nibble = _mm256_set1_epi16(15);
  __m256 acc[R][BC];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < BC; ++c) acc[i][c] = _mm256_setzero_ps();
  for (int64_t j = 0, g = 0, left = per_group; j < blocks; ++j) {
    const uint8_t* w[R];
    rows.get(j, R > 1 && b0 == 0 && (j & 1) == 0, pfd, w);  // a cache line holds two blocks
    for (int i = 0; i < R; ++i) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[i]));
      const __m256i u[4] = {_mm256_and_si256(v, nibble), _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble),
                            _mm256_and_si256(_mm256_srli_epi16(v, 8), nibble), _mm256_srli_epi16(v, 12)};
      const float scale = scales[(n + i) * groups + g];
      for (int c = 0; c < BC; ++c) {
        const int64_t bj = (b0 + c) * blocks + j;
        const __m256i offset = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in.offset.data() + bj * 8));
        const __m256i s = _mm256_sub_epi32(block_dot(u, in.v.data() + bj * kInt16Block), offset);
        acc[i][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(in.step[bj] * scale), acc[i][c]);
      }
    }
    if (--left == 0) {
      ++g;
      left = per_group;
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < BC; ++c) y[(b0 + c) * ldy + n + i] = hsum8(acc[i][c]);
}

// Rows in blocks of 4 (one at a time at the end); batch rows two at a time where there are
// two (8 accumulators), so each block's weights are widened once per two batch rows.
template <int R>
EMU_TARGET_AVX2 EMU_ALWAYS_INLINE void int8_i16_avx2_batch(const int8_t* q, const float* scales,
                                                           const Int16Input& in, float* y, int64_t batch,
                                                           int64_t k_dim, int64_t ldy, int64_t n) {
  int64_t b = 0;
  for (; b + 2 <= batch; b += 2) int8_i16_avx2_rows<R, 2>(q, scales, in, y, b, k_dim, ldy, n);
  if (b < batch) int8_i16_avx2_rows<R, 1>(q, scales, in, y, b, k_dim, ldy, n);
}

template <int R>
EMU_TARGET_AVX2 EMU_ALWAYS_INLINE void int4_i16_avx2_batch(const uint8_t* q, const float* scales, int64_t group,
                                                           const Int16Input& in, float* y, int64_t batch,
                                                           int64_t k_dim, int64_t ldy, int64_t n) {
  int64_t b = 0;
  for (; b + 2 <= batch; b += 2) int4_i16_avx2_rows<R, 2>(q, scales, group, in, y, b, k_dim, ldy, n);
  if (b < batch) int4_i16_avx2_rows<R, 1>(q, scales, group, in, y, b, k_dim, ldy, n);
}

EMU_TARGET_AVX2 void int8_i16_avx2(const int8_t* q, const float* scales, const Int16Input& in, float* y,
                                   int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + 4 <= n_end; n += 4) int8_i16_avx2_batch<4>(q, scales, in, y, batch, k_dim, ldy, n);
  for (; n < n_end; ++n) int8_i16_avx2_batch<1>(q, scales, in, y, batch, k_dim, ldy, n);
}

EMU_TARGET_AVX2 void int4_i16_avx2(const uint8_t* q, const float* scales, int64_t group, const Int16Input& in,
                                   float* y, int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin,
                                   int64_t n_end) {
  int64_t n = n_begin;
  for (; n + 4 <= n_end; n += 4) int4_i16_avx2_batch<4>(q, scales, group, in, y, batch, k_dim, ldy, n);
  for (; n < n_end; ++n) int4_i16_avx2_batch<1>(q, scales, group, in, y, batch, k_dim, ldy, n);
}

#endif  // EMU_X86

}  // namespace

bool round_inputs_to_int16(const float* x, int64_t batch, int64_t ldx, int64_t k_dim, Int16Order order, bool vector,
                           Int16Input* in) {
  const int64_t blocks = x_blocks(k_dim);
  in->v.resize(batch * blocks * kInt16Block);
  in->step.resize(batch * blocks);
  in->offset.resize(order == Int16Order::kInt4Avx2 ? batch * blocks * 8 : 0);
  int16_t natural[kInt16Block];
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < blocks; ++j) {
      const int64_t k0 = j * kInt16Block, n = std::min(k_dim - k0, kInt16Block);
      int16_t* v = in->v.data() + (b * blocks + j) * kInt16Block;
      if (!round_block(x + b * ldx + k0, n, vector, order == Int16Order::kNatural ? v : natural,
                       &in->step[b * blocks + j]))
        return false;
      if (order == Int16Order::kInt4Avx2) to_int4_order(natural, vector, v, in->offset.data() + (b * blocks + j) * 8);
      if (order == Int16Order::kInt4Avx512) avx512_int4_order(natural, v);
    }
  return true;
}

void gemv_int8_rows_int16(Isa isa, const int8_t* q, const float* scales, const Int16Input& in, float* y,
                          int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end) {
#ifdef EMU_X86
  if (isa == Isa::kAvx512) return gemv_int8_rows_int16_avx512(q, scales, in, y, batch, k_dim, ldy, n_begin, n_end);
  if (isa == Isa::kAvx2) return int8_i16_avx2(q, scales, in, y, batch, k_dim, ldy, n_begin, n_end);
#endif
  (void)isa;
  int8_i16_portable(q, scales, in, y, batch, k_dim, ldy, n_begin, n_end);
}

void gemv_int4_rows_int16(Isa isa, const uint8_t* q, const float* scales, int64_t group, const Int16Input& in,
                          float* y, int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end) {
#ifdef EMU_X86
  if (isa == Isa::kAvx512)
    return gemv_int4_rows_int16_avx512(q, scales, group, in, y, batch, k_dim, ldy, n_begin, n_end);
  if (isa == Isa::kAvx2) return int4_i16_avx2(q, scales, group, in, y, batch, k_dim, ldy, n_begin, n_end);
#endif
  (void)isa;
  int4_i16_portable(q, scales, group, in, y, batch, k_dim, ldy, n_begin, n_end);
}

}  // namespace emu_fast::kernels
