// Portable stand-ins for the AVX-512 intrinsics that csrc/kernels/quantized_gemv_avx512.inc
// uses, each following Intel's Intrinsics Guide operation for it, so that file's kernels run on
// processors without AVX-512 (tests only; see docs/emulators.md). Include instead of <immintrin.h>.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

struct __m256i {
  uint8_t b[32];
};
struct __m512i {
  uint8_t b[64];
};
struct __m512 {
  float f[16];
};

namespace emu_fast::avx512_emulation {
template <typename T>
inline T lane(const void* v, int i) {
  T t;
  std::memcpy(&t, static_cast<const uint8_t*>(v) + i * sizeof(T), sizeof(T));
  return t;
}
template <typename T>
inline void set_lane(void* v, int i, T t) {
  std::memcpy(static_cast<uint8_t*>(v) + i * sizeof(T), &t, sizeof(T));
}
// Intel's pseudocode adds 32-bit values modulo 2^32 (no saturation, no undefined overflow).
inline int32_t wrap_add(int32_t a, int32_t b) {
  return static_cast<int32_t>(static_cast<uint32_t>(a) + static_cast<uint32_t>(b));
}
// SignExtend32(a.word[2i]) * SignExtend32(b.word[2i]) + the same for 2i + 1, modulo 2^32.
inline int32_t pair_products(const __m512i& a, const __m512i& b, int i) {
  const int32_t p0 = int32_t(lane<int16_t>(&a, 2 * i)) * lane<int16_t>(&b, 2 * i);
  const int32_t p1 = int32_t(lane<int16_t>(&a, 2 * i + 1)) * lane<int16_t>(&b, 2 * i + 1);
  return wrap_add(p0, p1);  // (-32768)^2 * 2 = 2^31 wraps, as vpmaddwd's does
}
}  // namespace emu_fast::avx512_emulation

inline __m256i _mm256_loadu_si256(const __m256i* p) {
  __m256i r;
  std::memcpy(r.b, p, 32);
  return r;
}
inline __m512i _mm512_loadu_si512(const void* p) {
  __m512i r;
  std::memcpy(r.b, p, 64);
  return r;
}
inline __m512i _mm512_cvtepi8_epi16(__m256i a) {  // vpmovsxbw
  namespace e = emu_fast::avx512_emulation;
  __m512i r;
  for (int i = 0; i < 32; ++i) e::set_lane<int16_t>(&r, i, e::lane<int8_t>(&a, i));
  return r;
}
inline __m512i _mm512_cvtepu8_epi16(__m256i a) {  // vpmovzxbw
  namespace e = emu_fast::avx512_emulation;
  __m512i r;
  for (int i = 0; i < 32; ++i) e::set_lane<int16_t>(&r, i, e::lane<uint8_t>(&a, i));
  return r;
}
inline __m512i _mm512_set1_epi16(short v) {
  namespace e = emu_fast::avx512_emulation;
  __m512i r;
  for (int i = 0; i < 32; ++i) e::set_lane<int16_t>(&r, i, v);
  return r;
}
inline __m512i _mm512_and_si512(__m512i a, __m512i b) {
  __m512i r;
  for (int i = 0; i < 64; ++i) r.b[i] = a.b[i] & b.b[i];
  return r;
}
inline __m512i _mm512_srli_epi16(__m512i a, unsigned int imm) {  // logical; counts above 15 give 0
  namespace e = emu_fast::avx512_emulation;
  __m512i r;
  for (int i = 0; i < 32; ++i)
    e::set_lane<uint16_t>(&r, i, imm > 15 ? uint16_t(0) : uint16_t(e::lane<uint16_t>(&a, i) >> imm));
  return r;
}
inline __m512i _mm512_sub_epi16(__m512i a, __m512i b) {  // modulo 2^16
  namespace e = emu_fast::avx512_emulation;
  __m512i r;
  for (int i = 0; i < 32; ++i) e::set_lane<uint16_t>(&r, i, uint16_t(e::lane<uint16_t>(&a, i) - e::lane<uint16_t>(&b, i)));
  return r;
}
inline __m512i _mm512_add_epi32(__m512i a, __m512i b) {
  namespace e = emu_fast::avx512_emulation;
  __m512i r;
  for (int i = 0; i < 16; ++i) e::set_lane<int32_t>(&r, i, e::wrap_add(e::lane<int32_t>(&a, i), e::lane<int32_t>(&b, i)));
  return r;
}
inline __m512i _mm512_madd_epi16(__m512i a, __m512i b) {  // vpmaddwd
  namespace e = emu_fast::avx512_emulation;
  __m512i r;
  for (int i = 0; i < 16; ++i) e::set_lane<int32_t>(&r, i, e::pair_products(a, b, i));
  return r;
}
inline __m512i _mm512_dpwssd_epi32(__m512i src, __m512i a, __m512i b) {  // vpdpwssd: src + pairs, no saturation
  namespace e = emu_fast::avx512_emulation;
  __m512i r;
  for (int i = 0; i < 16; ++i) e::set_lane<int32_t>(&r, i, e::wrap_add(e::lane<int32_t>(&src, i), e::pair_products(a, b, i)));
  return r;
}
inline __m512 _mm512_setzero_ps() { return __m512{}; }
inline __m512 _mm512_set1_ps(float v) {
  __m512 r;
  for (float& f : r.f) f = v;
  return r;
}
inline __m512 _mm512_cvtepi32_ps(__m512i a) {  // rounds to nearest even, as MXCSR's default
  namespace e = emu_fast::avx512_emulation;
  __m512 r;
  for (int i = 0; i < 16; ++i) r.f[i] = static_cast<float>(e::lane<int32_t>(&a, i));
  return r;
}
inline __m512 _mm512_fmadd_ps(__m512 a, __m512 b, __m512 c) {  // one rounding
  __m512 r;
  for (int i = 0; i < 16; ++i) r.f[i] = std::fma(a.f[i], b.f[i], c.f[i]);
  return r;
}
// gcc's and Intel's reduction order: halves of 256, then 128, 64 and 32 bits, added lane-wise.
inline float _mm512_reduce_add_ps(__m512 a) {
  for (int w = 8; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) a.f[i] += a.f[i + w];
  return a.f[0];
}

inline __m512i _mm512_setzero_si512() { return __m512i{}; }
inline __m512i _mm512_set1_epi8(char v) {
  __m512i r;
  std::memset(r.b, static_cast<unsigned char>(v), 64);
  return r;
}
inline __m512i _mm512_add_epi16(__m512i a, __m512i b) {  // modulo 2^16
  namespace e = emu_fast::avx512_emulation;
  __m512i r;
  for (int i = 0; i < 32; ++i) e::set_lane<uint16_t>(&r, i, uint16_t(e::lane<uint16_t>(&a, i) + e::lane<uint16_t>(&b, i)));
  return r;
}
inline __m512i _mm512_sub_epi32(__m512i a, __m512i b) {
  namespace e = emu_fast::avx512_emulation;
  __m512i r;
  for (int i = 0; i < 16; ++i)
    e::set_lane<int32_t>(&r, i, static_cast<int32_t>(e::lane<uint32_t>(&a, i) - e::lane<uint32_t>(&b, i)));
  return r;
}
// vpmaddubsw: Saturate16(ZeroExtend(a.byte[2i]) * SignExtend(b.byte[2i]) + the same for 2i + 1)
inline __m512i _mm512_maddubs_epi16(__m512i a, __m512i b) {
  namespace e = emu_fast::avx512_emulation;
  __m512i r;
  for (int i = 0; i < 32; ++i) {
    const int32_t s = int32_t(e::lane<uint8_t>(&a, 2 * i)) * e::lane<int8_t>(&b, 2 * i) +
                      int32_t(e::lane<uint8_t>(&a, 2 * i + 1)) * e::lane<int8_t>(&b, 2 * i + 1);
    e::set_lane<int16_t>(&r, i, int16_t(s > 32767 ? 32767 : s < -32768 ? -32768 : s));
  }
  return r;
}
// vpdpbusd: src.dword[i] + the four ZeroExtend(a.byte[4i + t]) * SignExtend(b.byte[4i + t]),
// modulo 2^32 (no saturation, unlike vpdpbusds)
inline __m512i _mm512_dpbusd_epi32(__m512i src, __m512i a, __m512i b) {
  namespace e = emu_fast::avx512_emulation;
  __m512i r;
  for (int i = 0; i < 16; ++i) {
    int32_t s = 0;
    for (int t = 0; t < 4; ++t) s += int32_t(e::lane<uint8_t>(&a, 4 * i + t)) * e::lane<int8_t>(&b, 4 * i + t);
    e::set_lane<int32_t>(&r, i, e::wrap_add(e::lane<int32_t>(&src, i), s));
  }
  return r;
}
