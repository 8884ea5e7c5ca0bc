// The plain-ATen StepKernels: the portable step. Runs on any device torch runs on, with the
// emu_fast ops' semantics (emu_fast/reference.py) and the same KV-cache layout, so a decoder can
// switch to it mid-sequence. No host syncs and no data-dependent shapes (attention runs over the
// whole cache capacity under a length mask), so a CUDA graph captures it like the custom step.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/quantized_gemv.h"
#include "step_kernels.h"

namespace emu_fast {
namespace {

// Rotate-half RoPE in float32: x [..., D] with cos/sin broadcastable to [..., D/2].
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor x1 = xf.narrow(-1, 0, half), x2 = xf.narrow(-1, half, half);
  return at::cat({x1 * cos - x2 * sin, x2 * cos + x1 * sin}, -1);
}

// x rounded as the CPU quantized GEMVs take it under set_quantized_activations("int8")
// (kernels/quantized_gemv.h, QuantizedInput::kInt8; emu_fast.quantize.round_inputs_to_int8),
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
// emu_fast.quantize.round_inputs_to_int16), in float32: blocks of kInt16Block inputs of the last
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
// each stored + 8 (emu_fast/quantize.py pack_int4).
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

class AtenKernels final : public StepKernels {
 public:
  const char* name() const override { return "aten"; }

  // float32 accumulation, one rounding (as cuBLAS/oneDNN do for bf16 and as the reference does).
  Tensor gemv(const Tensor& x, const Tensor& weight) const override { return at::linear(x, weight); }

  // As the kernels compute (quantized_product above), rounded to x's dtype once. On the CPU x is
  // first rounded as the kernels take it there: int16 blocks for 16-bit activations, int8 blocks
  // under set_quantized_activations("int8"), as it is for float32 (or as the setting forces);
  // int4 groups that are not a multiple of 64 and calls with a non-finite input keep x as it is,
  // as the kernels do (a host sync, on the CPU only: no graph there). So the self-check holds our
  // kernels to their own arithmetic, up to float32 summation order.
  Tensor gemv_quantized(const Tensor& x, const Tensor& qweight, const Tensor& scales, int64_t bits,
                        int64_t group_size) const override {
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

  Tensor norm_gemv(const Tensor& x, const Tensor& norm_weight, double eps, const Tensor& weight) const override {
    return gemv(rms_norm(x, norm_weight, eps), weight);
  }

  Tensor norm_gemv_silu(const Tensor& x, const Tensor& norm_weight, double eps,
                        const Tensor& gate_up_weight) const override {
    return silu_mul(norm_gemv(x, norm_weight, eps, gate_up_weight));
  }

  // The product rounded to the dtype, then the sum: as the kernels' epilogue rounds it.
  Tensor gemv_add(const Tensor& x, const Tensor& weight, const Tensor& residual) const override {
    return residual + gemv(x, weight);
  }

  // Hugging Face LlamaRMSNorm: normalize in float32, round to x's dtype, then scale.
  Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) const override {
    const at::Tensor xf = x.to(at::kFloat);
    const at::Tensor normed = xf * at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
    return weight * normed.to(x.scalar_type());
  }

  Pair add_rms_norm(const Tensor& x, const Tensor& residual, const Tensor& weight, double eps) const override {
    const at::Tensor sum = x + residual;  // rounded to the dtype before the norm, as the kernels do
    return {rms_norm(sum, weight, eps), sum};
  }

  Tensor silu_mul(const Tensor& gate_up) const override {
    const int64_t I = gate_up.size(-1) / 2;
    return at::silu(gate_up.narrow(-1, 0, I)) * gate_up.narrow(-1, I, I);
  }

  Tensor decode_attention(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& k_cache, Tensor& v_cache,
                          const Tensor& cache_lens, const Tensor& positions, const Tensor& rope_cos,
                          const Tensor& rope_sin, double scale,
                          const c10::optional<Tensor>& /*split_counters: no splits here*/) const override {
    const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1), S = k_cache.size(2);
    const at::Tensor cos = rope_cos.index_select(0, positions).unsqueeze(1);  // [B, 1, D/2]
    const at::Tensor sin = rope_sin.index_select(0, positions).unsqueeze(1);
    const at::Tensor q_rot = rotate(q, cos, sin);  // kept in float32, as the kernels keep it
    const at::Tensor k_rot = rotate(k, cos, sin).to(k_cache.scalar_type());

    // Append at each row's own length: a scatter along the sequence dim (no host sync).
    at::Tensor kc = k_cache.narrow(0, 0, B), vc = v_cache.narrow(0, 0, B);
    const at::Tensor at_len = cache_lens.view({B, 1, 1, 1}).expand({B, Hkv, 1, D});
    kc.scatter_(2, at_len, k_rot.unsqueeze(2));
    vc.scatter_(2, at_len, v.to(v_cache.scalar_type()).unsqueeze(2));

    // Attend over the whole capacity under a length mask (fixed shapes for a graph). A row's
    // G query heads of one KV head share its keys: [B, Hkv, G, D] x [B, Hkv, D, S].
    const at::Tensor valid = at::arange(S, cache_lens.options()).view({1, 1, 1, S}) <= cache_lens.view({B, 1, 1, 1});
    const at::Tensor scores =
        at::matmul(q_rot.reshape({B, Hkv, Hq / Hkv, D}), kc.to(at::kFloat).transpose(-1, -2)).mul_(scale);
    const at::Tensor probs = scores.masked_fill(valid.logical_not(), -std::numeric_limits<float>::infinity())
                                 .softmax(-1);
    // Entries past a row's length may hold anything (an earlier request's, or never written):
    // zero them so 0 * garbage cannot make a NaN.
    const at::Tensor values = at::where(valid.view({B, 1, S, 1}), vc.to(at::kFloat), at::zeros({}, probs.options()));
    return at::matmul(probs, values).reshape({B, Hq, D}).to(q.scalar_type());
  }

  Pair regression_head(const Tensor& hidden, const Tensor& norm_weight, double eps, const Tensor& head_weight,
                       const c10::optional<Tensor>& up_weight) const override {
    const at::Tensor out = gemv(rms_norm(hidden, norm_weight, eps), head_weight);
    if (!up_weight.has_value()) return {out, hidden.new_empty({hidden.size(0), 0})};
    return {out, gemv(out, *up_weight)};
  }
};

}  // namespace

at::Tensor dequantize_weight(const at::Tensor& qweight, const at::Tensor& scales, int64_t bits, int64_t group_size,
                             int64_t in_features, at::ScalarType dtype) {
  if (bits == 8) return (qweight.to(at::kFloat) * scales.unsqueeze(1)).to(dtype);
  // A group at least as long as the row is the row's one group: repeated in_features times, not
  // group_size times (which may be near 2^63).
  const at::Tensor per_input = scales.repeat_interleave(std::min(group_size, in_features), 1).narrow(1, 0, in_features);
  return (int4_values(qweight, in_features) * per_input).to(dtype);
}

const StepKernels& aten_kernels() {
  static const AtenKernels k;
  return k;
}

}  // namespace emu_fast
