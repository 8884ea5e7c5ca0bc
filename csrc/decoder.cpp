#include "decoder.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <sstream>

#include "checks.h"
#include "cpu/fused_step.h"
#include "kernels/quantized_gemv.h"
#include "prompt_mask.h"
#include "self_check.h"
#include "step_kernels.h"

namespace emu_fast {
namespace {

constexpr const char* kWho = "emu_fast.EmuDecoder";

}  // namespace

namespace {

// `where`: "layer 3 " or "" (the head's weights). Same dtype as the decoder's, on `device`.
void check_weight(const at::Tensor& t, const std::string& where, const char* name, at::IntArrayRef shape,
                  at::ScalarType dtype, const at::Device& device, const char* device_owner) {
  TORCH_CHECK_VALUE(t.defined(), kWho, ": ", where, name, " is missing");
  TORCH_CHECK_VALUE(t.sizes() == shape, kWho, ": ", where, name, " has shape ", t.sizes(), ", expected ", shape);
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, kWho, ": ", where, name, " is ", py_dtype(t.scalar_type()),
                   " but the decoder's weights are ", py_dtype(dtype));
  TORCH_CHECK_VALUE(t.device() == device, kWho, ": ", where, name, " is on ", t.device(), " but ", device_owner,
                    " is on ", device,
                    " (a model split over devices needs segment_starts: EmuDecoder.from_llama passes them)");
  TORCH_CHECK_VALUE(t.is_contiguous(), kWho, ": ", where, name, " must be contiguous");
}

std::string layer_name(size_t l) { return "layer " + std::to_string(l) + " "; }

const char* scheme_name(int64_t bits) { return bits == 8 ? "int8" : "int4"; }

// A quantized projection computing [N] outputs from K inputs: its qweight and scales as
// WeightQuant's scheme lays them out (kernels/quantized_gemv.h), on `device`, contiguous.
void check_quantized_weight(const at::Tensor& q, const at::Tensor& scales, const std::string& where, const char* name,
                            int64_t N, int64_t K, const WeightQuant& quant, const at::Device& device,
                            const char* device_owner) {
  const bool int8 = quant.bits == 8;
  const std::vector<int64_t> q_shape = {N, int8 ? K : kernels::int4_row_bytes(K)};
  const std::vector<int64_t> s_shape =
      int8 ? std::vector<int64_t>{N} : std::vector<int64_t>{N, kernels::int4_groups(K, quant.group_size)};
  const at::ScalarType q_dtype = int8 ? at::kChar : at::kByte;
  const std::string what = std::string(name) + " (" + scheme_name(quant.bits) + ")";
  TORCH_CHECK_VALUE(q.defined(), kWho, ": ", where, what, " qweight is missing");
  TORCH_CHECK_VALUE(scales.defined(), kWho, ": ", where, what, " scales are missing");
  TORCH_CHECK_TYPE(q.scalar_type() == q_dtype, kWho, ": ", where, what, " qweight is ", py_dtype(q.scalar_type()),
                   ", expected ", py_dtype(q_dtype), " for ", scheme_name(quant.bits), " weights");
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat, kWho, ": ", where, what, " scales are ",
                   py_dtype(scales.scalar_type()), ", expected torch.float32");
  TORCH_CHECK_VALUE(q.sizes() == at::IntArrayRef(q_shape), kWho, ": ", where, what, " qweight has shape ", q.sizes(),
                    ", expected ", at::IntArrayRef(q_shape),
                    int8 ? "" : " (two values a byte, rows padded to a multiple of 32 values)");
  TORCH_CHECK_VALUE(scales.sizes() == at::IntArrayRef(s_shape), kWho, ": ", where, what, " scales have shape ",
                    scales.sizes(), ", expected ", at::IntArrayRef(s_shape),
                    int8 ? " (one per output row)"
                         : " (one per output row and group of " + std::to_string(quant.group_size) + " inputs)");
  for (const at::Tensor* t : {&q, &scales}) {
    const char* part = t == &q ? " qweight" : " scales";
    TORCH_CHECK_VALUE(t->device() == device, kWho, ": ", where, what, part, " is on ", t->device(), " but ",
                      device_owner, " is on ", device);
    TORCH_CHECK_VALUE(t->is_contiguous(), kWho, ": ", where, what, part, " must be contiguous");
  }
}

}  // namespace

EmuDecoder::EmuDecoder(const std::vector<std::vector<at::Tensor>>& layers, at::Tensor final_norm,
                       at::Tensor head_weight, c10::optional<at::Tensor> up_weight, int64_t num_heads,
                       int64_t num_kv_heads, double rms_eps, at::Tensor rope_cos, at::Tensor rope_sin,
                       c10::optional<int64_t> max_batch, c10::optional<int64_t> max_seq_len, RopeFn rope_fn,
                       const std::string& kernels, std::vector<int64_t> segment_starts, int64_t weight_bits,
                       int64_t group_size)
    : final_norm_(std::move(final_norm)),
      head_(std::move(head_weight)),
      up_(std::move(up_weight)),
      num_heads_(num_heads),
      num_kv_heads_(num_kv_heads),
      eps_(rms_eps),
      max_batch_(max_batch.value_or(kNoLimit)),
      max_seq_len_(max_seq_len.value_or(kNoLimit)),
      rope_fn_(std::move(rope_fn)),
      mode_(kernels) {
  TORCH_CHECK_VALUE(mode_ == "auto" || mode_ == "custom" || mode_ == "aten", kWho,
                    ": kernels must be \"auto\", \"custom\" or \"aten\", got \"", mode_, "\"");
  TORCH_CHECK_VALUE(!layers.empty(), kWho, ": needs at least one layer");
  TORCH_CHECK_VALUE(final_norm_.defined() && final_norm_.dim() == 1, kWho, ": final_norm must be 1-D");
  hidden_ = final_norm_.size(0);
  TORCH_CHECK_VALUE(hidden_ > 0, kWho, ": hidden size must be positive");
  TORCH_CHECK_VALUE(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0, kWho,
                    ": num_heads (", num_heads, ") must be a positive multiple of num_kv_heads (",
                    num_kv_heads, ")");
  TORCH_CHECK_VALUE(hidden_ % num_heads == 0 && (hidden_ / num_heads) % 2 == 0, kWho, ": hidden size ",
                    hidden_, " must split into ", num_heads, " heads of even size");
  TORCH_CHECK_VALUE(max_batch_ > 0 && max_seq_len_ > 0, kWho,
                    ": max_batch and max_seq_len must be positive (or None: no limit), got ",
                    max_batch.value_or(1), " and ", max_seq_len.value_or(1));
  TORCH_CHECK_VALUE(rms_eps > 0 && std::isfinite(rms_eps), kWho, ": rms_eps must be positive and finite, got ",
                    rms_eps);
  head_dim_ = hidden_ / num_heads;
  const auto st = final_norm_.scalar_type();
  TORCH_CHECK_VALUE(weight_bits == 0 || weight_bits == 8 || weight_bits == 4, kWho,
                    ": weight_bits must be 0 (unquantized), 8 (int8) or 4 (int4), got ", weight_bits);
  if (weight_bits == 4)
    TORCH_CHECK_VALUE(group_size > 0 && group_size % kernels::kInt4Block == 0, kWho,
                      ": int4 weights need a group_size that is a positive multiple of ", kernels::kInt4Block,
                      ", got ", group_size);
  quant_ = WeightQuant{weight_bits, weight_bits == 4 ? group_size : 0};
  const size_t per_layer = weight_bits == 0 ? 6 : 10;
  const std::string layer_parts =
      weight_bits == 0 ? "6 tensors [input_norm, qkv, o, post_norm, gate_up, down]"
                       : std::string("10 tensors [input_norm, qkv, o, post_norm, gate_up, down, qkv_scales, o_scales, "
                                     "gate_up_scales, down_scales] for ") +
                             scheme_name(weight_bits) + " weights";
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, kWho,
                   ": weights must be float32, bfloat16 or float16, got ", py_dtype(st));

  // Segments: runs of consecutive layers, each on one device.
  const int64_t L = static_cast<int64_t>(layers.size());
  if (segment_starts.empty()) segment_starts = {0};
  TORCH_CHECK_VALUE(segment_starts.front() == 0, kWho, ": segment_starts must begin with layer 0, got ",
                    segment_starts.front());
  for (size_t i = 1; i < segment_starts.size(); ++i)
    TORCH_CHECK_VALUE(segment_starts[i] > segment_starts[i - 1] && segment_starts[i] < L, kWho,
                      ": segment_starts must be increasing layer indices below ", L, ", got ",
                      c10::IntArrayRef(segment_starts));

  const int64_t H = hidden_, D = head_dim_;
  const int64_t qkv_rows = (num_heads + 2 * num_kv_heads) * D;
  for (size_t i = 0; i < segment_starts.size(); ++i) {
    const int64_t begin = segment_starts[i], end = i + 1 < segment_starts.size() ? segment_starts[i + 1] : L;
    TORCH_CHECK_VALUE(layers[begin].size() == per_layer && layers[begin][0].defined(), kWho, ": layer ", begin,
                      " needs ", layer_parts, ", got ", layers[begin].size());
    const at::Device device = layers[begin][0].device();
    const std::string owner = "segment " + std::to_string(i) + " (from layer " + std::to_string(begin) + ")";
    for (int64_t l = begin; l < end; ++l) {
      const auto& w = layers[l];
      const std::string where = layer_name(l);
      TORCH_CHECK_VALUE(w.size() == per_layer, kWho, ": layer ", l, " needs ", layer_parts, ", got ", w.size());
      TORCH_CHECK_VALUE(w[4].defined() && w[4].dim() == 2 && w[4].size(0) % 2 == 0, kWho, ": layer ", l,
                        " gate_up must be [2*intermediate, hidden]");
      const int64_t I = w[4].size(0) / 2;
      const int64_t I0 = layers_.empty() ? I : layers_[0].gate_up.size(0) / 2;
      TORCH_CHECK_VALUE(I == I0, kWho, ": layer ", l, " has intermediate size ", I, " but layer 0 has ", I0,
                        "; LLaMA's are all equal");
      check_weight(w[0], where, "input_norm", {H}, st, device, owner.c_str());
      check_weight(w[3], where, "post_norm", {H}, st, device, owner.c_str());
      if (weight_bits == 0) {
        check_weight(w[1], where, "qkv", {qkv_rows, H}, st, device, owner.c_str());
        check_weight(w[2], where, "o", {H, num_heads * D}, st, device, owner.c_str());
        check_weight(w[4], where, "gate_up", {2 * I, H}, st, device, owner.c_str());
        check_weight(w[5], where, "down", {H, I}, st, device, owner.c_str());
        layers_.push_back({w[0], w[1], w[2], w[3], w[4], w[5]});
      } else {
        check_quantized_weight(w[1], w[6], where, "qkv", qkv_rows, H, quant_, device, owner.c_str());
        check_quantized_weight(w[2], w[7], where, "o", H, num_heads * D, quant_, device, owner.c_str());
        check_quantized_weight(w[4], w[8], where, "gate_up", 2 * I, H, quant_, device, owner.c_str());
        check_quantized_weight(w[5], w[9], where, "down", H, I, quant_, device, owner.c_str());
        layers_.push_back({w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8], w[9]});
      }
    }
    segs_.push_back(Segment{begin, end, device});
  }
  const at::Device out_device = final_norm_.device();
  TORCH_CHECK_VALUE(head_.defined() && head_.dim() == 2, kWho, ": head_weight must be [out, hidden]");
  check_weight(final_norm_, "", "final_norm", {H}, st, out_device, "final_norm");
  check_weight(head_, "", "head_weight", {head_.size(0), H}, st, out_device, "final_norm");
  if (up_.has_value()) {
    check_weight(*up_, "", "up_weight", {H, head_.size(0)}, st, out_device, "final_norm");
  } else {
    TORCH_CHECK_VALUE(head_.size(0) == H, kWho, ": without up_weight the head's output is the next input, so "
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
  TORCH_CHECK_VALUE(ours || mode_ != "custom", kWho, ": kernels=\"custom\" cannot run here: ", why,
                    " (use kernels=\"auto\" or \"aten\")");
  kernels_ = ours ? &custom_kernels() : &aten_kernels();

  // RoPE tables, as the model's rotary module gives them. Positions go up to a prompt's padded
  // length plus the steps after it; rope_fn_ extends them when a request needs more.
  for (const auto* t : {&rope_cos, &rope_sin}) {
    const char* name = t == &rope_cos ? "rope_cos" : "rope_sin";
    TORCH_CHECK_VALUE(t->defined() && t->dim() == 2 && t->size(1) == D / 2, kWho, ": ", name,
                      " must be [positions, head_dim / 2 = ", D / 2, "], got ",
                      t->defined() ? t->sizes() : at::IntArrayRef{});
    // Tables that cannot grow (no rope_fn) must cover the length limit, if there is one.
    TORCH_CHECK_VALUE(rope_fn_ || max_seq_len_ == kNoLimit || t->size(0) >= 2 * max_seq_len_, kWho, ": ", name,
                      " must be [positions >= 2 * max_seq_len = ", 2 * max_seq_len_, ", head_dim / 2 = ", D / 2,
                      "] (or pass rope_fn), got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, kWho, ": ", name, " must be torch.float32, got ",
                     py_dtype(t->scalar_type()));
  }
  TORCH_CHECK_VALUE(rope_cos.sizes() == rope_sin.sizes(), kWho, ": rope_cos ", rope_cos.sizes(),
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

namespace {
// Sequence capacity is rounded up to a multiple of 128 positions (so a run of similar requests,
// or a step past the end, does not reallocate every time); batch capacity is the request's own
// batch (batches are few and known). Both are capped at the limits.
constexpr int64_t kSeqRound = 128;
int64_t round_seq(int64_t n, int64_t limit) {
  const int64_t r = n > INT64_MAX - kSeqRound ? n : (n + kSeqRound - 1) / kSeqRound * kSeqRound;
  return std::min(r, limit);
}
}  // namespace

#ifndef EMU_FAST_WITH_CUDA
int64_t EmuDecoder::graph_bytes() const { return 0; }
int64_t cuda_free_bytes(const at::Device&) { return -1; }
#else
int64_t cuda_free_bytes(const at::Device& device);  // cuda/decoder_graph.cpp
#endif


void EmuDecoder::rebuild_step_locked() {
  graphs_.clear();  // captured graphs hold the old cache and table addresses
  const bool ours = kernels_ == &custom_kernels();
  for (size_t i = 0; i < segs_.size(); ++i) {
    Segment& seg = segs_[i];
    // The fused CPU step covers the head too when the head sits with the last segment.
    seg.fused_head = i + 1 == segs_.size() && seg.device == output_device();
    seg.fused = nullptr;
    if (!ours || cap_batch_ == 0 || cap_seq_ == 0) continue;
    const std::vector<DecoderLayerWeights> layers(layers_.begin() + seg.begin, layers_.begin() + seg.end);
    const std::vector<at::Tensor> kc(k_cache_.begin() + seg.begin, k_cache_.begin() + seg.end);
    const std::vector<at::Tensor> vc(v_cache_.begin() + seg.begin, v_cache_.begin() + seg.end);
    seg.fused = cpu::make_fused_step(layers, kc, vc, final_norm_, seg.fused_head ? head_ : at::Tensor(), up_,
                                     seg.rope_cos, seg.rope_sin, num_heads_, num_kv_heads_, eps_, quant_);
  }
}

void EmuDecoder::reserve(int64_t batch, int64_t seq_len) {
  const std::lock_guard<std::mutex> lock(mutex_);
  const c10::NoGradGuard no_grad;
  TORCH_CHECK_VALUE(batch >= 0 && seq_len >= 0, kWho, ".reserve: batch and seq_len must be >= 0, got ", batch,
                    " and ", seq_len);
  TORCH_CHECK_VALUE(batch <= max_batch_, kWho, ".reserve: batch of ", batch, " exceeds the decoder's max_batch of ",
                    max_batch_);
  TORCH_CHECK_VALUE(seq_len <= max_seq_len_, kWho, ".reserve: ", seq_len,
                    " positions exceed the decoder's max_seq_len of ", max_seq_len_);
  grow_locked(batch, seq_len, true);
  int64_t positions = 0;
  for (int64_t b = 0; b < batch_; ++b) positions = std::max(positions, starts_[b] + lengths_[b]);
  ensure_rope_locked("emu_fast.EmuDecoder.reserve", std::max(positions, seq_len));
}

void EmuDecoder::set_caches_locked(std::vector<at::Tensor> kv) {
  k_cache_.clear();
  v_cache_.clear();
  for (size_t i = 0; i < segs_.size(); ++i) {
    segs_[i].kv = std::move(kv[i]);
    for (int64_t l = 0; l < segs_[i].end - segs_[i].begin; ++l) {
      k_cache_.push_back(segs_[i].kv[l][0]);
      v_cache_.push_back(segs_[i].kv[l][1]);
    }
  }
}

void EmuDecoder::set_rope_locked(const at::Tensor& cos, const at::Tensor& sin) {
  rope_cos_ = cos.clone(at::MemoryFormat::Contiguous);
  rope_sin_ = sin.clone(at::MemoryFormat::Contiguous);
  for (Segment& seg : segs_) {
    seg.rope_cos = rope_cos_.to(seg.device);  // the same tensor where the device is the same
    seg.rope_sin = rope_sin_.to(seg.device);
  }
}

void EmuDecoder::grow_locked(int64_t batch, int64_t seq_len, bool keep) {
  if (batch <= cap_batch_ && seq_len <= cap_seq_) return;
  const int64_t B = std::max(batch, cap_batch_);
  const int64_t S = std::max(round_seq(seq_len, max_seq_len_), cap_seq_);
  const int64_t D = head_dim_, Hkv = num_kv_heads_;
  const double elems = static_cast<double>(num_layers()) * 2 * B * Hkv * S * D;
  TORCH_CHECK_VALUE(elems < 9.0e18 / 8, kWho, ": a KV cache for batch ", B, " x seq_len ", S,
                    " is too large to address");
  const int64_t per_layer = 2 * B * Hkv * S * D * static_cast<int64_t>(final_norm_.element_size());
  if (!keep || batch_ == 0) {
    // Nothing to carry over: free the old caches first so the new ones can reuse their memory.
    // The decoder stays consistent (empty caches, no batch) if an allocation below fails.
    reset_locked();
    graphs_.clear();
    std::vector<at::Tensor> empty;
    for (const Segment& seg : segs_)
      empty.push_back(at::empty({seg.end - seg.begin, 2, cap_batch_, Hkv, 0, D}, final_norm_.options().device(seg.device)));
    set_caches_locked(std::move(empty));
    cap_seq_ = 0;
    rebuild_step_locked();
  }
  // Captured graphs hold the old caches' addresses (rebuilt below in any case) and private
  // memory pools that the free-memory check would count as free: drop them first.
  graphs_.clear();
  std::vector<at::Tensor> caches;
  for (const Segment& seg : segs_) {
    const int64_t bytes = per_layer * (seg.end - seg.begin);
    if (seg.device.is_cuda()) {
      // What this device's other segments already took in this loop counts against it too.
      int64_t taken = 0;
      for (size_t j = 0; j < caches.size(); ++j)
        if (segs_[j].device == seg.device) taken += caches[j].numel() * caches[j].element_size();
      const int64_t free = cuda_free_bytes(seg.device);
      TORCH_CHECK_VALUE(free < 0 || bytes <= free, kWho, ": the KV cache for batch ", B, " x seq_len ", S, " needs ",
                        bytes, " bytes on ", seg.device, " (layers ", seg.begin, "-", seg.end - 1, ") but only ",
                        free, " bytes are free there", taken > 0 ? " after this decoder's other layers" : "",
                        " (set max_batch / max_seq_len, or send smaller requests)");
    }
    try {
      caches.push_back(at::empty({seg.end - seg.begin, 2, B, Hkv, S, D}, final_norm_.options().device(seg.device)));
    } catch (const c10::Error& e) {
      TORCH_CHECK_VALUE(false, kWho, ": cannot allocate the KV cache (", bytes, " bytes on ", seg.device,
                        " for batch ", B, " x seq_len ", S, "): ", e.what_without_backtrace());
    }
  }
  if (keep && batch_ > 0) {
    // Growing mid-sequence: the active rows' cached keys/values carry over unchanged.
    int64_t used = 0;
    for (int64_t b = 0; b < batch_; ++b) used = std::max(used, lengths_[b]);
    if (used > 0)
      for (size_t i = 0; i < segs_.size(); ++i)
        caches[i].narrow(2, 0, batch_).narrow(4, 0, used).copy_(segs_[i].kv.narrow(2, 0, batch_).narrow(4, 0, used));
  }
  set_caches_locked(std::move(caches));
  if (B > cap_batch_) {
    lengths_.resize(B, 0);
    starts_.resize(B, 0);
    for (Segment& seg : segs_) {
      at::Tensor lens = at::zeros({B}, seg.lengths_dev.options()), sts = at::zeros_like(lens);
      lens.narrow(0, 0, cap_batch_).copy_(seg.lengths_dev);
      sts.narrow(0, 0, cap_batch_).copy_(seg.starts_dev);
      seg.lengths_dev = lens;
      seg.starts_dev = sts;
      seg.split_counters = at::zeros({B * num_kv_heads_}, seg.split_counters.options());
    }
  }
  cap_batch_ = B;
  cap_seq_ = S;
  rebuild_step_locked();
}

void EmuDecoder::ensure_rope_locked(const char* who, int64_t positions) {
  if (positions <= rope_cos_.size(0)) return;
  TORCH_CHECK_VALUE(static_cast<bool>(rope_fn_), who, ": needs RoPE tables for ", positions,
                    " positions but the decoder was given ", rope_cos_.size(0), " (pass longer rope_cos/rope_sin)");
  // Rounded like the cache, and at least twice the tables' length before, so a run of growing
  // requests rebuilds them a few times only; never more than about twice what is needed (the
  // tables are below `positions` here). Not twice the cache's capacity: reserve(1, 2^22) built
  // tables for 2^23 positions, and several times that in the rope_fn's temporaries.
  const int64_t P = std::max(round_seq(positions, kNoLimit), 2 * rope_cos_.size(0));
  at::Tensor cos, sin;
  std::tie(cos, sin) = rope_fn_(P);
  const int64_t D = head_dim_;
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK_VALUE(t->defined() && t->dim() == 2 && t->size(0) >= positions && t->size(1) == D / 2 &&
                          t->scalar_type() == at::kFloat,
                      kWho, ": rope_fn(", P, ") must return float32 [", P, ", ", D / 2, "] tables, got ",
                      t->defined() ? t->sizes() : at::IntArrayRef{});
  set_rope_locked(cos, sin);
  rebuild_step_locked();
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

int64_t EmuDecoder::scratch_bytes() const {
  int64_t n = graph_bytes();
  auto add = [&n](const at::Tensor& t) { n += static_cast<int64_t>(t.numel()) * t.element_size(); };
  add(rope_cos_);
  add(rope_sin_);
  for (const Segment& seg : segs_) {
    if (seg.rope_cos.data_ptr() != rope_cos_.data_ptr()) {
      add(seg.rope_cos);
      add(seg.rope_sin);
    }
    add(seg.lengths_dev);
    add(seg.starts_dev);
    add(seg.split_counters);
  }
  return n;
}

at::Tensor EmuDecoder::kv_cache() const {
  TORCH_CHECK_VALUE(segs_.size() == 1, kWho, ": this decoder is split into ", segs_.size(),
                    " segments, each with its own KV cache: use kv_caches");
  return segs_.front().kv;
}

std::vector<at::Tensor> EmuDecoder::kv_caches() const {
  std::vector<at::Tensor> out;
  for (const Segment& seg : segs_) out.push_back(seg.kv);
  return out;
}

int64_t EmuDecoder::kv_cache_bytes() const {
  int64_t n = 0;
  for (const Segment& seg : segs_) n += static_cast<int64_t>(seg.kv.numel()) * seg.kv.element_size();
  return n;
}

std::vector<std::tuple<int64_t, int64_t, std::string>> EmuDecoder::segments() const {
  std::vector<std::tuple<int64_t, int64_t, std::string>> out;
  for (const Segment& seg : segs_) out.emplace_back(seg.begin, seg.end, seg.device.str());
  return out;
}

std::string EmuDecoder::kernels() const { return kernels_->name(); }

std::string EmuDecoder::fallback_reason() const { return fallback_reason_; }

std::vector<int64_t> EmuDecoder::lengths() const {
  return std::vector<int64_t>(lengths_.begin(), lengths_.begin() + batch_);
}

void EmuDecoder::reset() {
  const std::lock_guard<std::mutex> lock(mutex_);
  reset_locked();
}

void EmuDecoder::reset_locked() {
  batch_ = 0;
  std::fill(lengths_.begin(), lengths_.end(), 0);
  std::fill(starts_.begin(), starts_.end(), 0);
  for (Segment& seg : segs_) {
    seg.lengths_dev.zero_();
    seg.starts_dev.zero_();
  }
}

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

at::Tensor EmuDecoder::prefill(const at::Tensor& embeds, const at::Tensor& attention_mask) {
  const std::lock_guard<std::mutex> lock(mutex_);
  const c10::NoGradGuard no_grad;  // inference only: never chain autograd history onto the cache
  const PromptLayout prompts = parse("emu_fast.EmuDecoder.prefill", embeds, attention_mask);
  fit_prompts_locked("emu_fast.EmuDecoder.prefill", prompts, 0);
  return prefill_locked(embeds, prompts);
}

// Grows the cache and the RoPE tables for rows (starts, lens) plus `steps` decode steps after
// them: a new batch's prompts (nothing to keep: a prefill starts afresh) or the active rows.
void EmuDecoder::fit_locked(const char* who, int64_t batch, const int64_t* starts, const int64_t* lens,
                            int64_t steps, bool keep) {
  int64_t len = 0, positions = 0;
  for (int64_t b = 0; b < batch; ++b) {
    len = std::max(len, lens[b]);
    positions = std::max(positions, starts[b] + lens[b]);
  }
  grow_locked(batch, len + steps, keep);
  ensure_rope_locked(who, positions + steps);
}

void EmuDecoder::fit_prompts_locked(const char* who, const PromptLayout& prompts, int64_t steps) {
  fit_locked(who, prompts.batch, prompts.starts.data(), prompts.lens.data(), steps, false);
}

void EmuDecoder::fit_steps_locked(const char* who, int64_t steps) {
  fit_locked(who, batch_, starts_.data(), lengths_.data(), steps, true);
}

at::Tensor EmuDecoder::generate(const at::Tensor& embeds, const at::Tensor& attention_mask, int64_t n) {
  const std::lock_guard<std::mutex> lock(mutex_);
  const c10::NoGradGuard no_grad;
  TORCH_CHECK_VALUE(n >= 1, kWho, ".generate: n must be positive, got ", n);
  const PromptLayout prompts = parse("emu_fast.EmuDecoder.generate", embeds, attention_mask);
  for (int64_t b = 0; b < prompts.batch; ++b)
    TORCH_CHECK_VALUE(n - 1 <= max_seq_len_ - prompts.lens[b], kWho, ".generate: prompt ", b, " of ",
                      prompts.lens[b], " tokens plus ", n - 1, " generated embeddings exceeds the decoder's max_seq_len of ",
                      max_seq_len_);
  fit_prompts_locked("emu_fast.EmuDecoder.generate", prompts, n - 1);
  at::Tensor result = at::empty({prompts.batch, n, output_size()}, final_norm_.options());
  const at::Tensor first = prefill_locked(embeds, prompts);
  result.select(1, 0).copy_(first);
  if (n > 1) decode_into(first, result.narrow(1, 1, n - 1));
  return result;
}

at::Tensor EmuDecoder::prefill_locked(const at::Tensor& embeds, const PromptLayout& prompts) {
  const int64_t B = prompts.batch, H = hidden_, D = head_dim_;
  const std::vector<int64_t>& starts = prompts.starts;
  const std::vector<int64_t>& lens = prompts.lens;
  reset_locked();
  // Prefill is GEMM-bound; its glue (norms, SiLU, the head) runs on our kernels only when they
  // were asked for by name. In "auto" mode it is ATen's: it runs before any self-check, and a
  // wrong kernel here would poison the cache every later step reads.
  const StepKernels& k = mode_ == "custom" ? custom_kernels() : aten_kernels();

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
      const at::Tensor x = k.rms_norm(h, w.input_norm, eps_);
      const at::Tensor qkv = prefill_linear(x, w.qkv, w.qkv_scales).view({B, L, Hq + 2 * Hkv, D});
      const at::Tensor q = rope_prefill(qkv.narrow(2, 0, Hq), cos, sin).transpose(1, 2);
      const at::Tensor kk = rope_prefill(qkv.narrow(2, Hq, Hkv), cos, sin).transpose(1, 2);
      const at::Tensor v = qkv.narrow(2, Hq + Hkv, Hkv).transpose(1, 2);
      k_cache_[l].narrow(0, 0, B).narrow(2, 0, L).copy_(kk);
      v_cache_[l].narrow(0, 0, B).narrow(2, 0, L).copy_(v);
      const at::Tensor kx = Hq == Hkv ? kk : kk.repeat_interleave(Hq / Hkv, 1);
      const at::Tensor vx = Hq == Hkv ? v : v.repeat_interleave(Hq / Hkv, 1);
      const at::Tensor o = unpadded ? at::scaled_dot_product_attention(q, kx, vx, {}, 0.0, true, scale)
                                    : at::scaled_dot_product_attention(q, kx, vx, attn_mask, 0.0, false, scale);
      h = h + prefill_linear(o.transpose(1, 2).reshape({B * L, Hq * D}), w.o, w.o_scales);
      const at::Tensor y = k.rms_norm(h, w.post_norm, eps_);
      h = h + prefill_linear(k.silu_mul(prefill_linear(y, w.gate_up, w.gate_up_scales)), w.down, w.down_scales);
    }
    seg.lengths_dev.narrow(0, 0, B).copy_(lens_host);
    seg.starts_dev.narrow(0, 0, B).copy_(starts_host);
  }
  const at::Device out_dev = output_device();
  const at::Tensor last = h.to(out_dev).view({B, L, H}).index(
      {at::arange(B, i64.device(out_dev)), (lens_host - 1).to(out_dev)});
  const at::Tensor out = std::get<0>(k.regression_head(last, final_norm_, eps_, head_, up_));

  batch_ = B;
  for (int64_t b = 0; b < B; ++b) {
    lengths_[b] = lens[b];
    starts_[b] = starts[b];
  }
  return out;
}

void EmuDecoder::check_step_input(const at::Tensor& prev, const char* who, int64_t steps) const {
  TORCH_CHECK_VALUE(batch_ > 0, kWho, ".", who, ": no active batch; call prefill() first");
  const int64_t B = batch_, Dout = output_size();
  TORCH_CHECK_VALUE(prev.dim() == 2 && prev.size(0) == B && prev.size(1) == Dout, kWho, ".", who,
                    ": the previous output must be [", B, ", ", Dout, "], got ", prev.sizes());
  TORCH_CHECK_TYPE(prev.scalar_type() == final_norm_.scalar_type(), kWho, ".", who, ": the previous output is ",
                   py_dtype(prev.scalar_type()), " but the decoder's weights are ", py_dtype(final_norm_.scalar_type()));
  TORCH_CHECK_VALUE(prev.device() == output_device(), kWho, ".", who, ": the previous output is on ",
                    prev.device(), " but the decoder's outputs are on ", output_device());
  if (max_seq_len_ == kNoLimit) {
    TORCH_CHECK_VALUE(steps >= 0, kWho, ".", who, ": steps must be >= 0, got ", steps);
  } else {
    TORCH_CHECK_VALUE(steps >= 0 && steps <= max_seq_len_, kWho, ".", who, ": steps must be in [0, max_seq_len = ",
                      max_seq_len_, "], got ", steps);
  }
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(steps <= max_seq_len_ - lengths_[b], kWho, ".", who, ": sequence ", b, " holds ", lengths_[b],
                      " tokens; ", steps, " more step(s) would pass the decoder's max_seq_len of ", max_seq_len_,
                      steps == 1 ? " (no room for another step)" : "");
}

// The next step's input: the previous output itself (Emu1) or its project_up (Emu2), always
// computed from prev's current contents (one small GEMV). Nothing is cached across calls: the
// caller's tensor may have been written in ways no version counter sees (.numpy(), .data).
at::Tensor EmuDecoder::next_input(const at::Tensor& prev) {
  if (!up_.has_value()) return prev.contiguous();
  return kernels_->gemv(prev.contiguous(), *up_);
}

std::tuple<at::Tensor, at::Tensor> EmuDecoder::run_step(const at::Tensor& x) {
  return run_step_with(x, *kernels_, fused_cpu_step_);
}

std::tuple<at::Tensor, at::Tensor> EmuDecoder::run_step_with(const at::Tensor& x, const StepKernels& k, bool fused) {
  // On the CPU each segment runs in one parallel region (cpu/decode_step.cpp); elsewhere op by
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
    return k.regression_head(h.to(output_device()), final_norm_, eps_, head_, up_);
  }
  at::Tensor h = x;
  std::tuple<at::Tensor, at::Tensor> result;
  for (const Part& part : parts_) {
    result = run_part(part, k, h.to(part.device));
    h = std::get<0>(result);
  }
  return result;
}

std::tuple<at::Tensor, at::Tensor> EmuDecoder::run_part(const Part& part, const StepKernels& k, at::Tensor h) {
  for (size_t i = part.first_seg; i < part.end_seg; ++i) h = run_layers(segs_[i], k, h);
  if (!part.head) return {h, at::Tensor()};
  return k.regression_head(h, final_norm_, eps_, head_, up_);
}

at::Tensor EmuDecoder::prefill_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) const {
  if (quant_.bits == 0) return at::linear(x, w);
  return at::linear(x, dequantize_weight(w, scales, quant_.bits, quant_.group_size, x.size(-1), x.scalar_type()));
}

at::Tensor EmuDecoder::attend(Segment& seg, const StepKernels& k, int64_t l, const at::Tensor& qkv,
                              const at::Tensor& lens, const at::Tensor& positions) {
  const int64_t B = qkv.size(0), Hq = num_heads_, Hkv = num_kv_heads_, D = head_dim_;
  const at::Tensor q = qkv.narrow(1, 0, Hq * D).view({B, Hq, D});
  const at::Tensor kk = qkv.narrow(1, Hq * D, Hkv * D).view({B, Hkv, D});
  const at::Tensor v = qkv.narrow(1, (Hq + Hkv) * D, Hkv * D).view({B, Hkv, D});
  return k.decode_attention(q, kk, v, k_cache_[l], v_cache_[l], lens, positions, seg.rope_cos, seg.rope_sin,
                            1.0 / std::sqrt(static_cast<double>(D)), seg.split_counters);
}

at::Tensor EmuDecoder::run_layers(Segment& seg, const StepKernels& k, at::Tensor h) {
  if (quant_.bits != 0) return run_layers_quantized(seg, k, h);
  const int64_t B = h.size(0), Hq = num_heads_, D = head_dim_;
  const at::Tensor lens = seg.lengths_dev.narrow(0, 0, B);
  const at::Tensor positions = seg.starts_dev.narrow(0, 0, B) + lens;
  // Per layer: the norms in the QKV and gate/up projections' prologue, SiLU * mul in the gate/up
  // projection's epilogue, the residual adds in the o and down projections' epilogue (rounded as
  // the fused CPU step rounds them: the projection, then the sum), so h is the residual stream
  // after every sub-layer.
  for (int64_t l = seg.begin; l < seg.end; ++l) {
    const auto& w = layers_[l];
    const at::Tensor qkv = k.norm_gemv(h, w.input_norm, eps_, w.qkv);  // [B, (Hq + 2 Hkv) D]
    const at::Tensor attn = attend(seg, k, l, qkv, lens, positions);
    h = k.gemv_add(attn.view({B, Hq * D}), w.o, h);
    h = k.gemv_add(k.norm_gemv_silu(h, w.post_norm, eps_, w.gate_up), w.down, h);
  }
  seg.lengths_dev.narrow(0, 0, B).add_(1);
  return h;
}

at::Tensor EmuDecoder::run_layers_quantized(Segment& seg, const StepKernels& k, at::Tensor h) {
  const int64_t B = h.size(0), Hq = num_heads_, D = head_dim_;
  const at::Tensor lens = seg.lengths_dev.narrow(0, 0, B);
  const at::Tensor positions = seg.starts_dev.narrow(0, 0, B) + lens;
  auto proj = [&](const at::Tensor& x, const at::Tensor& q, const at::Tensor& s) {
    return k.gemv_quantized(x, q, s, quant_.bits, quant_.group_size);
  };
  // Composed from our ops as the fused CPU step runs (cpu/decode_step.cpp), rounding for
  // rounding: each projection's output is rounded to the dtype (the GEMV op's result) and joins
  // the residual stream in the next add_rms_norm, which rounds the sum, then normalizes it.
  // `branch` is the projection not yet added (the previous layer's down, the o projection).
  at::Tensor branch;
  for (int64_t l = seg.begin; l < seg.end; ++l) {
    const auto& w = layers_[l];
    at::Tensor xn;
    if (branch.defined()) {
      std::tie(xn, h) = k.add_rms_norm(branch, h, w.input_norm, eps_);
    } else {
      xn = k.rms_norm(h, w.input_norm, eps_);
    }
    const at::Tensor qkv = proj(xn, w.qkv, w.qkv_scales);  // [B, (Hq + 2 Hkv) D]
    const at::Tensor attn = attend(seg, k, l, qkv, lens, positions);
    branch = proj(attn.view({B, Hq * D}), w.o, w.o_scales);
    std::tie(xn, h) = k.add_rms_norm(branch, h, w.post_norm, eps_);
    branch = proj(k.silu_mul(proj(xn, w.gate_up, w.gate_up_scales)), w.down, w.down_scales);
  }
  seg.lengths_dev.narrow(0, 0, B).add_(1);
  // The last add, rounded once as the fused step rounds it (float32 sum of the two, to the dtype).
  return at::add(h, branch);
}

void EmuDecoder::rewind_lengths_locked(int64_t batch) {
  for (Segment& seg : segs_) seg.lengths_dev.narrow(0, 0, batch).sub_(1);
}

namespace {
// The process-wide quantized-input setting (set_quantized_activations) as a bit: a step checked
// under one setting says nothing about the CPU quantized GEMVs under another, so each is checked.
uint8_t setting_bit(std::optional<kernels::QuantizedInput> forced) {
  return static_cast<uint8_t>(1u << (forced ? 1 + static_cast<int>(*forced) : 0));
}
uint8_t input_setting_bit() { return setting_bit(kernels::quantized_input_override()); }
}  // namespace

bool EmuDecoder::self_check_due(int64_t batch) const {
  return mode_ == "auto" && kernels_ == &custom_kernels() &&
         (static_cast<size_t>(batch) >= self_checked_.size() || !(self_checked_[batch] & input_setting_bit())) &&
         self_check_enabled();
}

void EmuDecoder::fall_back_locked(const std::string& reason) {
  fallback_reason_ = reason;
  kernels_ = &aten_kernels();
  rebuild_step_locked();  // drops the fused CPU steps and the captured graphs
}

std::tuple<at::Tensor, at::Tensor> EmuDecoder::checked_step(const at::Tensor& prev) {
  const int64_t B = prev.size(0);
  const bool fused = fused_cpu_step_ && segs_.front().fused != nullptr;
  // The step through CheckedKernels first: every op ours and ATen's on the same inputs, ATen's
  // result carried on, so what comes out is the ATen step's. Then, from the same cache, our step
  // as it runs for real (the fused CPU step, or op by op): it writes its cache entries last, so
  // a passing check leaves the decoder exactly as an unchecked step would.
  const double bound = self_check_bound(final_norm_.scalar_type());
  const uint64_t generation = kernels::quantized_input_generation();  // before the setting is read
  const auto forced = kernels::quantized_input_override();
  const uint8_t setting = setting_bit(forced);
  const CheckedKernels checked(bound);
  const at::Tensor x_ref = up_.has_value() ? checked.gemv(prev.contiguous(), *up_) : prev.contiguous();
  const auto ref = run_step_with(x_ref, checked, /*fused=*/false);
  rewind_lengths_locked(B);
  const bool flip = test_fault("flip_quantized_input");  // what another thread may do meanwhile
  if (flip) kernels::set_quantized_input_override(kernels::QuantizedInput::kInt8);
  auto ours = run_step(next_input(prev));
  if (flip) kernels::set_quantized_input_override(forced);
  double op_error = 0.0;
  const std::string op = checked.worst_op(&op_error);
  const double step_error = std::max(relative_error(std::get<0>(ours), std::get<0>(ref)),
                                     relative_error(std::get<1>(ours), std::get<1>(ref)));
  // Under int8 activations (set_quantized_activations, the CPU kernels) the whole step is held
  // more loosely than each op: the ops agree to float32 rounding (checked at `bound` above), but a
  // last-bit difference between the two steps' float32 sums can flip one input's int8 rounding,
  // a whole step (max / 127) of its block: up to 1.6e-3 seen on tiny random models. A wrong
  // kernel is off by order one.
  const bool int8_inputs =
      quant_.bits != 0 && segs_.front().device.is_cpu() && forced == kernels::QuantizedInput::kInt8;
  const double step_bound = int8_inputs ? std::max(bound, 2e-2) : bound;
  // The setting was set (from another thread) while the two steps ran, even if set back to what
  // it was: they may have taken different inputs, which says nothing about the kernels. Ours
  // stands, unchecked; the next step of this batch size checks again.
  if (kernels::quantized_input_generation() != generation) return ours;
  if (op.empty() && step_error <= step_bound) {
    if (self_checked_.size() <= static_cast<size_t>(B)) self_checked_.resize(B + 1, 0);
    self_checked_[B] |= setting;
    return ours;
  }
  std::ostringstream why;
  why << "emu_fast: self-check failed at batch size " << B << ": ";
  if (!op.empty()) {
    why << "the custom " << op << " kernel disagrees with ATen (relative error " << op_error;
  } else {
    why << "the " << (fused ? "fused CPU decode step" : "decode step")
        << " disagrees with the ATen step although each op agrees (relative error " << step_error;
  }
  why << " > " << (op.empty() ? step_bound : bound) << " for " << py_dtype(final_norm_.scalar_type()) << ") on "
      << segs_.front().device << ". This decoder now runs the ATen step (same results, slower). Please report "
      << "this with your GPU, driver and torch versions; EMU_FAST_SELF_CHECK=0 skips the check.";
  fall_back_locked(why.str());
  // Our step's cache entries may be wrong: the ATen step once more, from the same cache.
  rewind_lengths_locked(B);
  return run_step(x_ref);
}

at::Tensor EmuDecoder::step(const at::Tensor& prev) {
  const std::lock_guard<std::mutex> lock(mutex_);
  const c10::NoGradGuard no_grad;
  check_step_input(prev, "step", 1);
  fit_steps_locked("emu_fast.EmuDecoder.step", 1);
  at::Tensor out = std::get<0>(self_check_due(batch_) ? checked_step(prev) : run_step(next_input(prev)));
  for (int64_t b = 0; b < batch_; ++b) lengths_[b] += 1;
  return out;
}

at::Tensor EmuDecoder::decode(const at::Tensor& prev, int64_t steps) {
  const std::lock_guard<std::mutex> lock(mutex_);
  const c10::NoGradGuard no_grad;
  check_step_input(prev, "decode", steps);
  fit_steps_locked("emu_fast.EmuDecoder.decode", steps);
  at::Tensor result = at::empty({batch_, steps, output_size()}, prev.options());
  if (steps > 0) decode_into(prev, result);
  return result;
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
    x = up_.has_value() ? kernels_->gemv(last, *up_) : last;
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
