// The AVX-512 quantized GEMVs. The float32-input kernels are here; the integer-input ones
// (quantized_gemv_avx512.inc) are compiled twice, for AVX-512BW and for AVX-512BW with VNNI
// (vpdpwssd / vpdpbusd: the multiply-adds and the add in one instruction), and the table takes
// the VNNI copy where the processor has it. int4 times int8 inputs takes groups of whole blocks
// of 128 here; other groups take the AVX2 kernel (the table's fallback to the level below).
//
// The integer kernels run in `make test` on processors without AVX-512 too: tests/avx512_emulation
// compiles the same .inc against portable implementations of the intrinsics. A processor with
// AVX-512 also runs every entry in tests/quant/test_quantized_inputs.py (every level against the
// exact oracle) and in the fused step's self-check.
#include "kernels/cpu/quantized_gemv_table.h"

#ifdef EMU_X86
#include "kernels/cpu/gemv.h"
#include "kernels/cpu/isa.h"
#include "kernels/cpu/quantized_row_blocks.h"

#if !defined(__clang__)
// gcc 12's own AVX-512 headers start conversions from _mm512_undefined_ps() (`__Y = __Y`), which
// -Wall reports as (maybe) uninitialized once inlined here: a false positive in the headers.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// Each copy is compiled for its instruction set by a target pragma around it (clang, which
// defines __GNUC__ too but ignores gcc's pragma, has its own).
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
namespace emu_fast::kernels::avx512_bw {
#define EMU_AVX512_VNNI 0
#include "kernels/cpu/quantized_gemv_avx512.inc"
#undef EMU_AVX512_VNNI
}  // namespace emu_fast::kernels::avx512_bw

// The float32-input kernels (no integer instructions: one copy, in the AVX-512BW region).
namespace emu_fast::kernels {
namespace {

constexpr int kRows = 4;

template <int R>
inline void int8_avx512_block(
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

void int8_f32(const QuantizedWeights& w, const PreparedInputs& in, const OutputRows& o) {
  int64_t n = o.n_begin;
  for (; n + kRows <= o.n_end; n += kRows) int8_avx512_block<kRows>(w.int8(), w.scales, in.x, o.y, o.batch, w.k_dim, o.ldy, n);
  for (; n < o.n_end; ++n) int8_avx512_block<1>(w.int8(), w.scales, in.x, o.y, o.batch, w.k_dim, o.ldy, n);
}

// One block of 32 nibbles (16 bytes) widened: low nibbles = values 0..15, high = 16..31.
template <int R>
inline void int4_avx512_block(
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
      int4_group_blocks(g, group, k_pad, &j0, &j1);
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

void int4_f32(const QuantizedWeights& w, const PreparedInputs& in, const OutputRows& o) {
  int64_t n = o.n_begin;
  for (; n + kRows <= o.n_end; n += kRows)
    int4_avx512_block<kRows>(w.int4(), w.scales, w.group, in.x, o.y, o.batch, w.k_dim, o.ldy, n);
  for (; n < o.n_end; ++n) int4_avx512_block<1>(w.int4(), w.scales, w.group, in.x, o.y, o.batch, w.k_dim, o.ldy, n);
}

}  // namespace
}  // namespace emu_fast::kernels
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(                                                                        \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
#endif
namespace emu_fast::kernels::avx512_vnni {
#define EMU_AVX512_VNNI 1
#include "kernels/cpu/quantized_gemv_avx512.inc"
#undef EMU_AVX512_VNNI
}  // namespace emu_fast::kernels::avx512_vnni
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace emu_fast::kernels {
namespace {

bool cpu_has_avx512_vnni() {
  static const bool vnni = [] {
    __builtin_cpu_init();
    return cpu_isa() == Isa::kAvx512 && __builtin_cpu_supports("avx512vnni");
  }();
  return vnni;
}

// The table over one copy of the integer kernels (avx512_bw or avx512_vnni).
template <typename Copy>
QuantizedGemvTable make_table() {
  using W = QuantizedWeight;
  using X = QuantizedInput;
  QuantizedGemvTable t;
  t.at(W::kInt8, X::kFloat32) = {int8_f32, InputLayout::kFloat32};
  t.at(W::kInt8, X::kInt16) = {Copy::int8_i16, InputLayout::kInt16};
  t.at(W::kInt8, X::kInt8) = {Copy::int8_i16, InputLayout::kInt16};
  t.at(W::kInt4, X::kFloat32) = {int4_f32, InputLayout::kFloat32};
  t.at(W::kInt4, X::kInt16) = {Copy::int4_i16, InputLayout::kInt16Int4Avx512};
  t.at(W::kInt4, X::kInt8) = {Copy::int4_i8, InputLayout::kInt8Int4Avx512, kInt8Block};
  return t;
}

// The .inc's entry points in the table's signature.
#define EMU_AVX512_COPY(ns)                                                                        \
  struct ns##_copy {                                                                                \
    static void int8_i16(const QuantizedWeights& w, const PreparedInputs& x, const OutputRows& o) { \
      ns::int8_i16(w.int8(), w.scales, *x.i16, o.y, o.batch, w.k_dim, o.ldy, o.n_begin, o.n_end);   \
    }                                                                                               \
    static void int4_i16(const QuantizedWeights& w, const PreparedInputs& x, const OutputRows& o) { \
      ns::int4_i16(w.int4(), w.scales, w.group, *x.i16, o.y, o.batch, w.k_dim, o.ldy, o.n_begin,    \
                   o.n_end);                                                                        \
    }                                                                                               \
    static void int4_i8(const QuantizedWeights& w, const PreparedInputs& x, const OutputRows& o) {  \
      ns::int4_int8(w.int4(), w.scales, w.group, *x.i8, o.y, o.batch, w.k_dim, o.ldy, o.n_begin,    \
                    o.n_end);                                                                       \
    }                                                                                               \
  };
EMU_AVX512_COPY(avx512_bw)
EMU_AVX512_COPY(avx512_vnni)
#undef EMU_AVX512_COPY

}  // namespace
}  // namespace emu_fast::kernels
#endif  // EMU_X86

namespace emu_fast::kernels {

const QuantizedGemvTable* quantized_gemv_table_avx512() {
#ifdef EMU_X86
  static const QuantizedGemvTable table =
      cpu_has_avx512_vnni() ? make_table<avx512_vnni_copy>() : make_table<avx512_bw_copy>();
  return &table;
#else
  return nullptr;
#endif
}

}  // namespace emu_fast::kernels
