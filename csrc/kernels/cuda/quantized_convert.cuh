// Weight-only int8 / int4 values from their stored bits to what the GEMVs multiply with, for
// the CUDA-core kernel (quantized_gemv.cuh: float32) and the tensor-core kernel
// (quantized_mma_gemv.cuh: exact bf16 pairs), by bit tricks instead of I2F (the conversion
// unit runs at 1/8 of the FMA rate on sm_80 / sm_90). Layouts: emu_fast/quant/schemes.py. No torch
// includes.
#pragma once
#include "common.cuh"

namespace emu_fast::cuda {

// Small integers to float32: 0x4B000000 | u is the float 2^23 + u for u < 2^23, so one LOP3
// builds it from the bits and one FADD takes 2^23 (plus the scheme's offset) off, exactly.
//   nibble_value(t, s): the nibble at bit s of t, stored as q + 8, as the float q.
//   int8_value(t, s): the int8 at bit s of t (s a multiple of 8) as a float: its bits XOR 0x80
//   are the value + 128.
__device__ __forceinline__ float nibble_value(uint32_t t, int s) {
  return __uint_as_float(0x4B000000u | ((t >> s) & 0xFu)) - 8388616.0f;  // 2^23 + 8
}
__device__ __forceinline__ float int8_value(uint32_t t, int s) {
  return __uint_as_float(0x4B000000u | (((t >> s) & 0xFFu) ^ 0x80u)) - 8388736.0f;  // 2^23 + 128
}

// Bytes of a and b (a: 0-3, b: 4-7) picked by the selector's nibbles, as CUDA's __byte_perm.
__device__ __forceinline__ uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t selector) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, selector);
#else
  const uint64_t both = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t out = 0;
  for (int i = 0; i < 4; ++i) out |= static_cast<uint32_t>((both >> (8 * ((selector >> (4 * i)) & 7))) & 0xFFu) << (8 * i);
  return out;
#endif
}

// The nibbles at bits s and s + 16 of word (stored as q + 8) as a bf16 pair (low half first)
// holding q exactly: 0x4300 | u is the bf16 128 + u; one bf16x2 FMA (times 1, minus 136) leaves
// u - 8, exact in bf16.
__device__ __forceinline__ uint32_t nibble_pair_bf16(uint32_t word, int s) {
  const uint32_t biased = ((word >> s) & 0x000F000Fu) | 0x43004300u;
#if defined(__CUDA_ARCH__)
  uint32_t out;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(out) : "r"(biased), "r"(0x3F803F80u), "r"(0xC308C308u));
  return out;
#else
  auto half = [](uint32_t bits) {  // 128 + u - 136, exact; the bf16 is the float's upper half
    return __float_as_uint(__uint_as_float(bits << 16) - 136.f) >> 16;
  };
  return half(biased & 0xFFFFu) | (half(biased >> 16) << 16);
#endif
}

// Two floats that bf16 holds exactly (small integers: their low 16 bits are zero) as a bf16
// pair, lo in the low half: their upper halves side by side, one PRMT.
__device__ __forceinline__ uint32_t exact_pair_bf16(float lo, float hi) {
  return byte_perm(__float_as_uint(lo), __float_as_uint(hi), 0x7632);
}

// The int8 values at bits s and s + 8 of word as a bf16 pair (low half: the one at bit s).
__device__ __forceinline__ uint32_t int8_pair_bf16(uint32_t word, int s) {
  return exact_pair_bf16(int8_value(word, s), int8_value(word, s + 8));
}

}  // namespace emu_fast::cuda
