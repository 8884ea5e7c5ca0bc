// The roundings of x to int16 and int8 blocks (quantized_gemv.h, QuantizedInput) and the orders
// the kernels read them in (InputLayout, quantized_inputs.h). Each block is rounded by a scalar
// loop (any magnitude) or, for whole blocks of ordinary magnitude, 8 floats at a time with AVX2
// (the same integers and steps), then permuted for the kernel that reads it.
#include "kernels/cpu/quantized_inputs.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/isa.h"

namespace emu_fast::kernels {
namespace {

static_assert(kInt8Block == 2 * kInt16Block, "a block of int8 inputs is two blocks of 64 (the int4 orders, widen_int8_input)");

inline int64_t blocks_of(int64_t k, int64_t block) { return (k + block - 1) / block; }

// max |x[i]| over n inputs into *m; false (m unset) when one is not finite.
bool finite_abs_max(const float* x, int64_t n, float* m) {
  float r = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) return false;
    r = std::max(r, std::fabs(x[i]));
  }
  *m = r;
  return true;
}

#ifdef EMU_X86
// The same over 8 * vectors inputs, 8 at a time; false for a NaN (max_ps would drop it). An inf
// comes back as the maximum: the callers' range checks send it to the scalar rounding.
EMU_TARGET_AVX2 bool abs_max_avx2(const float* x, int vectors, float* m) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mx = _mm256_setzero_ps(), unordered = _mm256_setzero_ps();
  for (int i = 0; i < vectors; ++i) {
    const __m256 xi = _mm256_loadu_ps(x + 8 * i);
    mx = _mm256_max_ps(mx, _mm256_and_ps(xi, abs_mask));
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(xi, xi, _CMP_UNORD_Q));
  }
  if (_mm256_movemask_ps(unordered) != 0) return false;
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  *m = _mm_cvtss_f32(m4);
  return true;
}
#endif

// ---------------------------------------------------------------- int16 blocks

// The AVX2 int4 kernel's order of the 64 inputs of a block (quantized_gemv_avx2.cpp): input
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
bool round_block_int16_scalar(const float* x, int64_t n, int16_t* v, float* step) {
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
// 2^-112 (so 2^(15 - e) is a normal float too); other blocks go to round_block_int16_scalar.
// cvtps2dq rounds half to even like nearbyint; packs saturates 32768 to 32767 like the min.
EMU_TARGET_AVX2 bool round_block_int16_avx2(const float* x, int16_t* v, float* step) {
  float mx;
  if (!abs_max_avx2(x, kInt16Block / 8, &mx)) return false;
  uint32_t bits;
  std::memcpy(&bits, &mx, 4);
  const int biased = static_cast<int>(bits >> 23);  // m = 1.f * 2^(biased - 127) < 2^(biased - 126)
  if (biased < 15 || biased >= 255) return round_block_int16_scalar(x, kInt16Block, v, step);  // inf too
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
EMU_TARGET_AVX2 void int16_int4_order_avx2(const int16_t* natural, int16_t* v, int32_t* offset) {
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
void int16_int4_order(const int16_t* natural, bool vector, int16_t* v, int32_t* offset) {
#ifdef EMU_X86
  if (vector) return int16_int4_order_avx2(natural, v, offset);
#endif
  (void)vector;
  for (int i = 0; i < kInt16Block; ++i) v[i] = natural[kInt4Order.at[i]];
  for (int l = 0; l < 8; ++l) {
    int32_t s = 0;
    for (int r = 0; r < 4; ++r) s += v[r * 16 + 2 * l] + v[r * 16 + 2 * l + 1];
    offset[l] = 8 * s;
  }
}

// The AVX-512 int4 kernel widens the 32 bytes of a block's weights to 32 words and takes their
// low nibbles (bytes 0..15: values 0..15, bytes 16..31: values 32..47, quantized_gemv.h) against
// v[0..31] and their high nibbles (values 16..31, 48..63) against v[32..63]: so v holds the
// block's runs of 16 in the order 0, 2, 1, 3.
void int16_int4_order_avx512(const int16_t* natural, int16_t* v) {
  constexpr int kRun[4] = {0, 2, 1, 3};
  for (int r = 0; r < 4; ++r)
    for (int i = 0; i < 16; ++i) v[16 * r + i] = natural[16 * kRun[r] + i];
}

// One block: the vector path when it exists and the block is whole, else the scalar one.
bool round_block_int16(const float* x, int64_t n, bool vector, int16_t* v, float* step) {
#ifdef EMU_X86
  if (vector && n == kInt16Block) return round_block_int16_avx2(x, v, step);
#endif
  (void)vector;
  return round_block_int16_scalar(x, n, v, step);
}

// ---------------------------------------------------------------- int8 blocks

// One block in natural order (quantized_gemv.h's definition, for any finite magnitude: ldexp is
// exact where a multiply by 2^-e would not be representable). Returns false for a non-finite input.
bool round_block_int8_scalar(const float* x, int64_t n, int8_t* v, float* step) {
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
EMU_TARGET_AVX2 bool round_block_int8_avx2(const float* x, int8_t* v, float* step) {
  constexpr int kVectors = kInt8Block / 8;
  float mx;
  if (!abs_max_avx2(x, kVectors, &mx)) return false;
  uint32_t bits;
  std::memcpy(&bits, &mx, 4);
  const int biased = static_cast<int>(bits >> 23);  // m in [2^(biased - 127), 2^(biased - 126))
  if (biased < 1 || biased > 252) return round_block_int8_scalar(x, kInt8Block, v, step);  // inf too
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
EMU_TARGET_AVX2 void int8_int4_order_avx2(int8_t* v, int32_t* offset) {
  const __m256i n0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
  const __m256i n1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 32));
  const __m256i low = _mm256_permute2x128_si256(n0, n1, 0x20), high = _mm256_permute2x128_si256(n0, n1, 0x31);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(v), low);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(v + 32), high);
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(ones8, low), _mm256_maddubs_epi16(ones8, high));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(offset), _mm256_slli_epi32(_mm256_madd_epi16(pairs, ones16), 3));
}

#endif  // EMU_X86

// The AVX-512 int4 kernel loads 64 bytes of a row's weights (128 values: byte i holds value
// 32 (i / 16) + i % 16 in its low nibble and that + 16 in its high one, quantized_gemv.h) and
// multiplies the low nibbles with v[0..63], the high ones with v[64..127]; int32 lane l of its
// sums takes bytes 4l..4l+3 of both.
void int8_int4_order_avx512(const int8_t* natural, int8_t* v, int32_t* offset) {
  for (int i = 0; i < 64; ++i) {
    v[i] = natural[32 * (i / 16) + i % 16];
    v[64 + i] = natural[32 * (i / 16) + 16 + i % 16];
  }
  for (int l = 0; l < 16; ++l) {
    int32_t sum = 0;
    for (int t = 0; t < 4; ++t) sum += v[4 * l + t] + v[64 + 4 * l + t];
    offset[l] = 8 * sum;
  }
}

// One int8 block: the vector path when asked and the block is whole, else the scalar one.
bool round_block_int8(const float* x, int64_t n, bool vector, int8_t* v, float* step) {
#ifdef EMU_X86
  if (vector && n == kInt8Block) return round_block_int8_avx2(x, v, step);
#endif
  (void)vector;
  return round_block_int8_scalar(x, n, v, step);
}

}  // namespace

bool round_inputs_to_int16(const float* x, int64_t batch, int64_t ldx, int64_t k_dim, InputLayout layout,
                           bool vector, Int16Input* in) {
  const int64_t blocks = blocks_of(k_dim, kInt16Block);
  in->v.resize(batch * blocks * kInt16Block);
  in->step.resize(batch * blocks);
  in->offset.resize(layout == InputLayout::kInt16Int4Avx2 ? batch * blocks * 8 : 0);
  int16_t natural[kInt16Block];
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < blocks; ++j) {
      const int64_t k0 = j * kInt16Block, n = std::min(k_dim - k0, kInt16Block), at = b * blocks + j;
      int16_t* v = in->v.data() + at * kInt16Block;
      if (!round_block_int16(x + b * ldx + k0, n, vector, layout == InputLayout::kInt16 ? v : natural, &in->step[at]))
        return false;
      if (layout == InputLayout::kInt16Int4Avx2) int16_int4_order(natural, vector, v, in->offset.data() + at * 8);
      if (layout == InputLayout::kInt16Int4Avx512) int16_int4_order_avx512(natural, v);
    }
  return true;
}

bool round_inputs_to_int8(const float* x, int64_t batch, int64_t ldx, int64_t k_dim, InputLayout layout,
                          bool vector, Int8Input* in) {
  const bool avx2_order = layout == InputLayout::kInt8Int4Avx2, avx512_order = layout == InputLayout::kInt8Int4Avx512;
#ifdef EMU_X86
  if (avx2_order && !vector) return false;  // made with AVX2 only: the caller takes float32
#else
  if (avx2_order) return false;
#endif
  const int64_t blocks = blocks_of(k_dim, kInt8Block);
  in->v.resize(batch * blocks * kInt8Block);
  in->step.resize(batch * blocks);
  in->offset.resize(avx2_order ? batch * blocks * 2 * 8 : 0);
  in->block_offset.resize(avx2_order ? batch * blocks * 8 : avx512_order ? batch * blocks * 16 : 0);
  int8_t natural[kInt8Block];
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < blocks; ++j) {
      const int64_t k0 = j * kInt8Block, n = std::min(k_dim - k0, kInt8Block), at = b * blocks + j;
      int8_t* v = in->v.data() + at * kInt8Block;
      if (!round_block_int8(x + b * ldx + k0, n, vector, avx512_order ? natural : v, &in->step[at])) return false;
#ifdef EMU_X86
      if (avx2_order) {
        int32_t* off = in->offset.data() + 2 * at * 8;
        int8_int4_order_avx2(v, off);
        int8_int4_order_avx2(v + kInt8Block / 2, off + 8);
        for (int l = 0; l < 8; ++l) in->block_offset[at * 8 + l] = off[l] + off[8 + l];
      }
#endif
      if (avx512_order) int8_int4_order_avx512(natural, v, in->block_offset.data() + at * 16);
    }
  return true;
}

void widen_int8_input(const Int8Input& in8, int64_t batch, int64_t k_dim, Int16Input* in16) {
  constexpr int64_t kSub = kInt8Block / kInt16Block;
  const int64_t blocks8 = blocks_of(k_dim, kInt8Block), blocks16 = blocks_of(k_dim, kInt16Block);
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

}  // namespace emu_fast::kernels
