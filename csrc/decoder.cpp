#include "decoder.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

#include "checks.h"
#include "cpu/fused_step.h"
#include "prompt_mask.h"

namespace emu_fast {
namespace {

constexpr const char* kWho = "emu_fast.EmuDecoder";

}  // namespace

// The emu_fast ops the decoder's prefill and op-by-op step call, through the dispatcher, so each
// runs the CPU or CUDA kernel by its tensors' device (and a CUDA graph captures them).
namespace ops {
namespace {

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using T = at::Tensor;
using Pair = std::tuple<at::Tensor, at::Tensor>;

T decode_attention(const T& q, const T& k, const T& v, T& k_cache, T& v_cache, const T& cache_lens, const T& positions,
                   const T& rope_cos, const T& rope_sin, double scale) {
  static const auto op = handle<T(const T&, const T&, const T&, T&, T&, const T&, const T&, const T&, const T&, double)>(
      "emu_fast::decode_attention");
  return op.call(q, k, v, k_cache, v_cache, cache_lens, positions, rope_cos, rope_sin, scale);
}

Pair regression_head(const T& hidden, const T& norm_weight, double eps, const T& head_weight,
                     const c10::optional<T>& up_weight) {
  static const auto op =
      handle<Pair(const T&, const T&, double, const T&, const c10::optional<T>&)>("emu_fast::regression_head");
  return op.call(hidden, norm_weight, eps, head_weight, up_weight);
}

T gemv(const T& x, const T& weight) {
  static const auto op = handle<T(const T&, const T&)>("emu_fast::gemv");
  return op.call(x, weight);
}

T rms_norm(const T& x, const T& weight, double eps) {
  static const auto op = handle<T(const T&, const T&, double)>("emu_fast::rms_norm");
  return op.call(x, weight, eps);
}

Pair add_rms_norm(const T& x, const T& residual, const T& weight, double eps) {
  static const auto op = handle<Pair(const T&, const T&, const T&, double)>("emu_fast::add_rms_norm");
  return op.call(x, residual, weight, eps);
}

T silu_mul(const T& gate_up) {
  static const auto op = handle<T(const T&)>("emu_fast::silu_mul");
  return op.call(gate_up);
}

}  // namespace
}  // namespace ops

namespace {

void check_weight(const at::Tensor& t, const char* name, int64_t layer, at::IntArrayRef shape,
                  const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.defined(), kWho, ": layer ", layer, " ", name, " is missing");
  TORCH_CHECK_VALUE(t.sizes() == shape, kWho, ": layer ", layer, " ", name, " has shape ", t.sizes(),
                    ", expected ", shape);
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), kWho, ": layer ", layer, " ", name, " is ",
                   py_dtype(t.scalar_type()), " but the decoder's weights are ", py_dtype(ref.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == ref.device(), kWho, ": layer ", layer, " ", name, " is on ", t.device(),
                    " but the decoder's weights are on ", ref.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), kWho, ": layer ", layer, " ", name, " must be contiguous");
}

}  // namespace

EmuDecoder::EmuDecoder(const std::vector<std::vector<at::Tensor>>& layers, at::Tensor final_norm,
                       at::Tensor head_weight, c10::optional<at::Tensor> up_weight, int64_t num_heads,
                       int64_t num_kv_heads, double rms_eps, at::Tensor rope_cos, at::Tensor rope_sin,
                       c10::optional<int64_t> max_batch, c10::optional<int64_t> max_seq_len, RopeFn rope_fn)
    : final_norm_(std::move(final_norm)),
      head_(std::move(head_weight)),
      up_(std::move(up_weight)),
      num_heads_(num_heads),
      num_kv_heads_(num_kv_heads),
      eps_(rms_eps),
      max_batch_(max_batch.value_or(kNoLimit)),
      max_seq_len_(max_seq_len.value_or(kNoLimit)),
      rope_fn_(std::move(rope_fn)) {
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
  const at::Tensor& ref = final_norm_;
  const auto st = ref.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, kWho,
                   ": weights must be float32, bfloat16 or float16, got ", py_dtype(st));
  TORCH_CHECK_TYPE(st != at::kHalf || !ref.device().is_cpu(), kWho,
                   ": float16 weights are supported on CUDA only; use float32 or bfloat16 on the CPU");

  const int64_t H = hidden_, D = head_dim_;
  const int64_t qkv_rows = (num_heads + 2 * num_kv_heads) * D;
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto& w = layers[l];
    const int64_t li = static_cast<int64_t>(l);
    TORCH_CHECK_VALUE(w.size() == 6, kWho, ": layer ", l,
                      " needs 6 tensors [input_norm, qkv, o, post_norm, gate_up, down], got ", w.size());
    TORCH_CHECK_VALUE(w[4].defined() && w[4].dim() == 2 && w[4].size(0) % 2 == 0, kWho, ": layer ", l,
                      " gate_up must be [2*intermediate, hidden]");
    const int64_t I = w[4].size(0) / 2;
    TORCH_CHECK_VALUE(l == 0 || I == layers_[0].down.size(1), kWho, ": layer ", l, " has intermediate size ", I,
                      " but layer 0 has ", layers_.empty() ? 0 : layers_[0].down.size(1), "; LLaMA's are all equal");
    check_weight(w[0], "input_norm", li, {H}, ref);
    check_weight(w[1], "qkv", li, {qkv_rows, H}, ref);
    check_weight(w[2], "o", li, {H, num_heads * D}, ref);
    check_weight(w[3], "post_norm", li, {H}, ref);
    check_weight(w[4], "gate_up", li, {2 * I, H}, ref);
    check_weight(w[5], "down", li, {H, I}, ref);
    layers_.push_back({w[0], w[1], w[2], w[3], w[4], w[5]});
  }
  TORCH_CHECK_VALUE(head_.defined() && head_.dim() == 2, kWho, ": head_weight must be [out, hidden]");
  check_weight(head_, "head_weight", -1, {head_.size(0), H}, ref);
  if (up_.has_value()) {
    check_weight(*up_, "up_weight", -1, {H, head_.size(0)}, ref);
  } else {
    TORCH_CHECK_VALUE(head_.size(0) == H, kWho, ": without up_weight the head's output is the next input, so "
                      "head_weight must be [", H, ", ", H, "], got ", head_.sizes());
  }

  if (ref.is_cuda()) check_cuda_attention_limits(kWho, D, num_heads / num_kv_heads);
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
    TORCH_CHECK_VALUE(t->device() == ref.device(), kWho, ": ", name, " is on ", t->device(),
                      " but the decoder's weights are on ", ref.device());
  }
  TORCH_CHECK_VALUE(rope_cos.sizes() == rope_sin.sizes(), kWho, ": rope_cos ", rope_cos.sizes(),
                    " and rope_sin ", rope_sin.sizes(), " differ in shape");
  rope_cos_ = rope_cos.clone(at::MemoryFormat::Contiguous);  // its own copy: the caller's may change
  rope_sin_ = rope_sin.clone(at::MemoryFormat::Contiguous);
  // No capacity guessing: the cache starts empty and grows to what requests need.
  set_cache_locked(at::empty({num_layers(), 2, 0, num_kv_heads, 0, D}, ref.options()));
  lengths_dev_ = at::zeros({0}, ref.options().dtype(at::kLong));
  starts_dev_ = at::zeros({0}, ref.options().dtype(at::kLong));
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
  fused_ = cap_batch_ > 0 && cap_seq_ > 0
               ? cpu::make_fused_step(layers_, k_cache_, v_cache_, final_norm_, head_, up_, rope_cos_, rope_sin_,
                                      num_heads_, num_kv_heads_, eps_)
               : nullptr;
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

void EmuDecoder::set_cache_locked(at::Tensor kv) {
  kv_ = std::move(kv);
  k_cache_.clear();
  v_cache_.clear();
  for (int64_t l = 0; l < num_layers(); ++l) {
    k_cache_.push_back(kv_[l][0]);
    v_cache_.push_back(kv_[l][1]);
  }
}

void EmuDecoder::grow_locked(int64_t batch, int64_t seq_len, bool keep) {
  if (batch <= cap_batch_ && seq_len <= cap_seq_) return;
  const int64_t B = std::max(batch, cap_batch_);
  const int64_t S = std::max(round_seq(seq_len, max_seq_len_), cap_seq_);
  const int64_t D = head_dim_, Hkv = num_kv_heads_;
  const at::Tensor& ref = final_norm_;
  const double elems = static_cast<double>(num_layers()) * 2 * B * Hkv * S * D;
  TORCH_CHECK_VALUE(elems < 9.0e18 / 8, kWho, ": a KV cache for batch ", B, " x seq_len ", S,
                    " is too large to address");
  const int64_t bytes = static_cast<int64_t>(elems) * ref.element_size();
  if (!keep || batch_ == 0) {
    // Nothing to carry over: free the old cache first so the new one can reuse its memory. The
    // decoder stays consistent (an empty cache, no batch) if the allocation below fails.
    reset_locked();
    fused_ = nullptr;
    graphs_.clear();
    set_cache_locked(at::empty({num_layers(), 2, cap_batch_, Hkv, 0, D}, ref.options()));
    cap_seq_ = 0;
  }
  if (ref.is_cuda()) {
    const int64_t free = cuda_free_bytes(ref.device());
    TORCH_CHECK_VALUE(free < 0 || bytes <= free, kWho, ": the KV cache for batch ", B, " x seq_len ", S, " needs ",
                      bytes, " bytes but only ", free, " bytes are free on ", ref.device(),
                      " (set max_batch / max_seq_len, or send smaller requests)");
  }
  at::Tensor kv;
  try {
    kv = at::empty({num_layers(), 2, B, Hkv, S, D}, ref.options());
  } catch (const c10::Error& e) {
    TORCH_CHECK_VALUE(false, kWho, ": cannot allocate the KV cache (", bytes, " bytes for batch ", B, " x seq_len ",
                      S, "): ", e.what_without_backtrace());
  }
  if (kv_.defined() && batch_ > 0) {
    // Growing mid-sequence: the active rows' cached keys/values carry over unchanged.
    int64_t used = 0;
    for (int64_t b = 0; b < batch_; ++b) used = std::max(used, lengths_[b]);
    if (used > 0)
      kv.narrow(2, 0, batch_).narrow(4, 0, used).copy_(kv_.narrow(2, 0, batch_).narrow(4, 0, used));
  }
  set_cache_locked(kv);
  if (B > cap_batch_) {
    lengths_.resize(B, 0);
    starts_.resize(B, 0);
    at::Tensor lens = at::zeros({B}, ref.options().dtype(at::kLong)), sts = at::zeros_like(lens);
    lens.narrow(0, 0, cap_batch_).copy_(lengths_dev_);
    sts.narrow(0, 0, cap_batch_).copy_(starts_dev_);
    lengths_dev_ = lens;
    starts_dev_ = sts;
  }
  cap_batch_ = B;
  cap_seq_ = S;
  rebuild_step_locked();
}

void EmuDecoder::ensure_rope_locked(const char* who, int64_t positions) {
  if (positions <= rope_cos_.size(0)) return;
  TORCH_CHECK_VALUE(static_cast<bool>(rope_fn_), who, ": needs RoPE tables for ", positions,
                    " positions but the decoder was given ", rope_cos_.size(0), " (pass longer rope_cos/rope_sin)");
  // Rounded like the cache, and at least twice its length (a prompt's padding plus its steps),
  // so tables are rarely rebuilt.
  const int64_t P = std::max(round_seq(positions, kNoLimit), 2 * cap_seq_);
  at::Tensor cos, sin;
  std::tie(cos, sin) = rope_fn_(P);
  const int64_t D = head_dim_;
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK_VALUE(t->defined() && t->dim() == 2 && t->size(0) >= positions && t->size(1) == D / 2 &&
                          t->scalar_type() == at::kFloat && t->device() == final_norm_.device(),
                      kWho, ": rope_fn(", P, ") must return float32 [", P, ", ", D / 2, "] tables on ",
                      final_norm_.device(), ", got ", t->defined() ? t->sizes() : at::IntArrayRef{});
  rope_cos_ = cos.clone(at::MemoryFormat::Contiguous);
  rope_sin_ = sin.clone(at::MemoryFormat::Contiguous);
  rebuild_step_locked();
}

int64_t EmuDecoder::weight_bytes() const {
  int64_t n = 0;
  auto add = [&n](const at::Tensor& t) { n += static_cast<int64_t>(t.numel()) * t.element_size(); };
  for (const auto& w : layers_)
    for (const auto* t : {&w.input_norm, &w.qkv, &w.o, &w.post_norm, &w.gate_up, &w.down}) add(*t);
  add(final_norm_);
  add(head_);
  if (up_.has_value()) add(*up_);
  return n;
}

int64_t EmuDecoder::scratch_bytes() const {
  int64_t n = graph_bytes();
  for (const auto* t : {&rope_cos_, &rope_sin_, &lengths_dev_, &starts_dev_})
    n += static_cast<int64_t>(t->numel()) * t->element_size();
  return n;
}

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
  lengths_dev_.zero_();
  starts_dev_.zero_();
}

// x [B, T, heads, D] rotated by cos/sin [B, T, 1, D/2], in float32, back to x's dtype.
at::Tensor EmuDecoder::rope_prefill(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) const {
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor x1 = xf.narrow(-1, 0, head_dim_ / 2), x2 = xf.narrow(-1, head_dim_ / 2, head_dim_ / 2);
  return at::cat({x1 * cos - x2 * sin, x2 * cos + x1 * sin}, -1).to(x.scalar_type());
}

PromptLayout EmuDecoder::parse(const char* who, const at::Tensor& embeds, const at::Tensor& attention_mask) const {
  return parse_prompts(who, embeds, attention_mask,
                       {hidden_, max_batch_, max_seq_len_, final_norm_.scalar_type(), final_norm_.device()});
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
  at::Tensor result = at::empty({prompts.batch, n, output_size()}, embeds.options());
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

  // --- Lay each prompt's valid tokens out from index 0 (the cache's layout), RoPE positions
  // starting at its left padding so the arithmetic is upstream's.
  const int64_t L = *std::max_element(lens.begin(), lens.end());
  const auto dev = embeds.device();
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  const at::Tensor starts_t = at::tensor(starts, i64).to(dev), lens_t = at::tensor(lens, i64).to(dev);
  const at::Tensor offs = at::arange(L, i64.device(dev));
  // Rows past a prompt's end repeat its last token; the key mask hides them.
  const at::Tensor src = starts_t.unsqueeze(1) + at::minimum(offs.unsqueeze(0), lens_t.unsqueeze(1) - 1);
  at::Tensor h = embeds.gather(1, src.unsqueeze(-1).expand({B, L, H})).reshape({B * L, H});
  const at::Tensor cos = rope_cos_.index_select(0, src.reshape(-1)).view({B, L, 1, D / 2});
  const at::Tensor sin = rope_sin_.index_select(0, src.reshape(-1)).view({B, L, 1, D / 2});
  // With no padding the mask is plain causal: is_causal lets SDPA pick its flash kernel, which
  // takes no explicit mask.
  const bool unpadded = std::all_of(lens.begin(), lens.end(), [L](int64_t n) { return n == L; });
  at::Tensor attn_mask;
  if (!unpadded) {
    const at::Tensor key_valid = offs.unsqueeze(0) < lens_t.unsqueeze(1);                     // [B, L]
    const at::Tensor causal = at::ones({L, L}, i64.device(dev).dtype(at::kBool)).tril();      // [L, L]
    attn_mask = causal.unsqueeze(0).unsqueeze(0) & key_valid.view({B, 1, 1, L});
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const int64_t Hq = num_heads_, Hkv = num_kv_heads_;

  for (size_t l = 0; l < layers_.size(); ++l) {
    const auto& w = layers_[l];
    const at::Tensor x = ops::rms_norm(h, w.input_norm, eps_);
    const at::Tensor qkv = at::linear(x, w.qkv).view({B, L, Hq + 2 * Hkv, D});
    const at::Tensor q = rope_prefill(qkv.narrow(2, 0, Hq), cos, sin).transpose(1, 2);
    const at::Tensor k = rope_prefill(qkv.narrow(2, Hq, Hkv), cos, sin).transpose(1, 2);
    const at::Tensor v = qkv.narrow(2, Hq + Hkv, Hkv).transpose(1, 2);
    k_cache_[l].narrow(0, 0, B).narrow(2, 0, L).copy_(k);
    v_cache_[l].narrow(0, 0, B).narrow(2, 0, L).copy_(v);
    const at::Tensor kx = Hq == Hkv ? k : k.repeat_interleave(Hq / Hkv, 1);
    const at::Tensor vx = Hq == Hkv ? v : v.repeat_interleave(Hq / Hkv, 1);
    const at::Tensor o = unpadded ? at::scaled_dot_product_attention(q, kx, vx, {}, 0.0, true, scale)
                                  : at::scaled_dot_product_attention(q, kx, vx, attn_mask, 0.0, false, scale);
    h = h + at::linear(o.transpose(1, 2).reshape({B * L, Hq * D}), w.o);
    const at::Tensor y = ops::rms_norm(h, w.post_norm, eps_);
    h = h + at::linear(ops::silu_mul(at::linear(y, w.gate_up)), w.down);
  }
  const at::Tensor last = h.view({B, L, H}).index({at::arange(B, i64.device(dev)), lens_t - 1});
  const at::Tensor out = std::get<0>(ops::regression_head(last, final_norm_, eps_, head_, up_));

  batch_ = B;
  for (int64_t b = 0; b < B; ++b) {
    lengths_[b] = lens[b];
    starts_[b] = starts[b];
  }
  lengths_dev_.narrow(0, 0, B).copy_(lens_t);
  starts_dev_.narrow(0, 0, B).copy_(starts_t);
  return out;
}

void EmuDecoder::check_step_input(const at::Tensor& prev, const char* who, int64_t steps) const {
  TORCH_CHECK_VALUE(batch_ > 0, kWho, ".", who, ": no active batch; call prefill() first");
  const int64_t B = batch_, Dout = output_size();
  TORCH_CHECK_VALUE(prev.dim() == 2 && prev.size(0) == B && prev.size(1) == Dout, kWho, ".", who,
                    ": the previous output must be [", B, ", ", Dout, "], got ", prev.sizes());
  TORCH_CHECK_TYPE(prev.scalar_type() == final_norm_.scalar_type(), kWho, ".", who, ": the previous output is ",
                   py_dtype(prev.scalar_type()), " but the decoder's weights are ", py_dtype(final_norm_.scalar_type()));
  TORCH_CHECK_VALUE(prev.device() == final_norm_.device(), kWho, ".", who, ": the previous output is on ",
                    prev.device(), " but the decoder is on ", final_norm_.device());
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
  return ops::gemv(prev.contiguous(), *up_);
}

std::tuple<at::Tensor, at::Tensor> EmuDecoder::run_step(const at::Tensor& x) {
  // On the CPU the whole step runs in one parallel region (cpu/decode_step.cpp); elsewhere op
  // by op through the dispatcher, which on CUDA is what a graph captures.
  if (fused_ && fused_cpu_step_) {
    const int64_t B = x.size(0);
    std::vector<int64_t> positions(B);
    for (int64_t b = 0; b < B; ++b) positions[b] = starts_[b] + lengths_[b];
    at::Tensor out = at::empty({B, output_size()}, x.options());
    at::Tensor next = at::empty({B, up_.has_value() ? hidden_ : 0}, x.options());
    fused_->run(x, lengths_.data(), positions.data(), out, next);
    lengths_dev_.narrow(0, 0, B).add_(1);
    return {out, next};
  }
  const int64_t B = x.size(0), Hq = num_heads_, Hkv = num_kv_heads_, D = head_dim_;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const at::Tensor lens = lengths_dev_.narrow(0, 0, B);
  const at::Tensor positions = starts_dev_.narrow(0, 0, B) + lens;

  at::Tensor h = x, branch;  // residual stream and the last sub-layer's output not yet added
  for (size_t l = 0; l < layers_.size(); ++l) {
    const auto& w = layers_[l];
    at::Tensor xn;
    if (branch.defined()) {
      std::tie(xn, h) = ops::add_rms_norm(branch, h, w.input_norm, eps_);
    } else {
      xn = ops::rms_norm(h, w.input_norm, eps_);
    }
    const at::Tensor qkv = ops::gemv(xn, w.qkv);  // [B, (Hq + 2 Hkv) D]
    const at::Tensor q = qkv.narrow(1, 0, Hq * D).view({B, Hq, D});
    const at::Tensor k = qkv.narrow(1, Hq * D, Hkv * D).view({B, Hkv, D});
    const at::Tensor v = qkv.narrow(1, (Hq + Hkv) * D, Hkv * D).view({B, Hkv, D});
    const at::Tensor attn =
        ops::decode_attention(q, k, v, k_cache_[l], v_cache_[l], lens, positions, rope_cos_, rope_sin_, scale);
    const at::Tensor o = ops::gemv(attn.view({B, Hq * D}), w.o);
    std::tie(xn, h) = ops::add_rms_norm(o, h, w.post_norm, eps_);
    branch = ops::gemv(ops::silu_mul(ops::gemv(xn, w.gate_up)), w.down);
  }
  h = h + branch;
  auto result = ops::regression_head(h, final_norm_, eps_, head_, up_);
  lengths_dev_.narrow(0, 0, B).add_(1);
  return result;
}

at::Tensor EmuDecoder::step(const at::Tensor& prev) {
  const std::lock_guard<std::mutex> lock(mutex_);
  const c10::NoGradGuard no_grad;
  check_step_input(prev, "step", 1);
  fit_steps_locked("emu_fast.EmuDecoder.step", 1);
  at::Tensor out = std::get<0>(run_step(next_input(prev)));
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
  at::Tensor x = next_input(prev);
#ifdef EMU_FAST_WITH_CUDA
  if (prev.is_cuda() && use_cuda_graphs_ && steps > 1) return decode_with_graph(x, result);
#endif
  for (int64_t i = 0; i < steps; ++i) {
    auto [out, next] = run_step(x);
    for (int64_t b = 0; b < B; ++b) lengths_[b] += 1;
    result.select(1, i).copy_(out);
    x = up_.has_value() ? next : out;
  }
}

}  // namespace emu_fast
