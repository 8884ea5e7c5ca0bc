// The weight-only quantized GEMVs: emu_fast::gemv_int8 and gemv_int4 (the schemes:
// emu_fast/quant; the layouts: kernels/cpu/quantized_gemv.h). Their schemas, argument checks, CPU
// implementations and ATen twins (which compute as the kernels do), and the dequantized weight
// prefill multiplies by; CUDA: quantized_gemv.cu.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "kernels/cpu/quantized_gemv.h"
#include "ops/checks.h"
#include "ops/cpu_glue.h"
#include "ops/op_set.h"
#include "ops/registration.h"

namespace emu_fast {

namespace {

// The schemas, defined for emu_fast:: (our kernels) and emu_fast_aten:: (their ATen twins).
constexpr const char* kSchemas[] = {
    // Weight-only quantized GEMVs (emu_fast/quant/schemes.py defines the schemes; layouts in
    // kernels/cpu/quantized_gemv.h): x [B,K] float32/bfloat16 -> [B,N] in x's dtype, the weight
    // dequantized in registers, float32 accumulation, for small B.
    // gemv_int8: qweight int8 [N,K], scales float32 [N]: x @ (qweight * scales[:, None])^T.
    "gemv_int8(Tensor x, Tensor qweight, Tensor scales) -> Tensor",
    // gemv_int4: qweight uint8 [N, ceil(K/32)*16] (two values a byte), scales float32
    // [N, ceil(K/group_size)], group_size a multiple of 32.
    "gemv_int4(Tensor x, Tensor qweight, Tensor scales, int group_size) -> Tensor",
};

// x [B, K], qweight (dtype q_dtype, 2-D, contiguous), scales float32 (scale_dim-D, contiguous):
// what both quantized GEMV ops take.
void check_quantized_operands(const char* op, const at::Tensor& x, const at::Tensor& qweight, at::ScalarType q_dtype,
                              const at::Tensor& scales, int64_t scale_dim, bool allow_half) {
  check_dim(op, "x", x, 2);
  check_dim(op, "qweight", qweight, 2);
  check_dim(op, "scales", scales, scale_dim);
  check_float_dtype(op, "x", x, allow_half);
  TORCH_CHECK_TYPE(qweight.scalar_type() == q_dtype, "emu_fast.", op, ": qweight must be ", py_dtype(q_dtype),
                   ", got ", py_dtype(qweight.scalar_type()));
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat, "emu_fast.", op, ": scales must be torch.float32, got ",
                   py_dtype(scales.scalar_type()));
  check_same_device(op, x, "qweight", qweight);
  check_same_device(op, x, "scales", scales);
  TORCH_CHECK_VALUE(scales.size(0) == qweight.size(0), "emu_fast.", op, ": scales ", scales.sizes(),
                    " must have one row per output row of qweight ", qweight.sizes());
  check_contiguous(op, "qweight", qweight);
  check_contiguous(op, "scales", scales);
}

}  // namespace

void check_gemv_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, bool allow_half) {
  const char* op = "gemv_int8";
  check_quantized_operands(op, x, qweight, at::kChar, scales, 1, allow_half);
  TORCH_CHECK_VALUE(qweight.size(1) == x.size(1), "emu_fast.", op, ": x ", x.sizes(), " does not match qweight ",
                    qweight.sizes(), " (inner sizes differ)");
}

void check_gemv_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t group_size,
                     bool allow_half) {
  const char* op = "gemv_int4";
  TORCH_CHECK_VALUE(group_size > 0 && group_size % kernels::kInt4Block == 0, "emu_fast.", op, ": group_size must be",
                    " a positive multiple of ", kernels::kInt4Block, ", got ", group_size);
  check_quantized_operands(op, x, qweight, at::kByte, scales, 2, allow_half);
  const int64_t K = x.size(1);
  TORCH_CHECK_VALUE(qweight.size(1) == kernels::int4_row_bytes(K), "emu_fast.", op, ": qweight ", qweight.sizes(),
                    " does not hold x's ", K, " inputs per row (two a byte, padded to a multiple of ",
                    kernels::kInt4Block, ": ", kernels::int4_row_bytes(K), " bytes)");
  TORCH_CHECK_VALUE(scales.size(1) == kernels::int4_groups(K, group_size), "emu_fast.", op, ": scales ",
                    scales.sizes(), " must have ", kernels::int4_groups(K, group_size), " groups per row (", K,
                    " inputs, group_size ", group_size, ")");
}

namespace {

using namespace cpu_glue;

// ---- CPU ----

at::Tensor gemv_int8_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  check_gemv_int8(x, qweight, scales, false);
  const int64_t B = x.size(0), K = x.size(1), N = qweight.size(0);
  at::Tensor out = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return out;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const std::vector<float> xf = widen_rows<T>(x);
    const auto input = kernels::resolve_quantized_input(kernels::quantized_input_for<T>());  // once: every row alike
    into_output(ptr<T>(out), B, N, [&](float* y) {
      at::parallel_for(0, N, grain_rows(K * B), [&](int64_t n0, int64_t n1) {
        kernels::gemv_int8_rows(ptr<int8_t>(qweight), ptr<float>(scales), xf.data(), y, B, K, N, n0, n1, input);
      });
    });
  });
  return out;
}

at::Tensor gemv_int4_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         int64_t group_size) {
  check_gemv_int4(x, qweight, scales, group_size, false);
  const int64_t B = x.size(0), K = x.size(1), N = qweight.size(0);
  at::Tensor out = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return out;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const std::vector<float> xf = widen_rows_padded<T>(x, kernels::int4_padded_k(K));
    const auto input = kernels::resolve_quantized_input(kernels::quantized_input_for<T>());  // once: every row alike
    into_output(ptr<T>(out), B, N, [&](float* y) {
      at::parallel_for(0, N, grain_rows(K * B), [&](int64_t n0, int64_t n1) {
        kernels::gemv_int4_rows(ptr<uint8_t>(qweight), ptr<float>(scales), group_size, xf.data(), y, B, K, N, n0,
                                n1, input);
      });
    });
  });
  return out;
}

// ---- ATen twins: the same op in plain ATen (any device; the portable step) ----

// x rounded as the CPU quantized GEMVs take it under set_quantized_activations("int8")
// (kernels/cpu/quantized_gemv.h, QuantizedInput::kInt8; emu_fast.quant.schemes.round_inputs_to_int8),
// in float32: blocks of kInt8Block inputs of the last dimension, each v * step.
at::Tensor round_inputs_to_int8(const at::Tensor& x) {
  const int64_t k = x.size(-1), block = kernels::kInt8Block;
  const at::Tensor padded = at::constant_pad_nd(x.to(at::kFloat), {0, (block - k % block) % block}).unflatten(-1, {-1, block});
  auto [mantissa, e] = at::frexp(padded.abs().amax(-1, /*keepdim=*/true));  // max = mantissa * 2^e
  const at::Tensor zero = mantissa == 0;
  mantissa = at::where(zero, at::ones_like(mantissa), mantissa);
  const at::Tensor ed = e.to(at::kDouble);
  const at::Tensor down = (padded.to(at::kDouble) * at::exp2(-ed)).to(at::kFloat);  // exact, then rounded once
  const at::Tensor v = at::round(down * (127.0f / mantissa)).clamp(-127, 127);
  const at::Tensor step = ((mantissa / 127.0f).to(at::kDouble) * at::exp2(ed)).to(at::kFloat);
  return at::where(zero, at::zeros_like(v), v * step).flatten(-2).narrow(-1, 0, k);
}

// x rounded as the CPU quantized GEMVs take 16-bit activations (QuantizedInput::kInt16;
// emu_fast.quant.schemes.round_inputs_to_int16), in float32: blocks of kInt16Block inputs of the last
// dimension, each rounded half to even to int16 multiples of 2^(e - 15), max|x| < 2^e, clamped
// to 32767 steps (computed in float64, where the steps of tiny blocks do not underflow).
at::Tensor round_inputs_to_int16(const at::Tensor& x) {
  const int64_t k = x.size(-1), block = kernels::kInt16Block;
  const at::Tensor padded =
      at::constant_pad_nd(x.to(at::kDouble), {0, (block - k % block) % block}).unflatten(-1, {-1, block});
  const at::Tensor e = std::get<1>(at::frexp(padded.abs().amax(-1, /*keepdim=*/true)));
  const at::Tensor step = at::exp2((e - 15).to(at::kDouble));
  return (at::round(padded / step).clamp_max(32767) * step).flatten(-2).narrow(-1, 0, k).to(at::kFloat);
}

// The int4 values (nibble - 8) of qweight as float32 [N, in_features]: block j of a row is bytes
// 16 j .. 16 j + 15, low nibbles values 32 j .. 32 j + 15, high nibbles 32 j + 16 .. 32 j + 31,
// each stored + 8 (emu_fast/quant/schemes.py pack_int4).
at::Tensor int4_values(const at::Tensor& qweight, int64_t in_features) {
  const int64_t N = qweight.size(0), blocks = qweight.size(1) / 16;
  const at::Tensor b = qweight.view({N, blocks, 1, 16});
  const at::Tensor u = at::cat({at::bitwise_and(b, 15), at::bitwise_right_shift(b, 4)}, 2)
                           .reshape({N, blocks * 32})
                           .narrow(1, 0, in_features);
  return u.to(at::kFloat) - 8.0;
}

// x [B, K] float32 times the quantized weight as the kernels compute it: float32 products of x
// with the integer weights, each row's (int8) or each group's (int4) sum scaled after it, the
// groups' scaled sums added. (Not a weight dequantized first: a bfloat16 one would round every
// weight, and subnormal scales every product, where the kernels round once.)
at::Tensor quantized_product(const at::Tensor& xf, const at::Tensor& qweight, const at::Tensor& scales, int64_t bits,
                             int64_t group_size) {
  if (bits == 8) return at::linear(xf, qweight.to(at::kFloat)) * scales;
  const int64_t B = xf.size(0), K = xf.size(1), N = qweight.size(0), G = scales.size(1);
  const int64_t span = G <= 1 ? K : group_size;  // one group a row: the row, whatever group_size is
  const int64_t pad = G * span - K;
  const at::Tensor w = at::constant_pad_nd(int4_values(qweight, K), {0, pad}).view({N, G, span});
  const at::Tensor xg = at::constant_pad_nd(xf, {0, pad}).view({B, G, span});
  const at::Tensor partial = at::matmul(xg.transpose(0, 1), w.permute({1, 2, 0}));  // [G, B, N]
  return (partial * scales.t().unsqueeze(1)).sum(0);
}

// As the kernels compute (quantized_product above), rounded to x's dtype once. On the CPU x is
// first rounded as the kernels take it there: int16 blocks for 16-bit activations, int8 blocks
// under set_quantized_activations("int8"), as it is for float32 (or as the setting forces);
// int4 groups that are not a multiple of 64 and calls with a non-finite input keep x as it is,
// as the kernels do (a host sync, on the CPU only: no graph there). So the self-check holds our
// kernels to their own arithmetic, up to float32 summation order.
at::Tensor quantized_gemv_aten(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t bits,
                               int64_t group_size) {
  at::Tensor xf = x.to(at::kFloat);
  if (x.is_cpu()) {
    using kernels::QuantizedInput;
    const QuantizedInput input =
        kernels::resolve_quantized_input(x.scalar_type() == at::kFloat ? QuantizedInput::kFloat32 : QuantizedInput::kInt16);
    if (input != QuantizedInput::kFloat32 && (bits == 8 || kernels::int4_group_takes_integer_inputs(group_size)) &&
        at::isfinite(x).all().item<bool>())
      xf = input == QuantizedInput::kInt8 ? round_inputs_to_int8(x) : round_inputs_to_int16(x);
  }
  return quantized_product(xf, qweight, scales, bits, group_size).to(x.scalar_type());
}

at::Tensor gemv_int8_aten(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  return quantized_gemv_aten(x, qweight, scales, 8, 0);
}

at::Tensor gemv_int4_aten(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t group_size) {
  return quantized_gemv_aten(x, qweight, scales, 4, group_size);
}

}  // namespace

EMU_FAST_DEFINE_OP_AND_TWIN(kSchemas)

TORCH_LIBRARY_IMPL(emu_fast, CPU, m) {
  m.impl("gemv_int8", &gemv_int8_cpu);
  m.impl("gemv_int4", &gemv_int4_cpu);
}

TORCH_LIBRARY_IMPL(emu_fast_aten, CompositeExplicitAutograd, m) {
  m.impl("gemv_int8", &gemv_int8_aten);
  m.impl("gemv_int4", &gemv_int4_aten);
}

at::Tensor dequantize_weight(const at::Tensor& qweight, const at::Tensor& scales, int64_t bits, int64_t group_size,
                             int64_t in_features, at::ScalarType dtype) {
  if (bits == 8) return (qweight.to(at::kFloat) * scales.unsqueeze(1)).to(dtype);
  // A group at least as long as the row is the row's one group: repeated in_features times, not
  // group_size times (which may be near 2^63).
  const at::Tensor per_input = scales.repeat_interleave(std::min(group_size, in_features), 1).narrow(1, 0, in_features);
  return (int4_values(qweight, in_features) * per_input).to(dtype);
}

void dequantize_weight_rows(const at::Tensor& qweight, const at::Tensor& scales, int64_t bits, int64_t group_size,
                            int64_t first, const at::Tensor& out, std::optional<at::ScalarType> values) {
  const int64_t rows = out.size(0), K = out.size(1);
  const at::ScalarType dtype = out.scalar_type(), rounded = values.value_or(dtype);
  const bool bf16_values = dtype == at::kFloat && rounded == at::kBFloat16;
  if (out.is_cpu() && out.is_contiguous() && (dtype == at::kFloat || dtype == at::kBFloat16) &&
      (rounded == dtype || bf16_values)) {
    using namespace cpu_glue;
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      at::parallel_for(first, first + rows, grain_rows(K), [&](int64_t n0, int64_t n1) {
        T* o = ptr<T>(out) + (n0 - first) * K;
        if (bits == 8)
          kernels::dequantize_int8_rows(ptr<int8_t>(qweight), ptr<float>(scales), K, n0, n1, o, bf16_values);
        else
          kernels::dequantize_int4_rows(ptr<uint8_t>(qweight), ptr<float>(scales), group_size, K, n0, n1, o,
                                        bf16_values);
      });
    });
    return;
  }
  out.copy_(dequantize_weight(qweight.narrow(0, first, rows), scales.narrow(0, first, rows), bits, group_size, K,
                              rounded));
}

}  // namespace emu_fast
