// The int8-input path of the quantized GEMVs (QuantizedInput::kInt8 in quantized_gemv.h): an
// opt-in rounding of the activations, coarser than bfloat16's, that lets AVX2 multiply int4
// weights with vpmaddubsw, 32 products an instruction. Kept apart from the int16 path.
#pragma once
#include <cstdint>

#include "kernels/multiversion.h"
#include "kernels/quantized_gemv.h"
#include "kernels/quantized_gemv_int16.h"

namespace emu_fast::kernels {

// x rounded to int8, per row of x, in blocks of kInt8Block (zeros past k_dim).
// int4_order: each half block of 64 permuted for the AVX2 int4 kernel, with offsets (8 * the
// inputs each int32 lane of its sums takes) per half and per block.
struct Int8Input {
  AlignedVector<int8_t> v;              // [batch, blocks * kInt8Block]
  AlignedVector<float> step;            // [batch, blocks]: x ~= v * step
  AlignedVector<int32_t> offset;        // int4_order: [batch, 2 * blocks, 8]
  AlignedVector<int32_t> block_offset;  // int4_order: [batch, blocks, 8], the two halves' summed
};

// Fills `in` from float32 x [batch, ldx] (columns [0, k_dim)), rounded as quantized_gemv.h says.
// int4_order: in the AVX2 int4 kernel's order, with offsets (needs vector: false without it).
// vector: may use AVX2. Returns false when an input is not finite (the float32 path then gives
// the NaN / inf).
bool round_inputs_to_int8(const float* x, int64_t batch, int64_t ldx, int64_t k_dim, bool int4_order, bool vector,
                          Int8Input* in);

// The same integers and steps as int16 inputs (natural order), for the int16 kernels: the int8
// weights' products and the portable int4 loop (their integer sums are the same exact sums).
// x had batch rows of k_dim inputs (the int16 blocks of 64 each take their block's step).
void widen_int8_input(const Int8Input& in8, int64_t batch, int64_t k_dim, Int16Input* in16);

// The int4 product of quantized_gemv.h with int4-ordered inputs (AVX2; AVX-512 machines run it too).
void gemv_int4_rows_int8_avx2(const uint8_t* q, const float* scales, int64_t group, const Int8Input& in, float* y,
                              int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end);

}  // namespace emu_fast::kernels
