// The AVX-512 kernels of the integer-input quantized GEMVs (quantized_gemv_avx512.inc), compiled
// twice: for AVX-512BW, and for AVX-512BW with VNNI (vpdpwssd / vpdpbusd: the multiply-adds and
// the add in one instruction), the latter picked where the processor has it.
//
// Neither copy has run on this project's machines (no AVX-512 there): their loops run in
// `make test` through tests/avx512_emulation, which compiles the same .inc against portable
// implementations of the intrinsics; a processor with AVX-512 also runs them in tests/quant/test_quantized_inputs.py
// (every ISA against the exact oracle) and the fused step's self-check.
#include <cstdint>
#include <stdexcept>

#include "kernels/cpu/gemv.h"
#include "kernels/cpu/quantized_gemv_int16.h"
#include "kernels/cpu/quantized_gemv_int8_input.h"
#include "kernels/cpu/quantized_row_blocks.h"

#ifdef EMU_X86
#include <immintrin.h>

#if !defined(__clang__)
// gcc 12's own AVX-512 headers start conversions from _mm512_undefined_ps() (`__Y = __Y`), which
// -Wall reports as (maybe) uninitialized once inlined here: a false positive in the headers.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// Each copy is compiled for its instruction set by a target pragma around it (clang, which
// defines __GNUC__ too but ignores gcc's pragma, has its own; only gcc built this here).
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
#endif  // EMU_X86

namespace emu_fast::kernels {

bool cpu_has_avx512_vnni() {
#ifdef EMU_X86
  static const bool vnni = [] {
    __builtin_cpu_init();
    return cpu_isa() == Isa::kAvx512 && __builtin_cpu_supports("avx512vnni");
  }();
  return vnni;
#else
  return false;
#endif
}

void gemv_int8_rows_int16_avx512(const int8_t* q, const float* scales, const Int16Input& in, float* y, int64_t batch,
                                 int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end) {
#ifdef EMU_X86
  if (cpu_has_avx512_vnni()) return avx512_vnni::int8_i16(q, scales, in, y, batch, k_dim, ldy, n_begin, n_end);
  avx512_bw::int8_i16(q, scales, in, y, batch, k_dim, ldy, n_begin, n_end);
#endif
}

void gemv_int4_rows_int16_avx512(const uint8_t* q, const float* scales, int64_t group, const Int16Input& in, float* y,
                                 int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end) {
#ifdef EMU_X86
  if (cpu_has_avx512_vnni())
    return avx512_vnni::int4_i16(q, scales, group, in, y, batch, k_dim, ldy, n_begin, n_end);
  avx512_bw::int4_i16(q, scales, group, in, y, batch, k_dim, ldy, n_begin, n_end);
#endif
}

void gemv_int4_rows_int8_avx512(const uint8_t* q, const float* scales, int64_t group, const Int8Input& in, float* y,
                                int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end) {
  // Its inputs' order exists for groups of whole blocks only (int4_int8_input_order picks it).
  if (group % kInt8Block != 0) throw std::logic_error("gemv_int4_rows_int8_avx512: group is not a multiple of 128");
#ifdef EMU_X86
  if (cpu_has_avx512_vnni())
    return avx512_vnni::int4_int8(q, scales, group, in, y, batch, k_dim, ldy, n_begin, n_end);
  avx512_bw::int4_int8(q, scales, group, in, y, batch, k_dim, ldy, n_begin, n_end);
#endif
}

}  // namespace emu_fast::kernels
