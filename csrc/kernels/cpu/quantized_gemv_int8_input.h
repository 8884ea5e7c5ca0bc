// The int8-input path of the quantized GEMVs (QuantizedInput::kInt8 in quantized_gemv.h): an
// opt-in rounding of the activations, coarser than bfloat16's, that lets AVX2 multiply int4
// weights with vpmaddubsw, 32 products an instruction. Kept apart from the int16 path.
#pragma once
#include <cstdint>

#include "kernels/cpu/multiversion.h"
#include "kernels/cpu/quantized_gemv.h"
#include "kernels/cpu/quantized_gemv_int16.h"

namespace emu_fast::kernels {

// How a block's inputs are laid out for the int4 kernel that reads them.
//  kNatural: as in x (int8 weights and the portable int4 loop, through widen_int8_input).
//  kInt4Avx2: each half block of 64 permuted for the AVX2 kernel, with offsets per half and per
//    block (quantized_gemv_int8_input_cpu.cpp); made with AVX2.
//  kInt4Avx512: the whole block permuted for the AVX-512 kernel (avx512_int4_int8_order below),
//    with its offsets; for groups that hold whole blocks (group % kInt8Block == 0).
enum class Int8Order { kNatural, kInt4Avx2, kInt4Avx512 };

// x rounded to int8, per row of x, in blocks of kInt8Block (zeros past k_dim). The offsets are
// 8 * the inputs each int32 lane of the kernel's sums takes (the stored nibbles are q + 8).
struct Int8Input {
  AlignedVector<int8_t> v;              // [batch, blocks * kInt8Block]
  AlignedVector<float> step;            // [batch, blocks]: x ~= v * step
  AlignedVector<int32_t> offset;        // kInt4Avx2: [batch, 2 * blocks, 8]
  AlignedVector<int32_t> block_offset;  // kInt4Avx2: [batch, blocks, 8], the halves' summed;
                                        // kInt4Avx512: [batch, blocks, 16]
};

// The AVX-512 int4 kernel loads 64 bytes of a row's weights (128 values: byte i holds value
// 32 (i / 16) + i % 16 in its low nibble and that + 16 in its high one, quantized_gemv.h) and
// multiplies the low nibbles with v[0..63], the high ones with v[64..127]; int32 lane l of its
// sums takes bytes 4l..4l+3 of both.
inline void avx512_int4_int8_order(const int8_t* natural, int8_t* v, int32_t* offset) {
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

// Fills `in` from float32 x [batch, ldx] (columns [0, k_dim)), rounded as quantized_gemv.h says,
// in `order`. vector: may use AVX2 (kInt4Avx2 needs it: false without). Returns false when an
// input is not finite (the float32 path then gives the NaN / inf).
bool round_inputs_to_int8(const float* x, int64_t batch, int64_t ldx, int64_t k_dim, Int8Order order, bool vector,
                          Int8Input* in);

// The order the int4 kernel of `isa` reads for this group size.
inline Int8Order int4_int8_input_order(Isa isa, int64_t group) {
  if (isa == Isa::kAvx512 && group % kInt8Block == 0) return Int8Order::kInt4Avx512;
  return isa == Isa::kPortable ? Int8Order::kNatural : Int8Order::kInt4Avx2;
}

// The same integers and steps as int16 inputs (natural order), for the int16 kernels: the int8
// weights' products and the portable int4 loop (their integer sums are the same exact sums).
// x had batch rows of k_dim inputs (the int16 blocks of 64 each take their block's step).
void widen_int8_input(const Int8Input& in8, int64_t batch, int64_t k_dim, Int16Input* in16);

// The int4 product of quantized_gemv.h with kInt4Avx2-ordered inputs (AVX2; AVX-512 machines
// too, for groups that are not whole blocks).
void gemv_int4_rows_int8_avx2(const uint8_t* q, const float* scales, int64_t group, const Int8Input& in, float* y,
                              int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end);

// The same with kInt4Avx512-ordered inputs (quantized_gemv_avx512_cpu.cpp: vpdpbusd where the
// processor has AVX512-VNNI), for Isa::kAvx512 processors and group % kInt8Block == 0.
void gemv_int4_rows_int8_avx512(const uint8_t* q, const float* scales, int64_t group, const Int8Input& in, float* y,
                                int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end);

}  // namespace emu_fast::kernels
