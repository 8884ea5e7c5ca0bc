// The AVX2 quantized GEMVs (AVX-512 processors take them where quantized_gemv_avx512.cpp has no
// better one): every (weight, input) pair of the table.
//
// Float32 inputs: memory is the bound at batch 1 (int8 reads 1 byte a weight, int4 half a byte),
// so each loop widens the weight bytes to float32 in registers and multiply-adds them with the
// float32 inputs; nothing is written back but y. As in gemv_cpu.cpp, kRows weight rows are dotted
// against the same inputs at once (independent FMA chains; each input load feeds every row), and
// for batch > 1 those rows stay in L1 while each batch row passes over them. int4 takes the "- 8"
// of each nibble in integers before the convert (one subtract per vector of 8 weights), not the
// cheaper rewrite sum (u - 8) x = sum u x - 8 sum x, which cancels catastrophically: one input
// huge beside the others (1e8) whose weight is 0 enters both float32 sums and leaves nothing of
// the rest. The integer-input kernels may subtract offsets: their block sums are exact integers.
//
// Int16 inputs: with float32 inputs each weight must become a float32 before its FMA (widen,
// convert, FMA, plus the nibble split for int4: 3 to 3.5 vector instructions per 8 weights), and
// a core then converts weights more slowly than DRAM delivers them. In int16 a weight only needs
// widening to 16 bits and vpmaddwd takes 16 at a time: about 2 instructions per 8 weights. Within
// a block of kInt16Block inputs the sums are exact integers: int8 |q x| <= 127 * 32767, int4
// |(u - 8) x| <= 15 * 32767 (u the stored nibble), 64 of them < 2^31.
//
// Int8 inputs (int4 weights): with int16 inputs an int4 block of 64 weights costs 6 shifts and
// masks (to 4 vectors of 16 int16 nibbles) and 4 vpmaddwd. With int8 inputs the nibbles stay
// bytes: one mask and one shift-and-mask give 2 vectors of 32, and vpmaddubsw (unsigned bytes
// times signed bytes, summed in pairs to int16) takes 32 products an instruction: 2 of them, one
// add and one vpmaddwd against ones to int32, about 10 instructions a block against 20. The sums
// are exact: a vpmaddubsw pair is at most 2 * 15 * 127 = 3810 and two of them added 7620, far
// inside int16; a block's int32 lanes hold 8 products each.
#include "kernels/cpu/quantized_gemv_table.h"

#ifdef EMU_X86
#include "kernels/cpu/gemv.h"
#include "kernels/cpu/isa.h"
#include "kernels/cpu/quantized_row_blocks.h"

// Everything below is compiled for AVX2 (clang, which defines __GNUC__ too but ignores gcc's
// pragma, has its own), the lambdas of the row loops included.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace emu_fast::kernels {
namespace {

constexpr int kRows = 4;

inline int64_t int16_blocks(int64_t k) { return (k + kInt16Block - 1) / kInt16Block; }
inline int64_t int8_blocks(int64_t k) { return (k + kInt8Block - 1) / kInt8Block; }

#include "kernels/cpu/quantized_row_loops.inc"

// ---------------------------------------------------------------- float32 inputs, 8 a vector

inline __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Two accumulators per row (alternate runs of 8 values): with one, each row's FMAs form a single
// chain and FMA latency, not memory, sets the pace. The weights go a cache line (64 values) of
// each row at a time, the same line of a later block prefetched first (gemv.h says why;
// prefetcht0 never faults, so the last blocks prefetch past the rows harmlessly).
template <int R>
inline void int8_avx2_block(const int8_t* q, const float* scales, const float* x, float* y, int64_t batch,
                            int64_t k_dim, int64_t ldy, int64_t n, bool prefetch) {
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

void int8_f32(const QuantizedWeights& w, const PreparedInputs& in, const OutputRows& o) {
  int64_t n = o.n_begin;
  for (; n + kRows <= o.n_end; n += kRows)
    int8_avx2_block<kRows>(w.int8(), w.scales, in.x, o.y, o.batch, w.k_dim, o.ldy, n, true);
  for (; n < o.n_end; ++n) int8_avx2_block<1>(w.int8(), w.scales, in.x, o.y, o.batch, w.k_dim, o.ldy, n, false);
}

// 16 bytes = one block of 32 nibbles, taken 8 bytes at a time: bytes h*8 .. h*8+7 give values
// h*8 .. h*8+7 (low nibbles) and 16+h*8 .. 16+h*8+7 (high nibbles). Low and high nibbles
// accumulate apart (two FMA chains a row, as in the int8 loop); each group's sum is scaled into
// a vector total, reduced once a row; the group's lines of a later block are prefetched first.
template <int R>
inline void int4_avx2_block(const uint8_t* q, const float* scales, int64_t group, const float* x, float* y,
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
      int4_group_blocks(g, group, k_pad, &j0, &j1);
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

void int4_f32(const QuantizedWeights& w, const PreparedInputs& in, const OutputRows& o) {
  int64_t n = o.n_begin;
  for (; n + kRows <= o.n_end; n += kRows)
    int4_avx2_block<kRows>(w.int4(), w.scales, w.group, in.x, o.y, o.batch, w.k_dim, o.ldy, n, true);
  for (; n < o.n_end; ++n) int4_avx2_block<1>(w.int4(), w.scales, w.group, in.x, o.y, o.batch, w.k_dim, o.ldy, n, false);
}

// ---------------------------------------------------------------- int16 inputs

EMU_ALWAYS_INLINE __m256i load_x(const int16_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

EMU_ALWAYS_INLINE __m256i widen16(const int8_t* w) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
}

// sum over the block of u_r * x_r, r = 0..3: 4 vpmaddwd (16 products each, in pairs), 3 adds.
EMU_ALWAYS_INLINE __m256i block_dot(const __m256i* u, const int16_t* x) {
  return _mm256_add_epi32(_mm256_add_epi32(_mm256_madd_epi16(u[0], load_x(x)), _mm256_madd_epi16(u[1], load_x(x + 16))),
                          _mm256_add_epi32(_mm256_madd_epi16(u[2], load_x(x + 32)),
                                           _mm256_madd_epi16(u[3], load_x(x + 48))));
}

// R rows from n against BC batch rows from b0. A block's weights are widened to int16 once
// (4 vectors of 16) and dotted with each batch row's inputs; the first batch rows prefetch.
//
// int8: the block is 64 bytes of the row, widened 16 at a time (natural order).
template <int R, int BC>
EMU_ALWAYS_INLINE void int8_i16_avx2_rows(const int8_t* q, const float* scales, const Int16Input& in, float* y,
                                          int64_t b0, int64_t k_dim, int64_t ldy, int64_t n) {
  const int64_t blocks = int16_blocks(k_dim), pfd = gemv_prefetch_distance(R * k_dim);
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
EMU_ALWAYS_INLINE void int4_i16_avx2_rows(const uint8_t* q, const float* scales, int64_t group, const Int16Input& in,
                                          float* y, int64_t b0, int64_t k_dim, int64_t ldy, int64_t n) {
  constexpr int64_t kBytes = kInt16Block / 2;
  const int64_t k_pad = int4_padded_k(k_dim), row_bytes = k_pad / 2, blocks = int16_blocks(k_pad);
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

void int8_i16(const QuantizedWeights& w, const PreparedInputs& x, const OutputRows& o) {
  for_row_blocks(o.batch, o.n_begin, o.n_end, [&]<int R, int BC>(int64_t b, int64_t n) {
    int8_i16_avx2_rows<R, BC>(w.int8(), w.scales, *x.i16, o.y, b, w.k_dim, o.ldy, n);
  });
}

void int4_i16(const QuantizedWeights& w, const PreparedInputs& x, const OutputRows& o) {
  for_row_blocks(o.batch, o.n_begin, o.n_end, [&]<int R, int BC>(int64_t b, int64_t n) {
    int4_i16_avx2_rows<R, BC>(w.int4(), w.scales, w.group, *x.i16, o.y, b, w.k_dim, o.ldy, n);
  });
}

// ---------------------------------------------------------------- int8 inputs

// R rows from n against BC batch rows from b0 (as int4_i16_avx2_rows above),
// U sub-blocks of 64 weights (32 bytes each) at a time: U = 2 when a group holds whole blocks of
// x (group % 128 == 0), so the two sub-blocks share an x step and a weight scale and their int16
// pair sums add before widening (4 * 3810 < 2^15); else U = 1. Each sub-block splits into its
// low and high nibbles, 32 bytes each, once per BC batch rows. The stored nibbles are u = q + 8:
// subtracting the offsets leaves the exact integer sum of q x, scaled by the x block's step times
// the group's scale.
template <int R, int BC, int U>
EMU_ALWAYS_INLINE void int4_i8_avx2_rows(const uint8_t* q, const float* scales, int64_t group, const Int8Input& in,
                                         float* y, int64_t b0, int64_t k_dim, int64_t ldy, int64_t n) {
  constexpr int64_t kSub = kInt8Block / 2, kBytes = U * kSub / 2;
  const int64_t k_pad = int4_padded_k(k_dim), row_bytes = k_pad / 2, blocks = int8_blocks(k_pad);
  const int64_t units = (k_pad + U * kSub - 1) / (U * kSub), units_per_group = group / (U * kSub);
  const int64_t groups = int4_groups(k_dim, group), pfd = gemv_prefetch_distance(R * row_bytes);
  const RowBlocks<uint8_t, R, kBytes> rows(q, n, row_bytes);
  const __m256i nibble = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  __m256 acc[R][BC];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < BC; ++c) acc[i][c] = _mm256_setzero_ps();
  for (int64_t u = 0, g = 0, left = units_per_group; u < units; ++u) {
    const uint8_t* w[R];
    rows.get(u, R > 1 && b0 == 0 && (U == 2 || (u & 1) == 0), pfd, w);  // a cache line holds 64 bytes
    for (int i = 0; i < R; ++i) {
      __m256i lo[U], hi[U];
      for (int h = 0; h < U; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[i] + 32 * h));
        lo[h] = _mm256_and_si256(v, nibble);
        hi[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
      }
      const float scale = scales[(n + i) * groups + g];
      for (int c = 0; c < BC; ++c) {
        const int64_t sub = (b0 + c) * 2 * blocks + U * u;  // first sub-block, over the whole x
        const int8_t* x = in.v.data() + sub * kSub;
        __m256i pairs = _mm256_setzero_si256();
        for (int h = 0; h < U; ++h)
          pairs = _mm256_add_epi16(
              pairs, _mm256_add_epi16(
                         _mm256_maddubs_epi16(lo[h], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + kSub * h))),
                         _mm256_maddubs_epi16(hi[h], _mm256_loadu_si256(
                                                         reinterpret_cast<const __m256i*>(x + kSub * h + 32)))));
        const int32_t* off = U == 2 ? in.block_offset.data() + sub / 2 * 8 : in.offset.data() + sub * 8;
        const __m256i s =
            _mm256_sub_epi32(_mm256_madd_epi16(pairs, ones), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(off)));
        acc[i][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(in.step[sub / 2] * scale), acc[i][c]);
      }
    }
    if (--left == 0) {
      ++g;
      left = units_per_group;
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < BC; ++c) y[(b0 + c) * ldy + n + i] = hsum8(acc[i][c]);
}

template <int U>
void int4_i8_units(const QuantizedWeights& w, const PreparedInputs& x, const OutputRows& o) {
  for_row_blocks(o.batch, o.n_begin, o.n_end, [&]<int R, int BC>(int64_t b, int64_t n) {
    int4_i8_avx2_rows<R, BC, U>(w.int4(), w.scales, w.group, *x.i8, o.y, b, w.k_dim, o.ldy, n);
  });
}

void int4_i8(const QuantizedWeights& w, const PreparedInputs& x, const OutputRows& o) {
  if (w.group % kInt8Block == 0) return int4_i8_units<2>(w, x, o);
  int4_i8_units<1>(w, x, o);
}

QuantizedGemvTable make_table() {
  using W = QuantizedWeight;
  using X = QuantizedInput;
  QuantizedGemvTable t;
  t.at(W::kInt8, X::kFloat32) = {int8_f32, InputLayout::kFloat32};
  t.at(W::kInt8, X::kInt16) = {int8_i16, InputLayout::kInt16};
  t.at(W::kInt8, X::kInt8) = {int8_i16, InputLayout::kInt16};  // int8 x int8 gains nothing on int16's loop
  t.at(W::kInt4, X::kFloat32) = {int4_f32, InputLayout::kFloat32};
  t.at(W::kInt4, X::kInt16) = {int4_i16, InputLayout::kInt16Int4Avx2};
  t.at(W::kInt4, X::kInt8) = {int4_i8, InputLayout::kInt8Int4Avx2};
  return t;
}

}  // namespace
}  // namespace emu_fast::kernels

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // EMU_X86

namespace emu_fast::kernels {

const QuantizedGemvTable* quantized_gemv_table_avx2() {
#ifdef EMU_X86
  static const QuantizedGemvTable table = make_table();
  return &table;
#else
  return nullptr;
#endif
}

}  // namespace emu_fast::kernels
