// Prefill: the prompts through every layer as GEMMs (ATen), filling the KV cache, and the
// regression head at each row's last valid token.
#include "decoder/decoder.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>

#include "decoder/prompt_mask.h"
#include "kernels/cpu/isa.h"
#include "ops/op_set.h"

namespace emu_fast {

// x [B, T, heads, D] rotated by cos/sin [B, T, 1, D/2], in float32, back to x's dtype.
at::Tensor EmuDecoder::rope_prefill(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) const {
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor x1 = xf.narrow(-1, 0, head_dim_ / 2), x2 = xf.narrow(-1, head_dim_ / 2, head_dim_ / 2);
  return at::cat({x1 * cos - x2 * sin, x2 * cos + x1 * sin}, -1).to(x.scalar_type());
}

PromptLayout EmuDecoder::parse(const char* who, const at::Tensor& embeds, const at::Tensor& attention_mask) const {
  return parse_prompts(who, embeds, attention_mask,
                       {hidden_, max_batch_, max_seq_len_, final_norm_.scalar_type(), input_device()});
}

at::Tensor EmuDecoder::prefill_locked(const at::Tensor& embeds, const PromptLayout& prompts) {
  reset_locked();
  return prefill_rows_locked(embeds, prompts, 0);
}

at::Tensor EmuDecoder::prefill_rows_locked(const at::Tensor& embeds, const PromptLayout& prompts, int64_t first) {
  const int64_t B = prompts.batch, H = hidden_, D = head_dim_;
  const std::vector<int64_t>& starts = prompts.starts;
  const std::vector<int64_t>& lens = prompts.lens;
  // Prefill is GEMM-bound; its glue (norms, SiLU, the head) runs on our kernels only when they
  // were asked for by name. In "auto" mode it is ATen's: it runs before any self-check, and a
  // wrong kernel here would poison the cache every later step reads.
  const OpSet& k = mode_ == "custom" ? custom_kernels() : aten_kernels();

  // --- Lay each prompt's valid tokens out from index 0 (the cache's layout), RoPE positions
  // starting at its left padding so the arithmetic is upstream's.
  const int64_t L = *std::max_element(lens.begin(), lens.end());
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  const at::Tensor starts_host = at::tensor(starts, i64), lens_host = at::tensor(lens, i64);
  const at::Tensor offs_host = at::arange(L, i64);
  // Rows past a prompt's end repeat its last token; the key mask hides them.
  const at::Tensor src_host =
      starts_host.unsqueeze(1) + at::minimum(offs_host.unsqueeze(0), lens_host.unsqueeze(1) - 1);
  at::Tensor h = embeds.gather(1, src_host.to(embeds.device()).unsqueeze(-1).expand({B, L, H})).reshape({B * L, H});
  // With no padding the mask is plain causal: is_causal lets SDPA pick its flash kernel, which
  // takes no explicit mask.
  const bool unpadded = std::all_of(lens.begin(), lens.end(), [L](int64_t n) { return n == L; });
  at::Tensor attn_mask_host;
  if (!unpadded) {
    const at::Tensor key_valid = offs_host.unsqueeze(0) < lens_host.unsqueeze(1);        // [B, L]
    const at::Tensor causal = at::ones({L, L}, i64.dtype(at::kBool)).tril();              // [L, L]
    attn_mask_host = causal.unsqueeze(0).unsqueeze(0) & key_valid.view({B, 1, 1, L});
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const int64_t Hq = num_heads_, Hkv = num_kv_heads_;

  for (Segment& seg : segs_) {
    const at::Device dev = seg.device;
    h = h.to(dev);
    const at::Tensor src = src_host.to(dev).reshape(-1);
    const at::Tensor cos = seg.rope_cos.index_select(0, src).view({B, L, 1, D / 2});
    const at::Tensor sin = seg.rope_sin.index_select(0, src).view({B, L, 1, D / 2});
    const at::Tensor attn_mask = unpadded ? at::Tensor() : attn_mask_host.to(dev);
    for (int64_t l = seg.begin; l < seg.end; ++l) {
      const auto& w = layers_[l];
      const at::Tensor x = k.call<ops::rms_norm>(h, w.input_norm, eps_);
      const at::Tensor qkv = prefill_linear(x, w.qkv, w.qkv_scales).view({B, L, Hq + 2 * Hkv, D});
      const at::Tensor q = rope_prefill(qkv.narrow(2, 0, Hq), cos, sin).transpose(1, 2);
      const at::Tensor kk = rope_prefill(qkv.narrow(2, Hq, Hkv), cos, sin).transpose(1, 2);
      const at::Tensor v = qkv.narrow(2, Hq + Hkv, Hkv).transpose(1, 2);
      k_cache_[l].narrow(0, first, B).narrow(2, 0, L).copy_(kk);
      v_cache_[l].narrow(0, first, B).narrow(2, 0, L).copy_(v);
      const at::Tensor kx = Hq == Hkv ? kk : kk.repeat_interleave(Hq / Hkv, 1);
      const at::Tensor vx = Hq == Hkv ? v : v.repeat_interleave(Hq / Hkv, 1);
      const at::Tensor o = unpadded ? at::scaled_dot_product_attention(q, kx, vx, {}, 0.0, true, scale)
                                    : at::scaled_dot_product_attention(q, kx, vx, attn_mask, 0.0, false, scale);
      // o and down: with tensor parallelism each rank's partial sum, summed across the ranks
      at::Tensor attn_out = prefill_linear(o.transpose(1, 2).reshape({B * L, Hq * D}), w.o, w.o_scales);
      all_reduce_(attn_out);
      h = h + attn_out;
      const at::Tensor y = k.call<ops::rms_norm>(h, w.post_norm, eps_);
      const at::Tensor gated = k.call<ops::silu_mul>(prefill_linear(y, w.gate_up, w.gate_up_scales));
      at::Tensor mlp_out = prefill_linear(gated, w.down, w.down_scales);
      all_reduce_(mlp_out);
      h = h + mlp_out;
    }
    seg.lengths_dev.narrow(0, first, B).copy_(lens_host);
    seg.starts_dev.narrow(0, first, B).copy_(starts_host);
  }
  const at::Device out_dev = output_device();
  const at::Tensor last = h.to(out_dev).view({B, L, H}).index(
      {at::arange(B, i64.device(out_dev)), (lens_host - 1).to(out_dev)});
  const at::Tensor out = std::get<0>(k.call<ops::regression_head>(last, final_norm_, eps_, head_, up_));

  batch_ = first + B;
  for (int64_t b = 0; b < B; ++b) {
    lengths_[first + b] = lens[b];
    starts_[first + b] = starts[b];
  }
  return out;
}

namespace {
std::atomic<int64_t> g_prefill_chunk_bytes{0};
}  // namespace

void set_prefill_chunk_bytes(int64_t bytes) { g_prefill_chunk_bytes.store(bytes, std::memory_order_relaxed); }

// A projection the plain GEMM (at::linear) cannot take as it is goes a chunk of output rows at a
// time through one reused scratch, multiplied while the chunk is fresh in cache: a quantized
// weight, dequantized (bounded, so a prefill never holds a whole layer's weight in float: half a
// gigabyte for Emu2's MLP), and, on a CPU without native bfloat16 products, a bfloat16 one
// widened to float32 (exact), whose float32 GEMM is several times faster than ATen's bfloat16
// one there (the same products of bfloat16 values summed in float32; only the order in which
// they add may differ).
at::Tensor EmuDecoder::prefill_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) const {
  const bool widen = x.is_cpu() && x.scalar_type() == at::kBFloat16 && !kernels::cpu_has_bf16_dot();
  if (quant_.bits == 0 && !widen) return at::linear(x, w);
  const at::Tensor xc = widen ? x.to(at::kFloat) : x;
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  // CPU: a chunk that stays in the last-level cache. CUDA: few chunks (each is a launch or two).
  const int64_t forced = g_prefill_chunk_bytes.load(std::memory_order_relaxed);
  const int64_t budget = forced > 0 ? forced : x.is_cpu() ? (int64_t{4} << 20) : (int64_t{256} << 20);
  const int64_t rows = std::min(N, std::max<int64_t>(16, budget / std::max<int64_t>(1, K * xc.element_size()) / 16 * 16));
  const at::Tensor out = at::empty({M, N}, xc.options());
  const at::Tensor scratch = at::empty({rows, K}, xc.options());
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t n = std::min(rows, N - n0);
    const at::Tensor chunk = scratch.narrow(0, 0, n);
    // Widened, a quantized weight keeps the values the scheme defines in the model's dtype
    // (rounded to bfloat16, as the unwidened GEMM and the modules' own forward take them).
    if (quant_.bits != 0)
      dequantize_weight_rows(w, scales, quant_.bits, quant_.group_size, n0, chunk, x.scalar_type());
    else
      chunk.copy_(w.narrow(0, n0, n));
    at::Tensor part = out.narrow(1, n0, n);
    at::mm_out(part, xc, chunk.t());
  }
  return widen ? out.to(x.scalar_type()) : out;
}

}  // namespace emu_fast
