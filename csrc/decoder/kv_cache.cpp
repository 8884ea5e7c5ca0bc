// The KV cache and the RoPE tables: sized to the requests (grown, never guessed), the active rows
// copied over on growth, per-segment copies, and what they cost in bytes.
#include "decoder/decoder.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "decoder/cpu_fused_step.h"
#include "decoder/prompt_mask.h"
#include "ops/checks.h"
#include "ops/op_set.h"

namespace emu_fast {

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
int64_t cuda_free_bytes(const at::Device& device);  // cuda_graphs.cpp
#endif

void EmuDecoder::reserve(int64_t batch, int64_t seq_len) {
  const std::lock_guard<std::mutex> lock(mutex_);
  const c10::NoGradGuard no_grad;
  TORCH_CHECK_VALUE(batch >= 0 && seq_len >= 0, kDecoderName, ".reserve: batch and seq_len must be >= 0, got ", batch,
                    " and ", seq_len);
  TORCH_CHECK_VALUE(batch <= max_batch_, kDecoderName, ".reserve: batch of ", batch, " exceeds the decoder's max_batch of ",
                    max_batch_);
  TORCH_CHECK_VALUE(seq_len <= max_seq_len_, kDecoderName, ".reserve: ", seq_len,
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
  TORCH_CHECK_VALUE(elems < 9.0e18 / 8, kDecoderName, ": a KV cache for batch ", B, " x seq_len ", S,
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
      TORCH_CHECK_VALUE(free < 0 || bytes <= free, kDecoderName, ": the KV cache for batch ", B, " x seq_len ", S, " needs ",
                        bytes, " bytes on ", seg.device, " (layers ", seg.begin, "-", seg.end - 1, ") but only ",
                        free, " bytes are free there", taken > 0 ? " after this decoder's other layers" : "",
                        " (set max_batch / max_seq_len, or send smaller requests)");
    }
    try {
      caches.push_back(at::empty({seg.end - seg.begin, 2, B, Hkv, S, D}, final_norm_.options().device(seg.device)));
    } catch (const c10::Error& e) {
      TORCH_CHECK_VALUE(false, kDecoderName, ": cannot allocate the KV cache (", bytes, " bytes on ", seg.device,
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
                      kDecoderName, ": rope_fn(", P, ") must return float32 [", P, ", ", D / 2, "] tables, got ",
                      t->defined() ? t->sizes() : at::IntArrayRef{});
  set_rope_locked(cos, sin);
  rebuild_step_locked();
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
  TORCH_CHECK_VALUE(segs_.size() == 1, kDecoderName, ": this decoder is split into ", segs_.size(),
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

void EmuDecoder::rewind_lengths_locked(int64_t batch) {
  for (Segment& seg : segs_) seg.lengths_dev.narrow(0, 0, batch).sub_(1);
}

}  // namespace emu_fast
