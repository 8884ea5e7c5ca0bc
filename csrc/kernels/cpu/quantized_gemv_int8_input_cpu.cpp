// The int4 GEMV with int8 inputs (QuantizedInput::kInt8, quantized_gemv.h), and the rounding of
// x to int8 blocks that every kInt8 product shares.
//
// Why: with int16 inputs an int4 block of 64 weights costs 6 shifts and masks (to 4 vectors of
// 16 int16 nibbles) and 4 vpmaddwd. With int8 inputs the nibbles stay bytes: one mask and one
// shift-and-mask give 2 vectors of 32, and vpmaddubsw (unsigned bytes times signed bytes, summed
// in pairs to int16) takes 32 products an instruction: 2 of them, one add and one vpmaddwd
// against ones to int32, about 10 instructions a block against 20.
//
// The sums are exact: a vpmaddubsw pair is at most 2 * 15 * 127 = 3810 and two of them added
// 7620, far inside int16; a block's int32 lanes hold 8 products each.
#include "kernels/cpu/quantized_gemv_int8_input.h"

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

static_assert(kInt8Block == 2 * kInt16Block, "a block of x is two sub-blocks of 64 (the int4 order, widen_int8_input)");

inline int64_t x_blocks(int64_t k) { return (k + kInt8Block - 1) / kInt8Block; }

// One block in natural order (quantized_gemv.h's definition, for any finite magnitude: ldexp is
// exact where a multiply by 2^-e would not be representable). Returns false for a non-finite input.
bool round_block_scalar(const float* x, int64_t n, int8_t* v, float* step) {
  float m;
  if (!finite_abs_max(x, n, &m)) return false;
  std::fill(v, v + kInt8Block, int8_t(0));
  if (m == 0.f) {
    *step = 1.f;
    return true;
  }
  int e;
  const float mantissa = std::frexp(m, &e);  // m = mantissa * 2^e, mantissa in [0.5, 1)
  const float inv = 127.f / mantissa;
  for (int64_t i = 0; i < n; ++i) {
    const float r = std::nearbyint(std::ldexp(x[i], -e) * inv);
    v[i] = static_cast<int8_t>(std::clamp(r, -127.f, 127.f));
  }
  *step = std::ldexp(mantissa / 127.f, e);
  return true;
}

#ifdef EMU_X86
// The same, 8 floats at a time, for blocks whose largest |x| is a normal float below 2^126 (so
// 2^-e is a normal float and x * 2^-e rounds as ldexp does); other blocks go to the scalar one.
// cvtps2dq rounds half to even like nearbyint; |x 2^-e * inv| <= 127 rounds to at most 127.
EMU_TARGET_AVX2 bool round_block_avx2(const float* x, int8_t* v, float* step) {
  constexpr int kVectors = kInt8Block / 8;
  float mx;
  if (!abs_max_avx2(x, kVectors, &mx)) return false;
  uint32_t bits;
  std::memcpy(&bits, &mx, 4);
  const int biased = static_cast<int>(bits >> 23);  // m in [2^(biased - 127), 2^(biased - 126))
  if (biased < 1 || biased > 252) return round_block_scalar(x, kInt8Block, v, step);  // inf too
  const int e = biased - 126;
  const uint32_t down_bits = static_cast<uint32_t>(127 - e) << 23, mantissa_bits = (bits & 0x007fffffu) | (126u << 23);
  float down, mantissa;
  std::memcpy(&down, &down_bits, 4);
  std::memcpy(&mantissa, &mantissa_bits, 4);
  const float inv = 127.f / mantissa;
  *step = std::ldexp(mantissa / 127.f, e);
  const __m256 dv = _mm256_set1_ps(down), iv = _mm256_set1_ps(inv);
  // packs works within 128-bit lanes: 4 int32 vectors a, b, c, d become dwords
  // a0-3 b0-3 c0-3 d0-3 a4-7 b4-7 c4-7 d4-7 (4 bytes each); the permute restores order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int h = 0; h < kVectors / 4; ++h) {
    __m256i r[4];
    for (int i = 0; i < 4; ++i)
      r[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 32 * h + 8 * i), dv), iv));
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(v + 32 * h), _mm256_permutevar8x32_epi32(p, order));
  }
  return true;
}

// A block in natural order to the AVX2 int4 kernel's: one 32-byte load of int4 weights holds
// values 0..15 and 32..47 in its low nibbles, 16..31 and 48..63 in its high ones (quantized_gemv.h),
// so the inputs go as [0..15, 32..47] then [16..31, 48..63]. Offsets: lane l of the kernel's
// int32 sums takes bytes 4l..4l+3 of both halves.
EMU_TARGET_AVX2 void to_int4_order_avx2(int8_t* v, int32_t* offset) {
  const __m256i n0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
  const __m256i n1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 32));
  const __m256i low = _mm256_permute2x128_si256(n0, n1, 0x20), high = _mm256_permute2x128_si256(n0, n1, 0x31);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(v), low);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(v + 32), high);
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(ones8, low), _mm256_maddubs_epi16(ones8, high));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(offset), _mm256_slli_epi32(_mm256_madd_epi16(pairs, ones16), 3));
}

// ---------------------------------------------------------------- AVX2 int4

// R rows from n against BC batch rows from b0 (as int4_i16_avx2_rows in quantized_gemv_int16_cpu.cpp),
// U sub-blocks of 64 weights (32 bytes each) at a time: U = 2 when a group holds whole blocks of
// x (group % 128 == 0), so the two sub-blocks share an x step and a weight scale and their int16
// pair sums add before widening (4 * 3810 < 2^15); else U = 1. Each sub-block splits into its
// low and high nibbles, 32 bytes each, once per BC batch rows. The stored nibbles are u = q + 8:
// subtracting the offsets leaves the exact integer sum of q x, scaled by the x block's step times
// the group's scale.
template <int R, int BC, int U>
EMU_TARGET_AVX2 EMU_ALWAYS_INLINE void int4_i8_avx2_rows(const uint8_t* q, const float* scales, int64_t group,
                                                         const Int8Input& in, float* y, int64_t b0, int64_t k_dim,
                                                         int64_t ldy, int64_t n) {
  constexpr int64_t kSub = kInt8Block / 2, kBytes = U * kSub / 2;
  const int64_t k_pad = int4_padded_k(k_dim), row_bytes = k_pad / 2, blocks = x_blocks(k_pad);
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

template <int R, int U>
EMU_TARGET_AVX2 EMU_ALWAYS_INLINE void int4_i8_avx2_batch(const uint8_t* q, const float* scales, int64_t group,
                                                          const Int8Input& in, float* y, int64_t batch,
                                                          int64_t k_dim, int64_t ldy, int64_t n) {
  int64_t b = 0;
  for (; b + 2 <= batch; b += 2) int4_i8_avx2_rows<R, 2, U>(q, scales, group, in, y, b, k_dim, ldy, n);
  if (b < batch) int4_i8_avx2_rows<R, 1, U>(q, scales, group, in, y, b, k_dim, ldy, n);
}

template <int U>
EMU_TARGET_AVX2 EMU_ALWAYS_INLINE void int4_i8_avx2_units(const uint8_t* q, const float* scales, int64_t group,
                                                          const Int8Input& in, float* y, int64_t batch,
                                                          int64_t k_dim, int64_t ldy, int64_t n_begin,
                                                          int64_t n_end) {
  int64_t n = n_begin;
  for (; n + 4 <= n_end; n += 4) int4_i8_avx2_batch<4, U>(q, scales, group, in, y, batch, k_dim, ldy, n);
  for (; n < n_end; ++n) int4_i8_avx2_batch<1, U>(q, scales, group, in, y, batch, k_dim, ldy, n);
}

EMU_TARGET_AVX2 void int4_i8_avx2(const uint8_t* q, const float* scales, int64_t group, const Int8Input& in,
                                  float* y, int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin,
                                  int64_t n_end) {
  if (group % kInt8Block == 0) return int4_i8_avx2_units<2>(q, scales, group, in, y, batch, k_dim, ldy, n_begin, n_end);
  int4_i8_avx2_units<1>(q, scales, group, in, y, batch, k_dim, ldy, n_begin, n_end);
}
#endif  // EMU_X86

}  // namespace

bool round_inputs_to_int8(const float* x, int64_t batch, int64_t ldx, int64_t k_dim, Int8Order order, bool vector,
                          Int8Input* in) {
  // The AVX2 int4 order is made with AVX2: without it, the caller takes float32.
#ifdef EMU_X86
  if (order == Int8Order::kInt4Avx2 && !vector) return false;
#else
  if (order == Int8Order::kInt4Avx2) return false;
#endif
  const bool avx2_order = order == Int8Order::kInt4Avx2, avx512_order = order == Int8Order::kInt4Avx512;
  const int64_t blocks = x_blocks(k_dim);
  in->v.resize(batch * blocks * kInt8Block);
  in->step.resize(batch * blocks);
  in->offset.resize(avx2_order ? batch * blocks * 2 * 8 : 0);
  in->block_offset.resize(avx2_order ? batch * blocks * 8 : avx512_order ? batch * blocks * 16 : 0);
  int8_t natural[kInt8Block];
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < blocks; ++j) {
      const int64_t k0 = j * kInt8Block, n = std::min(k_dim - k0, kInt8Block), at = b * blocks + j;
      int8_t* v = in->v.data() + at * kInt8Block;
      int8_t* out = avx512_order ? natural : v;
#ifdef EMU_X86
      const bool ok = vector && n == kInt8Block ? round_block_avx2(x + b * ldx + k0, out, &in->step[at])
                                                : round_block_scalar(x + b * ldx + k0, n, out, &in->step[at]);
      if (ok && avx2_order) {
        int32_t* off = in->offset.data() + 2 * at * 8;
        to_int4_order_avx2(v, off);
        to_int4_order_avx2(v + kInt8Block / 2, off + 8);
        for (int l = 0; l < 8; ++l) in->block_offset[at * 8 + l] = off[l] + off[8 + l];
      }
#else
      (void)vector;
      const bool ok = round_block_scalar(x + b * ldx + k0, n, out, &in->step[at]);
#endif
      if (!ok) return false;
      if (avx512_order) avx512_int4_int8_order(natural, v, in->block_offset.data() + at * 16);
    }
  return true;
}

void widen_int8_input(const Int8Input& in8, int64_t batch, int64_t k_dim, Int16Input* in16) {
  constexpr int64_t kSub = kInt8Block / kInt16Block;
  const int64_t blocks8 = x_blocks(k_dim), blocks16 = (k_dim + kInt16Block - 1) / kInt16Block;
  in16->v.resize(batch * blocks16 * kInt16Block);
  in16->step.resize(batch * blocks16);
  in16->offset.clear();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < blocks16; ++j) {
      const int8_t* from = in8.v.data() + (b * blocks8 * kSub + j) * kInt16Block;
      std::copy(from, from + kInt16Block, in16->v.begin() + (b * blocks16 + j) * kInt16Block);
      in16->step[b * blocks16 + j] = in8.step[b * blocks8 + j / kSub];
    }
}

void gemv_int4_rows_int8_avx2(const uint8_t* q, const float* scales, int64_t group, const Int8Input& in, float* y,
                              int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end) {
#ifdef EMU_X86
  int4_i8_avx2(q, scales, group, in, y, batch, k_dim, ldy, n_begin, n_end);
#else  // unreachable: round_inputs_to_int8 makes no int4-ordered inputs off x86
  (void)q, (void)scales, (void)group, (void)in, (void)y, (void)batch, (void)k_dim, (void)ldy, (void)n_begin,
      (void)n_end;
#endif
}

}  // namespace emu_fast::kernels
