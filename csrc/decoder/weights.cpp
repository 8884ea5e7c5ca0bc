// The decoder's weights: every tensor checked by name (shape, dtype, device, contiguity) as the
// constructor takes it in, the segment plan (runs of layers on one device), the kernel set chosen
// for those devices, and how many bytes the weights are.
#include "decoder/decoder.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>

#include "decoder/prompt_mask.h"
#include "kernels/cpu/quantized_gemv.h"
#include "ops/checks.h"
#include "ops/op_set.h"
#include "ops/schemes.h"

namespace emu_fast {
namespace {

// `where`: "layer 3 " or "" (the head's weights). Same dtype as the decoder's, on `device`.
void check_weight(const at::Tensor& t, const std::string& where, const char* name, at::IntArrayRef shape,
                  at::ScalarType dtype, const at::Device& device, const char* device_owner) {
  TORCH_CHECK_VALUE(t.defined(), kDecoderName, ": ", where, name, " is missing");
  TORCH_CHECK_VALUE(t.sizes() == shape, kDecoderName, ": ", where, name, " has shape ", t.sizes(), ", expected ", shape);
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, kDecoderName, ": ", where, name, " is ", py_dtype(t.scalar_type()),
                   " but the decoder's weights are ", py_dtype(dtype));
  TORCH_CHECK_VALUE(t.device() == device, kDecoderName, ": ", where, name, " is on ", t.device(), " but ", device_owner,
                    " is on ", device,
                    " (a model split over devices needs segment_starts: EmuDecoder.from_llama passes them)");
  TORCH_CHECK_VALUE(t.is_contiguous(), kDecoderName, ": ", where, name, " must be contiguous");
}

std::string layer_name(size_t l) { return "layer " + std::to_string(l) + " "; }

// A quantized projection computing [N] outputs from K inputs: its qweight and scales as its
// scheme lays them out (ops/schemes.h), on `device`, contiguous.
void check_quantized_weight(const at::Tensor& q, const at::Tensor& scales, const std::string& where, const char* name,
                            int64_t N, int64_t K, const WeightQuant& quant, const at::Device& device,
                            const char* device_owner) {
  const QuantScheme& scheme = *quant_scheme(quant.bits);
  const std::vector<int64_t> q_shape = {N, scheme.qweight_cols(K)};
  const int64_t scale_cols = scheme.scale_cols(K, quant.group_size);
  const std::vector<int64_t> s_shape = scheme.grouped ? std::vector<int64_t>{N, scale_cols} : std::vector<int64_t>{N};
  const std::string what = std::string(name) + " (" + scheme.name + ")";
  TORCH_CHECK_VALUE(q.defined(), kDecoderName, ": ", where, what, " qweight is missing");
  TORCH_CHECK_VALUE(scales.defined(), kDecoderName, ": ", where, what, " scales are missing");
  TORCH_CHECK_TYPE(q.scalar_type() == scheme.qweight, kDecoderName, ": ", where, what, " qweight is ",
                   py_dtype(q.scalar_type()), ", expected ", py_dtype(scheme.qweight), " for ", scheme.name, " weights");
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat, kDecoderName, ": ", where, what, " scales are ",
                   py_dtype(scales.scalar_type()), ", expected torch.float32");
  TORCH_CHECK_VALUE(q.sizes() == at::IntArrayRef(q_shape), kDecoderName, ": ", where, what, " qweight has shape ", q.sizes(),
                    ", expected ", at::IntArrayRef(q_shape), " (", scheme.layout, ")");
  TORCH_CHECK_VALUE(scales.sizes() == at::IntArrayRef(s_shape), kDecoderName, ": ", where, what, " scales have shape ",
                    scales.sizes(), ", expected ", at::IntArrayRef(s_shape),
                    scheme.grouped ? " (one per output row and group of " + std::to_string(quant.group_size) + " inputs)"
                                   : std::string(" (one per output row)"));
  for (const at::Tensor* t : {&q, &scales}) {
    const char* part = t == &q ? " qweight" : " scales";
    TORCH_CHECK_VALUE(t->device() == device, kDecoderName, ": ", where, what, part, " is on ", t->device(), " but ",
                      device_owner, " is on ", device);
    TORCH_CHECK_VALUE(t->is_contiguous(), kDecoderName, ": ", where, what, part, " must be contiguous");
  }
}

}  // namespace

DecoderLayerWeights DecoderLayerWeights::from_list(const std::vector<at::Tensor>& w) {
  DecoderLayerWeights out{w[0], w[1], w[2], w[3], w[4], w[5]};
  if (w.size() == 10) {
    out.qkv_scales = w[6];
    out.o_scales = w[7];
    out.gate_up_scales = w[8];
    out.down_scales = w[9];
  }
  return out;
}

EmuDecoder::EmuDecoder(const std::vector<std::vector<at::Tensor>>& layers, at::Tensor final_norm,
                       at::Tensor head_weight, c10::optional<at::Tensor> up_weight, int64_t num_heads,
                       int64_t num_kv_heads, double rms_eps, at::Tensor rope_cos, at::Tensor rope_sin,
                       c10::optional<int64_t> max_batch, c10::optional<int64_t> max_seq_len, RopeFn rope_fn,
                       const std::string& kernels, std::vector<int64_t> segment_starts, int64_t weight_bits,
                       int64_t group_size, int64_t tp_size, const std::string& tp_group)
    : final_norm_(std::move(final_norm)),
      head_(std::move(head_weight)),
      up_(std::move(up_weight)),
      num_heads_(num_heads),
      num_kv_heads_(num_kv_heads),
      tp_size_(tp_size),
      tp_group_(tp_group),
      eps_(rms_eps),
      max_batch_(max_batch.value_or(kNoLimit)),
      max_seq_len_(max_seq_len.value_or(kNoLimit)),
      rope_fn_(std::move(rope_fn)),
      mode_(kernels) {
  TORCH_CHECK_VALUE(mode_ == "auto" || mode_ == "custom" || mode_ == "aten", kDecoderName,
                    ": kernels must be \"auto\", \"custom\" or \"aten\", got \"", mode_, "\"");
  TORCH_CHECK_VALUE(!layers.empty(), kDecoderName, ": needs at least one layer");
  TORCH_CHECK_VALUE(final_norm_.defined() && final_norm_.dim() == 1, kDecoderName, ": final_norm must be 1-D");
  hidden_ = final_norm_.size(0);
  TORCH_CHECK_VALUE(hidden_ > 0, kDecoderName, ": hidden size must be positive");
  TORCH_CHECK_VALUE(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0, kDecoderName,
                    ": num_heads (", num_heads, ") must be a positive multiple of num_kv_heads (",
                    num_kv_heads, ")");
  TORCH_CHECK_VALUE(hidden_ % num_heads == 0 && (hidden_ / num_heads) % 2 == 0, kDecoderName, ": hidden size ",
                    hidden_, " must split into ", num_heads, " heads of even size");
  TORCH_CHECK_VALUE(max_batch_ > 0 && max_seq_len_ > 0, kDecoderName,
                    ": max_batch and max_seq_len must be positive (or None: no limit), got ",
                    max_batch.value_or(1), " and ", max_seq_len.value_or(1));
  TORCH_CHECK_VALUE(rms_eps > 0 && std::isfinite(rms_eps), kDecoderName, ": rms_eps must be positive and finite, got ",
                    rms_eps);
  head_dim_ = hidden_ / num_heads;
  // From here on, heads are this rank's (all of them without tensor parallelism).
  check_tensor_parallel(num_heads, num_kv_heads);
  num_heads /= tp_size_;
  num_kv_heads /= tp_size_;
  num_heads_ = num_heads;
  num_kv_heads_ = num_kv_heads;
  const auto st = final_norm_.scalar_type();
  const QuantScheme* scheme = quant_scheme(weight_bits);
  TORCH_CHECK_VALUE(weight_bits == 0 || scheme != nullptr, kDecoderName,
                    ": weight_bits must be 0 (unquantized), 8 (int8) or 4 (int4), got ", weight_bits);
  if (scheme != nullptr && scheme->grouped)
    TORCH_CHECK_VALUE(group_size > 0 && group_size % kernels::kInt4Block == 0, kDecoderName,
                      ": int4 weights need a group_size that is a positive multiple of ", kernels::kInt4Block,
                      ", got ", group_size);
  quant_ = WeightQuant{weight_bits, scheme != nullptr && scheme->grouped ? group_size : 0};
  const size_t per_layer = weight_bits == 0 ? 6 : 10;
  const std::string layer_parts =
      weight_bits == 0 ? "6 tensors [input_norm, qkv, o, post_norm, gate_up, down]"
                       : std::string("10 tensors [input_norm, qkv, o, post_norm, gate_up, down, qkv_scales, o_scales, "
                                     "gate_up_scales, down_scales] for ") +
                             scheme->name + " weights";
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, kDecoderName,
                   ": weights must be float32, bfloat16 or float16, got ", py_dtype(st));

  // Segments: runs of consecutive layers, each on one device.
  const int64_t L = static_cast<int64_t>(layers.size());
  if (segment_starts.empty()) segment_starts = {0};
  TORCH_CHECK_VALUE(tp_size_ == 1 || segment_starts.size() == 1, kDecoderName,
                    ": a tensor-parallel rank runs every layer on one device (got segment_starts ",
                    c10::IntArrayRef(segment_starts), ")");
  TORCH_CHECK_VALUE(segment_starts.front() == 0, kDecoderName, ": segment_starts must begin with layer 0, got ",
                    segment_starts.front());
  for (size_t i = 1; i < segment_starts.size(); ++i)
    TORCH_CHECK_VALUE(segment_starts[i] > segment_starts[i - 1] && segment_starts[i] < L, kDecoderName,
                      ": segment_starts must be increasing layer indices below ", L, ", got ",
                      c10::IntArrayRef(segment_starts));

  const int64_t H = hidden_, D = head_dim_;
  const int64_t qkv_rows = (num_heads + 2 * num_kv_heads) * D;
  for (size_t i = 0; i < segment_starts.size(); ++i) {
    const int64_t begin = segment_starts[i], end = i + 1 < segment_starts.size() ? segment_starts[i + 1] : L;
    TORCH_CHECK_VALUE(layers[begin].size() == per_layer && layers[begin][0].defined(), kDecoderName, ": layer ", begin,
                      " needs ", layer_parts, ", got ", layers[begin].size());
    const at::Device device = layers[begin][0].device();
    const std::string owner = "segment " + std::to_string(i) + " (from layer " + std::to_string(begin) + ")";
    for (int64_t l = begin; l < end; ++l) {
      const std::string where = layer_name(l);
      TORCH_CHECK_VALUE(layers[l].size() == per_layer, kDecoderName, ": layer ", l, " needs ", layer_parts, ", got ",
                        layers[l].size());
      const DecoderLayerWeights w = DecoderLayerWeights::from_list(layers[l]);
      TORCH_CHECK_VALUE(w.gate_up.defined() && w.gate_up.dim() == 2 && w.gate_up.size(0) % 2 == 0, kDecoderName,
                        ": layer ", l, " gate_up must be [2*intermediate, hidden]");
      const int64_t I = w.gate_up.size(0) / 2;
      const int64_t I0 = layers_.empty() ? I : layers_[0].gate_up.size(0) / 2;
      TORCH_CHECK_VALUE(I == I0, kDecoderName, ": layer ", l, " has intermediate size ", I, " but layer 0 has ", I0,
                        "; LLaMA's are all equal");
      check_weight(w.input_norm, where, "input_norm", {H}, st, device, owner.c_str());
      check_weight(w.post_norm, where, "post_norm", {H}, st, device, owner.c_str());
      if (weight_bits == 0) {
        check_weight(w.qkv, where, "qkv", {qkv_rows, H}, st, device, owner.c_str());
        check_weight(w.o, where, "o", {H, num_heads * D}, st, device, owner.c_str());
        check_weight(w.gate_up, where, "gate_up", {2 * I, H}, st, device, owner.c_str());
        check_weight(w.down, where, "down", {H, I}, st, device, owner.c_str());
      } else {
        check_quantized_weight(w.qkv, w.qkv_scales, where, "qkv", qkv_rows, H, quant_, device, owner.c_str());
        check_quantized_weight(w.o, w.o_scales, where, "o", H, num_heads * D, quant_, device, owner.c_str());
        check_quantized_weight(w.gate_up, w.gate_up_scales, where, "gate_up", 2 * I, H, quant_, device, owner.c_str());
        check_quantized_weight(w.down, w.down_scales, where, "down", H, I, quant_, device, owner.c_str());
      }
      layers_.push_back(w);
    }
    segs_.push_back(Segment{begin, end, device});
  }
  const at::Device out_device = final_norm_.device();
  TORCH_CHECK_VALUE(head_.defined() && head_.dim() == 2, kDecoderName, ": head_weight must be [out, hidden]");
  check_weight(final_norm_, "", "final_norm", {H}, st, out_device, "final_norm");
  check_weight(head_, "", "head_weight", {head_.size(0), H}, st, out_device, "final_norm");
  if (up_.has_value()) {
    check_weight(*up_, "", "up_weight", {H, head_.size(0)}, st, out_device, "final_norm");
  } else {
    TORCH_CHECK_VALUE(head_.size(0) == H, kDecoderName, ": without up_weight the head's output is the next input, so "
                      "head_weight must be [", H, ", ", H, "], got ", head_.sizes());
  }

  // Parts: consecutive segments on one device; the head joins the last part on its device.
  for (size_t i = 0; i < segs_.size(); ++i) {
    if (parts_.empty() || parts_.back().device != segs_[i].device) parts_.push_back(Part{segs_[i].device, i, i, false});
    parts_.back().end_seg = i + 1;
  }
  if (parts_.back().device == out_device) {
    parts_.back().head = true;
  } else {
    parts_.push_back(Part{out_device, segs_.size(), segs_.size(), true});
  }

  // Kernels: ours where every segment's device has them, else ATen (or an error, if asked for ours).
  const int64_t group = num_heads / num_kv_heads;
  std::string why;
  bool ours = mode_ != "aten";
  for (const Segment& seg : segs_)
    ours = ours && custom_kernels_support(seg.device, st, D, group, &why) &&
           custom_quantized_support(seg.device, quant_.bits, &why);
  ours = ours && custom_kernels_support(out_device, st, D, group, &why);
  TORCH_CHECK_VALUE(ours || mode_ != "custom", kDecoderName, ": kernels=\"custom\" cannot run here: ", why,
                    " (use kernels=\"auto\" or \"aten\")");
  kernels_ = ours ? &custom_kernels() : &aten_kernels();

  // RoPE tables, as the model's rotary module gives them. Positions go up to a prompt's padded
  // length plus the steps after it; rope_fn_ extends them when a request needs more.
  for (const auto* t : {&rope_cos, &rope_sin}) {
    const char* name = t == &rope_cos ? "rope_cos" : "rope_sin";
    TORCH_CHECK_VALUE(t->defined() && t->dim() == 2 && t->size(1) == D / 2, kDecoderName, ": ", name,
                      " must be [positions, head_dim / 2 = ", D / 2, "], got ",
                      t->defined() ? t->sizes() : at::IntArrayRef{});
    // Tables that cannot grow (no rope_fn) must cover the length limit, if there is one.
    TORCH_CHECK_VALUE(rope_fn_ || max_seq_len_ == kNoLimit || t->size(0) >= 2 * max_seq_len_, kDecoderName, ": ", name,
                      " must be [positions >= 2 * max_seq_len = ", 2 * max_seq_len_, ", head_dim / 2 = ", D / 2,
                      "] (or pass rope_fn), got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, kDecoderName, ": ", name, " must be torch.float32, got ",
                     py_dtype(t->scalar_type()));
  }
  TORCH_CHECK_VALUE(rope_cos.sizes() == rope_sin.sizes(), kDecoderName, ": rope_cos ", rope_cos.sizes(),
                    " and rope_sin ", rope_sin.sizes(), " differ in shape");
  set_rope_locked(rope_cos, rope_sin);  // its own copies: the caller's may change
  // No capacity guessing: the caches start empty and grow to what requests need.
  std::vector<at::Tensor> empty;
  for (Segment& seg : segs_) {
    empty.push_back(at::empty({seg.end - seg.begin, 2, 0, num_kv_heads, 0, D}, final_norm_.options().device(seg.device)));
    seg.lengths_dev = at::zeros({0}, at::TensorOptions().dtype(at::kLong).device(seg.device));
    seg.starts_dev = seg.lengths_dev.clone();
    seg.split_counters = at::zeros({0}, seg.lengths_dev.options().dtype(at::kInt));
  }
  set_caches_locked(std::move(empty));
}

int64_t EmuDecoder::weight_bytes() const {
  int64_t n = 0;
  auto add = [&n](const at::Tensor& t) { n += static_cast<int64_t>(t.numel()) * t.element_size(); };
  for (const auto& w : layers_)
    for (const auto* t : {&w.input_norm, &w.qkv, &w.o, &w.post_norm, &w.gate_up, &w.down, &w.qkv_scales,
                          &w.o_scales, &w.gate_up_scales, &w.down_scales})
      if (t->defined()) add(*t);
  add(final_norm_);
  add(head_);
  if (up_.has_value()) add(*up_);
  return n;
}

}  // namespace emu_fast
