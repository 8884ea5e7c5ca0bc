// The decode step: each layer op by op through a kernel set (ours, ATen's, or both compared),
// or the CPU step as one parallel region; the head and the next input; steps in a row.
#include "decoder/decoder.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "decoder/cpu_fused_step.h"
#include "ops/checks.h"
#include "ops/op_set.h"
#include "ops/schemes.h"

namespace emu_fast {

void EmuDecoder::rebuild_step_locked() {
  graphs_.clear();  // captured graphs hold the old cache and table addresses
  const bool ours = kernels_ == &custom_kernels();
  for (size_t i = 0; i < segs_.size(); ++i) {
    Segment& seg = segs_[i];
    // The fused CPU step covers the head too when the head sits with the last segment.
    seg.fused_head = i + 1 == segs_.size() && seg.device == output_device();
    seg.fused = nullptr;
    if (!ours || cap_batch_ == 0 || cap_seq_ == 0) continue;
    cpu::FusedStepSpec spec;
    spec.layers.assign(layers_.begin() + seg.begin, layers_.begin() + seg.end);
    spec.k_cache.assign(k_cache_.begin() + seg.begin, k_cache_.begin() + seg.end);
    spec.v_cache.assign(v_cache_.begin() + seg.begin, v_cache_.begin() + seg.end);
    spec.final_norm = final_norm_;
    if (seg.fused_head) spec.head = head_;
    spec.up = up_;
    spec.rope_cos = seg.rope_cos;
    spec.rope_sin = seg.rope_sin;
    spec.num_heads = num_heads_;
    spec.num_kv_heads = num_kv_heads_;
    spec.head_dim = head_dim_;
    spec.eps = eps_;
    spec.bits = quant_.bits;
    spec.group_size = quant_.group_size;
    if (tp_size_ > 1) spec.all_reduce = [this](const at::Tensor& t) { all_reduce_(t); };
    seg.fused = cpu::make_fused_step(spec);
  }
}

void EmuDecoder::check_step_input(const at::Tensor& prev, const char* who, int64_t steps) const {
  TORCH_CHECK_VALUE(batch_ > 0, kDecoderName, ".", who, ": no active batch; call prefill() first");
  const int64_t B = batch_, Dout = output_size();
  TORCH_CHECK_VALUE(prev.dim() == 2 && prev.size(0) == B && prev.size(1) == Dout, kDecoderName, ".", who,
                    ": the previous output must be [", B, ", ", Dout, "], got ", prev.sizes());
  TORCH_CHECK_TYPE(prev.scalar_type() == final_norm_.scalar_type(), kDecoderName, ".", who, ": the previous output is ",
                   py_dtype(prev.scalar_type()), " but the decoder's weights are ", py_dtype(final_norm_.scalar_type()));
  TORCH_CHECK_VALUE(prev.device() == output_device(), kDecoderName, ".", who, ": the previous output is on ",
                    prev.device(), " but the decoder's outputs are on ", output_device());
  if (max_seq_len_ == kNoLimit) {
    TORCH_CHECK_VALUE(steps >= 0, kDecoderName, ".", who, ": steps must be >= 0, got ", steps);
  } else {
    TORCH_CHECK_VALUE(steps >= 0 && steps <= max_seq_len_, kDecoderName, ".", who, ": steps must be in [0, max_seq_len = ",
                      max_seq_len_, "], got ", steps);
  }
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(steps <= max_seq_len_ - lengths_[b], kDecoderName, ".", who, ": sequence ", b, " holds ", lengths_[b],
                      " tokens; ", steps, " more step(s) would pass the decoder's max_seq_len of ", max_seq_len_,
                      steps == 1 ? " (no room for another step)" : "");
}

// The next step's input: the previous output itself (Emu1) or its project_up (Emu2), always
// computed from prev's current contents (one small GEMV). Nothing is cached across calls: the
// caller's tensor may have been written in ways no version counter sees (.numpy(), .data).
at::Tensor EmuDecoder::next_input(const at::Tensor& prev) {
  if (!up_.has_value()) return prev.contiguous();
  return kernels_->call<ops::gemv>(prev.contiguous(), *up_);
}

std::tuple<at::Tensor, at::Tensor> EmuDecoder::run_step(const at::Tensor& x) {
  return run_step_with(x, *kernels_, fused_cpu_step_);
}

std::tuple<at::Tensor, at::Tensor> EmuDecoder::run_step_with(const at::Tensor& x, const OpSet& k, bool fused) {
  // On the CPU each segment runs in one parallel region (cpu_decode_step.cpp); elsewhere op by
  // op, part by part (what a CUDA graph captures). The residual stream moves between devices
  // once per boundary.
  if (fused && segs_.front().fused) {
    const int64_t B = x.size(0);
    std::vector<int64_t> positions(B);
    for (int64_t b = 0; b < B; ++b) positions[b] = starts_[b] + lengths_[b];
    at::Tensor h = x;
    for (Segment& seg : segs_) {
      h = h.to(seg.device);
      if (seg.fused_head) {
        at::Tensor out = at::empty({B, output_size()}, h.options());
        at::Tensor next = at::empty({B, up_.has_value() ? hidden_ : 0}, h.options());
        seg.fused->run(h, lengths_.data(), positions.data(), out, next);
        if (test_fault("decode_step")) out.add_(1.0);
        seg.lengths_dev.narrow(0, 0, B).add_(1);
        return {out, next};
      }
      at::Tensor hidden = at::empty({B, hidden_}, h.options());
      if (seg.fused) {
        seg.fused->run(h, lengths_.data(), positions.data(), hidden, at::Tensor());
        if (test_fault("decode_step")) hidden.add_(1.0);
        seg.lengths_dev.narrow(0, 0, B).add_(1);
      } else {  // a segment off the CPU
        hidden = run_layers(seg, k, h);
      }
      h = hidden;
    }
    return k.call<ops::regression_head>(h.to(output_device()), final_norm_, eps_, head_, up_);
  }
  at::Tensor h = x;
  std::tuple<at::Tensor, at::Tensor> result;
  for (const Part& part : parts_) {
    result = run_part(part, k, h.to(part.device));
    h = std::get<0>(result);
  }
  return result;
}

std::tuple<at::Tensor, at::Tensor> EmuDecoder::run_part(const Part& part, const OpSet& k, at::Tensor h) {
  for (size_t i = part.first_seg; i < part.end_seg; ++i) h = run_layers(segs_[i], k, h);
  if (!part.head) return {h, at::Tensor()};
  return k.call<ops::regression_head>(h, final_norm_, eps_, head_, up_);
}

at::Tensor EmuDecoder::attend(Segment& seg, const OpSet& k, int64_t l, const at::Tensor& qkv,
                              const at::Tensor& lens, const at::Tensor& positions) {
  const int64_t B = qkv.size(0), Hq = num_heads_, Hkv = num_kv_heads_, D = head_dim_;
  const at::Tensor q = qkv.narrow(1, 0, Hq * D).view({B, Hq, D});
  const at::Tensor kk = qkv.narrow(1, Hq * D, Hkv * D).view({B, Hkv, D});
  const at::Tensor v = qkv.narrow(1, (Hq + Hkv) * D, Hkv * D).view({B, Hkv, D});
  return k.call<ops::decode_attention>(q, kk, v, k_cache_[l], v_cache_[l], lens, positions, seg.rope_cos, seg.rope_sin,
                            1.0 / std::sqrt(static_cast<double>(D)), seg.split_counters);
}

at::Tensor EmuDecoder::run_layers(Segment& seg, const OpSet& k, at::Tensor h) {
  if (quant_.bits != 0) return run_layers_quantized(seg, k, h);
  const int64_t B = h.size(0), Hq = num_heads_, D = head_dim_;
  const at::Tensor lens = seg.lengths_dev.narrow(0, 0, B);
  const at::Tensor positions = seg.starts_dev.narrow(0, 0, B) + lens;
  // Per layer: the norms in the QKV and gate/up projections' prologue, SiLU * mul in the gate/up
  // projection's epilogue, the residual adds in the o and down projections' epilogue (rounded as
  // the fused CPU step rounds them: the projection, then the sum), so h is the residual stream
  // after every sub-layer. With tensor parallelism each rank's o and down give a partial sum: it is
  // rounded, summed across the ranks, then added (the fused step's order).
  auto add_projection = [&](const at::Tensor& x, const at::Tensor& w, const at::Tensor& residual) {
    if (tp_size_ == 1) return k.call<ops::gemv_add>(x, w, residual);
    const at::Tensor partial = k.call<ops::gemv>(x, w);
    all_reduce_(partial);
    return at::add(residual, partial);
  };
  for (int64_t l = seg.begin; l < seg.end; ++l) {
    const auto& w = layers_[l];
    const at::Tensor qkv = k.call<ops::norm_gemv>(h, w.input_norm, eps_, w.qkv);  // [B, (Hq + 2 Hkv) D]
    const at::Tensor attn = attend(seg, k, l, qkv, lens, positions);
    h = add_projection(attn.view({B, Hq * D}), w.o, h);
    h = add_projection(k.call<ops::norm_gemv_silu>(h, w.post_norm, eps_, w.gate_up), w.down, h);
  }
  seg.lengths_dev.narrow(0, 0, B).add_(1);
  return h;
}

at::Tensor EmuDecoder::run_layers_quantized(Segment& seg, const OpSet& k, at::Tensor h) {
  const int64_t B = h.size(0), Hq = num_heads_, D = head_dim_;
  const at::Tensor lens = seg.lengths_dev.narrow(0, 0, B);
  const at::Tensor positions = seg.starts_dev.narrow(0, 0, B) + lens;
  const QuantScheme& scheme = *quant_scheme(quant_.bits);
  auto proj = [&](const at::Tensor& x, const at::Tensor& q, const at::Tensor& s) {
    return scheme.gemv(k, x, q, s, quant_.group_size);
  };
  // Composed from our ops as the fused CPU step runs (cpu_decode_step.cpp), rounding for
  // rounding: each projection's output is rounded to the dtype (the GEMV op's result) and joins
  // the residual stream in the next add_rms_norm, which rounds the sum, then normalizes it.
  // `branch` is the projection not yet added (the previous layer's down, the o projection).
  at::Tensor branch;
  for (int64_t l = seg.begin; l < seg.end; ++l) {
    const auto& w = layers_[l];
    at::Tensor xn;
    if (branch.defined()) {
      std::tie(xn, h) = k.call<ops::add_rms_norm>(branch, h, w.input_norm, eps_);
    } else {
      xn = k.call<ops::rms_norm>(h, w.input_norm, eps_);
    }
    const at::Tensor qkv = proj(xn, w.qkv, w.qkv_scales);  // [B, (Hq + 2 Hkv) D]
    const at::Tensor attn = attend(seg, k, l, qkv, lens, positions);
    branch = proj(attn.view({B, Hq * D}), w.o, w.o_scales);
    all_reduce_(branch);  // the ranks' partial sums (tensor parallelism; nothing otherwise)
    std::tie(xn, h) = k.call<ops::add_rms_norm>(branch, h, w.post_norm, eps_);
    branch = proj(k.call<ops::silu_mul>(proj(xn, w.gate_up, w.gate_up_scales)), w.down, w.down_scales);
    all_reduce_(branch);
  }
  seg.lengths_dev.narrow(0, 0, B).add_(1);
  // The last add, rounded once as the fused step rounds it (float32 sum of the two, to the dtype).
  return at::add(h, branch);
}

void EmuDecoder::decode_into(const at::Tensor& prev, const at::Tensor& result) {
  const int64_t B = batch_, steps = result.size(1);
  at::Tensor x;
  int64_t i = 0;
  if (self_check_due(B)) {
    auto [out, next] = checked_step(prev);
    for (int64_t b = 0; b < B; ++b) lengths_[b] += 1;
    result.select(1, 0).copy_(out);
    x = up_.has_value() ? next : out;
    i = 1;
  } else {
    x = next_input(prev);
  }
#ifdef EMU_FAST_WITH_CUDA
  // One graph per part: the whole step for a model on one GPU, one per GPU for a split model.
  if (prev.is_cuda() && use_cuda_graphs_ && steps - i > 1 && graphs_possible()) {
    const at::Tensor rest = result.narrow(1, i, steps - i);
    const int64_t ran = decode_with_graph(x, rest);
    if (ran == steps - i) return;
    // The graph's own check failed after `ran` steps: finish on the ATen step from there.
    const at::Tensor last = rest.select(1, ran - 1);
    x = up_.has_value() ? kernels_->call<ops::gemv>(last, *up_) : last;
    i += ran;
  }
#endif
  for (; i < steps; ++i) {
    auto [out, next] = run_step(x);
    for (int64_t b = 0; b < B; ++b) lengths_[b] += 1;
    result.select(1, i).copy_(out);
    x = up_.has_value() ? next : out;
  }
}

}  // namespace emu_fast
