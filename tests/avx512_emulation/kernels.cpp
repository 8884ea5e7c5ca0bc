// C entry points over csrc/kernels/quantized_gemv_avx512.inc compiled against the portable
// intrinsics of intrinsics.h (both copies, AVX-512BW and VNNI, as the production build makes
// them), for tests/avx512_emulator.py. The inputs are rounded and laid out by the production
// code (round_inputs_to_int16 / round_inputs_to_int8 in the AVX-512 orders, compiled from csrc/
// into the same library), so what runs is the whole AVX-512 path of gemv_int8_rows /
// gemv_int4_rows after the instruction-set choice. No <immintrin.h> in this file; its kernels
// live in their own namespaces so that they never resolve to the real AVX-512 copies linked
// beside them (same names, same signatures).
#include <cstdint>
#include <cstring>

#include "intrinsics.h"
#include "kernels/cpu/gemv.h"
#include "kernels/cpu/quantized_inputs.h"
#include "kernels/cpu/quantized_row_blocks.h"

namespace emu_fast::kernels::emulated_avx512_bw {
#define EMU_AVX512_VNNI 0
#include "kernels/cpu/quantized_gemv_avx512.inc"
#undef EMU_AVX512_VNNI
}  // namespace emu_fast::kernels::emulated_avx512_bw

namespace emu_fast::kernels::emulated_avx512_vnni {
#define EMU_AVX512_VNNI 1
#include "kernels/cpu/quantized_gemv_avx512.inc"
#undef EMU_AVX512_VNNI
}  // namespace emu_fast::kernels::emulated_avx512_vnni

namespace {
namespace k = emu_fast::kernels;
// The production rounding may use AVX2 where the processor has it, as gemv_*_rows do.
bool vector() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
}  // namespace

extern "C" {

// Each returns 0, or 1 when an input is not finite (the float32 path would take over).
// x: float32 [batch, k_dim] (int8 weights) or [batch, int4_padded_k(k_dim)] with zeros past
// k_dim (int4), as gemv_int8_rows / gemv_int4_rows receive it.
int emu_avx512_int8_i16(int vnni, const int8_t* q, const float* scales, const float* x, float* y, int64_t batch,
                        int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end) {
  k::Int16Input in;
  if (!k::round_inputs_to_int16(x, batch, k_dim, k_dim, k::InputLayout::kInt16, vector(), &in)) return 1;
  if (vnni) {
    k::emulated_avx512_vnni::int8_i16(q, scales, in, y, batch, k_dim, ldy, n_begin, n_end);
  } else {
    k::emulated_avx512_bw::int8_i16(q, scales, in, y, batch, k_dim, ldy, n_begin, n_end);
  }
  return 0;
}

int emu_avx512_int4_i16(int vnni, const uint8_t* q, const float* scales, int64_t group, const float* x, float* y,
                        int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end) {
  const int64_t k_pad = k::int4_padded_k(k_dim);
  k::Int16Input in;
  if (!k::round_inputs_to_int16(x, batch, k_pad, k_pad, k::InputLayout::kInt16Int4Avx512, vector(), &in))
    return 1;
  if (vnni) {
    k::emulated_avx512_vnni::int4_i16(q, scales, group, in, y, batch, k_dim, ldy, n_begin, n_end);
  } else {
    k::emulated_avx512_bw::int4_i16(q, scales, group, in, y, batch, k_dim, ldy, n_begin, n_end);
  }
  return 0;
}

// int8 inputs: only for the groups the AVX-512 kernel takes (whole blocks of 128; its table entry).
int emu_avx512_int4_i8(int vnni, const uint8_t* q, const float* scales, int64_t group, const float* x, float* y,
                       int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end) {
  if (group % k::kInt8Block != 0) return 2;
  const int64_t k_pad = k::int4_padded_k(k_dim);
  k::Int8Input in;
  if (!k::round_inputs_to_int8(x, batch, k_pad, k_pad, k::InputLayout::kInt8Int4Avx512, vector(), &in)) return 1;
  if (vnni) {
    k::emulated_avx512_vnni::int4_int8(q, scales, group, in, y, batch, k_dim, ldy, n_begin, n_end);
  } else {
    k::emulated_avx512_bw::int4_int8(q, scales, group, in, y, batch, k_dim, ldy, n_begin, n_end);
  }
  return 0;
}

}  // extern "C"
