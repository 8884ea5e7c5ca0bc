// The int16-input path of the quantized GEMVs (QuantizedInput::kInt16 in quantized_gemv.h),
// used by gemv_int8_rows / gemv_int4_rows; kept apart from their float32 path.
#pragma once
#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

#include "kernels/cpu/multiversion.h"
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

// How a block's inputs are laid out for the kernel that reads them.
//  kNatural: as in x (int8 weights everywhere; int4 on the portable loop).
//  kInt4Avx2: permuted for the AVX2 int4 kernel, with offsets (quantized_gemv_int16_cpu.cpp).
//  kInt4Avx512: the four runs of 16 in the order 0, 2, 1, 3 (avx512_int4_order below).
enum class Int16Order { kNatural, kInt4Avx2, kInt4Avx512 };

// x rounded to int16, per row of x, in blocks of kInt16Block (zeros past k_dim).
struct Int16Input {
  AlignedVector<int16_t> v;       // [batch, blocks * kInt16Block], each block in the Int16Order asked
  AlignedVector<float> step;      // [batch, blocks]: x ~= v * step, step a power of two
  AlignedVector<int32_t> offset;  // kInt4Avx2: [batch, blocks, 8], 8 * the inputs each int32 lane sums
};

// The AVX-512 int4 kernel widens the 32 bytes of a block's weights to 32 words and takes their
// low nibbles (bytes 0..15: values 0..15, bytes 16..31: values 32..47, quantized_gemv.h) against
// v[0..31] and their high nibbles (values 16..31, 48..63) against v[32..63]: so v holds the
// block's runs of 16 in the order 0, 2, 1, 3.
inline void avx512_int4_order(const int16_t* natural, int16_t* v) {
  constexpr int kRun[4] = {0, 2, 1, 3};
  for (int r = 0; r < 4; ++r)
    for (int i = 0; i < 16; ++i) v[16 * r + i] = natural[16 * kRun[r] + i];
}

// Fills `in` from float32 x [batch, ldx] (columns [0, k_dim)), in `order`. vector: may use
// AVX2 (each order also has a scalar path). Returns false, when an input is not finite (the float32 path then
// gives the NaN / inf a float32 product would).
bool round_inputs_to_int16(const float* x, int64_t batch, int64_t ldx, int64_t k_dim, Int16Order order, bool vector,
                           Int16Input* in);

// The order the int4 kernel of `isa` reads.
inline Int16Order int4_input_order(Isa isa) {
  return isa == Isa::kAvx512 ? Int16Order::kInt4Avx512 : isa == Isa::kAvx2 ? Int16Order::kInt4Avx2 : Int16Order::kNatural;
}

// The products of quantized_gemv.h with these inputs; int4 reads int4_input_order(isa).
void gemv_int8_rows_int16(Isa isa, const int8_t* q, const float* scales, const Int16Input& in, float* y,
                          int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end);
void gemv_int4_rows_int16(Isa isa, const uint8_t* q, const float* scales, int64_t group, const Int16Input& in,
                          float* y, int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end);

// The AVX-512 kernels (quantized_gemv_avx512_cpu.cpp; vpdpwssd where the processor has
// AVX512-VNNI), for processors with Isa::kAvx512 only.
void gemv_int8_rows_int16_avx512(const int8_t* q, const float* scales, const Int16Input& in, float* y, int64_t batch,
                                 int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end);
void gemv_int4_rows_int16_avx512(const uint8_t* q, const float* scales, int64_t group, const Int16Input& in, float* y,
                                 int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end);
bool cpu_has_avx512_vnni();

}  // namespace emu_fast::kernels
