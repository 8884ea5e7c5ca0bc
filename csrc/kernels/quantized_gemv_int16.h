// The int16-input path of the quantized GEMVs (QuantizedInput::kInt16 in quantized_gemv.h),
// used by gemv_int8_rows / gemv_int4_rows; kept apart from their float32 path.
#pragma once
#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

#include "kernels/multiversion.h"
#include "kernels/quantized_gemv.h"

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

// x rounded to int16, per row of x, in blocks of kInt16Block (zeros past k_dim).
struct Int16Input {
  AlignedVector<int16_t> v;       // [batch, blocks * kInt16Block]; int4_order: each block permuted
  AlignedVector<float> step;      // [batch, blocks]: x ~= v * step, step a power of two
  AlignedVector<int32_t> offset;  // int4_order: [batch, blocks, 8], 8 * the inputs each int32 lane sums
};

// Fills `in` from float32 x [batch, ldx] (columns [0, k_dim)). int4_order: in the AVX2 int4
// kernel's order, with offsets. vector: may use AVX2. Returns false, when an input is not
// finite (the float32 path then gives the NaN / inf a float32 product would).
bool round_inputs_to_int16(const float* x, int64_t batch, int64_t ldx, int64_t k_dim, bool int4_order, bool vector,
                           Int16Input* in);

// The products of quantized_gemv.h with these inputs: isa kPortable reads natural order,
// kAvx2 / kAvx512 (the AVX2 loop) the int4 order for int4.
void gemv_int8_rows_int16(Isa isa, const int8_t* q, const float* scales, const Int16Input& in, float* y,
                          int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end);
void gemv_int4_rows_int16(Isa isa, const uint8_t* q, const float* scales, int64_t group, const Int16Input& in,
                          float* y, int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end);

}  // namespace emu_fast::kernels
