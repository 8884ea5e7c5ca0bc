// C entry points over csrc/kernels/quantized_gemv_avx512.inc compiled against the portable
// intrinsics of intrinsics.h (both copies, AVX-512BW and VNNI, as the production build makes
// them), for tests/avx512_emulator.py. No <immintrin.h> in this file.
#include <cstdint>
#include <cstring>

#include "intrinsics.h"
#include "kernels/gemv.h"
#include "kernels/quantized_gemv_int16.h"
#include "kernels/quantized_gemv_int8_input.h"
#include "kernels/quantized_row_blocks.h"

namespace emu_fast::kernels::avx512_bw {
#define EMU_AVX512_VNNI 0
#include "kernels/quantized_gemv_avx512.inc"
#undef EMU_AVX512_VNNI
}  // namespace emu_fast::kernels::avx512_bw

namespace emu_fast::kernels::avx512_vnni {
#define EMU_AVX512_VNNI 1
#include "kernels/quantized_gemv_avx512.inc"
#undef EMU_AVX512_VNNI
}  // namespace emu_fast::kernels::avx512_vnni

namespace {
using emu_fast::kernels::Int16Input;
using emu_fast::kernels::kInt16Block;

// v: int16 [batch, blocks * kInt16Block] in natural order, step [batch, blocks]; int4 blocks are
// put in the AVX-512 order by the production code's avx512_int4_order.
Int16Input inputs(const int16_t* v, const float* step, int64_t batch, int64_t blocks, bool int4) {
  Int16Input in;
  in.v.resize(batch * blocks * kInt16Block);
  in.step.assign(step, step + batch * blocks);
  for (int64_t j = 0; j < batch * blocks; ++j) {
    if (int4) {
      emu_fast::kernels::avx512_int4_order(v + j * kInt16Block, in.v.data() + j * kInt16Block);
    } else {
      std::memcpy(in.v.data() + j * kInt16Block, v + j * kInt16Block, kInt16Block * sizeof(int16_t));
    }
  }
  return in;
}
}  // namespace

extern "C" {

void emu_avx512_int8_i16(int vnni, const int8_t* q, const float* scales, const int16_t* v, const float* step, float* y,
                         int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end) {
  const Int16Input in = inputs(v, step, batch, (k_dim + kInt16Block - 1) / kInt16Block, false);
  if (vnni) return emu_fast::kernels::avx512_vnni::int8_i16(q, scales, in, y, batch, k_dim, ldy, n_begin, n_end);
  emu_fast::kernels::avx512_bw::int8_i16(q, scales, in, y, batch, k_dim, ldy, n_begin, n_end);
}

void emu_avx512_int4_i16(int vnni, const uint8_t* q, const float* scales, int64_t group, const int16_t* v,
                         const float* step, float* y, int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin,
                         int64_t n_end) {
  const int64_t k_pad = emu_fast::kernels::int4_padded_k(k_dim);
  const Int16Input in = inputs(v, step, batch, (k_pad + kInt16Block - 1) / kInt16Block, true);
  if (vnni)
    return emu_fast::kernels::avx512_vnni::int4_i16(q, scales, group, in, y, batch, k_dim, ldy, n_begin, n_end);
  emu_fast::kernels::avx512_bw::int4_i16(q, scales, group, in, y, batch, k_dim, ldy, n_begin, n_end);
}

// v: int8 [batch, blocks * kInt8Block] in natural order, step [batch, blocks]; put in the AVX-512
// order, with offsets, by the production code's avx512_int4_int8_order.
void emu_avx512_int4_i8(int vnni, const uint8_t* q, const float* scales, int64_t group, const int8_t* v,
                        const float* step, float* y, int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin,
                        int64_t n_end) {
  using emu_fast::kernels::kInt8Block;
  const int64_t blocks = (emu_fast::kernels::int4_padded_k(k_dim) + kInt8Block - 1) / kInt8Block;
  emu_fast::kernels::Int8Input in;
  in.v.resize(batch * blocks * kInt8Block);
  in.step.assign(step, step + batch * blocks);
  in.block_offset.resize(batch * blocks * 16);
  for (int64_t j = 0; j < batch * blocks; ++j)
    emu_fast::kernels::avx512_int4_int8_order(v + j * kInt8Block, in.v.data() + j * kInt8Block,
                                              in.block_offset.data() + j * 16);
  if (vnni)
    return emu_fast::kernels::avx512_vnni::int4_int8(q, scales, group, in, y, batch, k_dim, ldy, n_begin, n_end);
  emu_fast::kernels::avx512_bw::int4_int8(q, scales, group, in, y, batch, k_dim, ldy, n_begin, n_end);
}

}  // extern "C"
