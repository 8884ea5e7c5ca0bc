// The inputs x of the quantized GEMVs rounded to integer blocks (QuantizedInput::kInt16 and kInt8,
// quantized_gemv.h), in the orders the kernels read them: every rounding and every order, once.
#pragma once
#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

#include "kernels/cpu/quantized_gemv.h"

namespace emu_fast::kernels {

// Cache-line aligned storage: the kernels load 32 bytes of x and of the offsets per block, which
// with std::vector's 16-byte alignment would straddle two cache lines every other time.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  friend bool operator==(const CacheLineAllocator&, const CacheLineAllocator&) { return true; }
  friend bool operator!=(const CacheLineAllocator&, const CacheLineAllocator&) { return false; }
};
template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

// What a kernel reads (its entry in the table of quantized_gemv_table.h says which):
//  kFloat32: x itself.
//  kInt16: int16 blocks in x's order (int8 weights everywhere; int4 on the portable loop). Inputs
//    rounded to int8 are widened to these where a kernel reads them (the same exact sums).
//  kInt16Int4Avx2: int16 blocks permuted for the AVX2 int4 kernel, with offsets.
//  kInt16Int4Avx512: int16 blocks with their runs of 16 in the order 0, 2, 1, 3.
//  kInt8Int4Avx2: int8 blocks, each half block of 64 permuted for the AVX2 int4 kernel, with
//    offsets per half and per block; made with AVX2.
//  kInt8Int4Avx512: int8 blocks permuted for the AVX-512 int4 kernel, with offsets; for groups
//    that hold whole blocks (group % kInt8Block == 0).
enum class InputLayout { kFloat32, kInt16, kInt16Int4Avx2, kInt16Int4Avx512, kInt8Int4Avx2, kInt8Int4Avx512 };

// x rounded to int16, per row of x, in blocks of kInt16Block (zeros past k_dim).
struct Int16Input {
  AlignedVector<int16_t> v;       // [batch, blocks * kInt16Block], each block in its layout's order
  AlignedVector<float> step;      // [batch, blocks]: x ~= v * step, step a power of two
  AlignedVector<int32_t> offset;  // kInt16Int4Avx2: [batch, blocks, 8], 8 * the inputs each int32 lane sums
};

// x rounded to int8, per row of x, in blocks of kInt8Block (zeros past k_dim). The offsets are
// 8 * the inputs each int32 lane of the kernel's sums takes (the stored nibbles are q + 8).
struct Int8Input {
  AlignedVector<int8_t> v;              // [batch, blocks * kInt8Block]
  AlignedVector<float> step;            // [batch, blocks]: x ~= v * step
  AlignedVector<int32_t> offset;        // kInt8Int4Avx2: [batch, 2 * blocks, 8]
  AlignedVector<int32_t> block_offset;  // kInt8Int4Avx2: [batch, blocks, 8], the halves' summed;
                                        // kInt8Int4Avx512: [batch, blocks, 16]
};

// Fill `in` from float32 x [batch, ldx] (columns [0, k_dim)), rounded as quantized_gemv.h says, in
// `layout` (one of the int16 layouts, or kInt16 read from int8 blocks: widen_int8_input; one of
// the int8 layouts for round_inputs_to_int8). vector: may use AVX2 (kInt8Int4Avx2 needs it:
// false without). Return false when an input is not finite (the float32 path then gives the NaN
// / inf a float32 product would).
bool round_inputs_to_int16(const float* x, int64_t batch, int64_t ldx, int64_t k_dim, InputLayout layout,
                           bool vector, Int16Input* in);
bool round_inputs_to_int8(const float* x, int64_t batch, int64_t ldx, int64_t k_dim, InputLayout layout,
                          bool vector, Int8Input* in);

// The same integers and steps as int16 inputs (kInt16), for the int16 kernels: the int8 weights'
// products and the portable int4 loop (their integer sums are the same exact sums). x had batch
// rows of k_dim inputs (the int16 blocks of 64 each take their int8 block's step).
void widen_int8_input(const Int8Input& in8, int64_t batch, int64_t k_dim, Int16Input* in16);

}  // namespace emu_fast::kernels
