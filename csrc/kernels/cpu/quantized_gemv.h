// Small-batch matrix-vector products with weight-only quantized weights, y = x W^T, W [N, K]
// dequantized in registers (never written out), float32 accumulation (int16 inputs: exact
// integer sums within a block, float32 across blocks; QuantizedInput below). The schemes are defined
// in emu_fast/quant/schemes.py (the Python oracle); the kernels, one table per instruction-set
// level, are organised in quantized_gemv_table.h. The layouts the kernels read:
//
// int8: q int8 [N, K] row-major, scales float32 [N]; W[n, k] = q[n, k] * scales[n].
//   y[b, n] = scales[n] * sum_k q[n, k] * x[b, k].
//
// int4: q uint8 [N, padded_k(K) / 2], scales float32 [N, ceil(K / group)]; group a multiple of
//   kInt4Block. K is cut into blocks of kInt4Block = 32 values (the last one zero-padded); the 32
//   values of block j are the 16 bytes q[n, 16 j .. 16 j + 15]: byte i holds value 32 j + i in
//   its low nibble and value 32 j + 16 + i in its high nibble, each stored as q + 8 (q in
//   [-8, 7]; the quantizer writes [-7, 7], padding writes 8 = value 0).
//   W[n, k] = (nibble - 8) * scales[n, k / group].
//   y[b, n] = sum_g scales[n, g] * sum_{k in group g} (nibble - 8) * x[b, k].
//   The low/high split by 16 lets one byte load widen to two runs of 16 consecutive values
//   (AVX-512: one vector each; AVX2: two), with no shuffle of the weights or of x.
#pragma once
#include <cstdint>
#include <optional>
#include <type_traits>

#include "kernels/cpu/scalar.h"

namespace emu_fast::kernels {

constexpr int64_t kInt4Block = 32;

inline int64_t int4_padded_k(int64_t k_dim) { return (k_dim + kInt4Block - 1) / kInt4Block * kInt4Block; }
inline int64_t int4_row_bytes(int64_t k_dim) { return int4_padded_k(k_dim) / 2; }
// ceil(k_dim / group), without forming k_dim + group - 1: a group near 2^63 (a multiple of 32,
// so accepted) is one group a row, not an overflow to 0 groups.
inline int64_t int4_groups(int64_t k_dim, int64_t group) { return k_dim <= 0 ? 0 : (k_dim - 1) / group + 1; }

// What the kernels may be given for `group`: itself when shorter than the row; a group at least
// as long as the row (any size up to int64's top) is one group a row, and becomes the padded row
// rounded up to 128 plus group % 128. That fits in int wherever k_dim does (the CUDA launchers
// take int), and keeps group % 64 and group % 128, on which the paths depend (integer inputs,
// the tensor-core kernel), so every path computes as it would with `group` itself.
inline int64_t int4_kernel_group(int64_t k_dim, int64_t group) {
  if (group < k_dim) return group;
  return (int4_padded_k(k_dim) + 127) / 128 * 128 + group % 128;
}

// How the products take their inputs x.
//  kFloat32: as given; each weight is widened to float32 and multiply-added in float32.
//  kInt16: each block of kInt16Block inputs of a row is first rounded (half to even) to an
//    int16 multiple of one power of two, its step, the smallest with the block's largest |x|
//    below 2^15 steps. The weights' products with those integers, and their sums over the
//    block, are exact integers; each block's sum is then scaled by its step and the weight
//    scale in float32. An input moves by at most step / 2 <= 2^-15 of its block's largest |x|,
//    1/128 of bfloat16's own rounding there (inputs at least 2^-7 of that largest are exact
//    in bfloat16): the path for bfloat16 / float16 activations, where it is several times
//    faster on AVX2 (the portable loop computes the same). For int4 it needs
//    group % kInt16Block == 0; other groups, and calls with a non-finite input, take kFloat32.
//  kInt8 (opt-in: emu_fast.set_quantized_activations("int8")): each block of kInt8Block inputs
//    of a row, m its largest |x| = mantissa * 2^e (mantissa in [0.5, 1)), becomes
//    v = round_half_even(float32(x * 2^-e) * float32(127 / mantissa)) in [-127, 127], with
//    step = float32(mantissa / 127) * 2^e, so x ~= v * step, off by at most about m / 254 (the
//    int8 activations of llama.cpp's CPU dot products). Integer sums are exact as above. AVX2
//    multiplies int4 weights with these in bytes (vpmaddubsw, 32 products an instruction); int8
//    weights gain nothing (their products take the int16 loop). int4 groups must be a multiple
//    of 64 (else, and for non-finite inputs, kFloat32).
enum class QuantizedInput { kFloat32, kInt16, kInt8 };
constexpr int64_t kInt16Block = 64;
constexpr int64_t kInt8Block = 128;

// The int4 groups the integer inputs (kInt16, kInt8) serve: whole sub-blocks of 64 inputs a
// group. Other groups take kFloat32 (the kernels, and the ATen step that mirrors them).
inline bool int4_group_takes_integer_inputs(int64_t group) { return group % kInt16Block == 0; }

// The choice for activations of type T (the fused step's and the ops'): float32 as they are,
// the 16-bit types as int16 blocks.
template <typename T>
constexpr QuantizedInput quantized_input_for() {
  return std::is_same_v<T, float> ? QuantizedInput::kFloat32 : QuantizedInput::kInt16;
}

// For n in [n_begin, n_end), b < batch: y[b * ldy + n] = the int8 product above.
// x float32 [batch, k_dim], contiguous (the caller widens bf16 activations once). `input` is
// taken as given (see resolve_quantized_input below).
void gemv_int8_rows(const int8_t* q, const float* scales, const float* x, float* y, int64_t batch,
                    int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end,
                    QuantizedInput input = QuantizedInput::kFloat32);

// The int4 product above. x float32 [batch, int4_padded_k(k_dim)] with zeros past k_dim.
void gemv_int4_rows(const uint8_t* q, const float* scales, int64_t group, const float* x, float* y,
                    int64_t batch, int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end,
                    QuantizedInput input = QuantizedInput::kFloat32);

// The weights written out as T (float32 or bf16), rows [n0, n1) of W into out (row n at
// out + (n - n0) * k_dim): what prefill multiplies by, a chunk of rows at a time, so the rows
// are fresh in cache when the GEMM reads them. Each value is float32(q) * scale (int4:
// float32(nibble - 8) * its group's scale) rounded to T once: bitwise the ATen composition
// (ops/quantized_gemv.cpp, dequantize_weight). bf16_values (T = float): each value rounded to
// bfloat16 and stored as float32 (a bfloat16 model's weight, for a float32 GEMM).
template <typename T>
void dequantize_int8_rows(const int8_t* q, const float* scales, int64_t k_dim, int64_t n0, int64_t n1, T* out,
                          bool bf16_values = false);
template <typename T>
void dequantize_int4_rows(const uint8_t* q, const float* scales, int64_t group, int64_t k_dim, int64_t n0,
                          int64_t n1, T* out, bool bf16_values = false);

// Every product takes `input` whatever its caller asked (emu_fast.set_quantized_activations; the
// tests check the int16 path on float32 inputs against an exact oracle this way); std::nullopt
// returns the choice to callers. Process-wide, like torch.set_float32_matmul_precision.
void set_quantized_input_override(std::optional<QuantizedInput> input);
std::optional<QuantizedInput> quantized_input_override();

// How many times set_quantized_input_override has been called (bumped after each store, even one
// that sets the value already there): a caller reading it before and after some work knows
// whether the setting may have changed meanwhile, even if it was flipped and flipped back (the
// self-check does not judge a step during which it changed).
uint64_t quantized_input_generation();

// What a product asking for `asked` runs with: the override when one is set. Callers resolve it
// once per product (or per fused step), before splitting rows across threads, and pass the
// result to every gemv_*_rows call of it: all its rows then take the same inputs even when the
// setting changes meanwhile from another thread.
inline QuantizedInput resolve_quantized_input(QuantizedInput asked) {
  return quantized_input_override().value_or(asked);
}

}  // namespace emu_fast::kernels
