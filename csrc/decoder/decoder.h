// EmuDecoder: a LLaMA decoder with a preallocated KV cache that runs Emu's causal
// image-embedding loop, one whole decoder step per call, with no Python per layer.
//
// It borrows the weights it is given (no copy): pass packed tensors (fused QKV, fused
// gate/up) that the caller's model already points at. It owns only its KV cache and its copy of
// the RoPE tables. The cache is sized to the requests: it starts empty and grows (reallocated,
// the active rows copied over) only when a request needs more batch rows or positions than it
// holds; max_batch / max_seq_len are optional upper limits, not sizes. No global state: several
// decoders may live side by side; reset() forgets the batch without reallocating.
//
// Kernels: "custom" (ours), "aten" (the portable step, ops/op_set.h: any torch device) or
// "auto" (ours where we have them, checked against ATen at first use for each batch size,
// ops/checked.h; ATen elsewhere or after a failed check).
//
// Segments: the layers may sit on several devices (a model split by Hugging Face accelerate's
// device_map). Each run of consecutive layers on one device is a segment with its own KV cache,
// lengths and RoPE tables on that device; the hidden state moves once per boundary. The
// regression head (final norm, head, up) sits on one device, where outputs are returned.
//
// Tensor parallelism (tensor_parallel.cpp): with tp_size > 1 this decoder is one rank of a
// torch.distributed group. It holds its share of every layer (q/k/v and gate/up rows of its heads
// and its slice of the MLP, the matching input columns of o and down; emu_fast/parallel shards
// them), its heads' KV cache, and the whole regression head; the partial outputs of o and down are
// summed across the ranks by an all-reduce, two a layer, so every rank holds the whole residual
// stream and returns the same outputs.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

namespace emu_fast {

namespace cpu {
class FusedStep;  // decoder/cpu_fused_step.h
}
struct PromptLayout;  // decoder/prompt_mask.h
class OpSet;    // ops/op_set.h

// What the decoder's errors call it (it is emu_fast.EmuDecoder in Python).
inline constexpr const char* kDecoderName = "emu_fast.EmuDecoder";

struct DecoderLayerWeights {
  at::Tensor input_norm;  // [H]
  at::Tensor qkv;         // [(Hq + 2 Hkv) * D, H]: q_proj, k_proj, v_proj stacked
  at::Tensor o;           // [H, Hq * D]
  at::Tensor post_norm;   // [H]
  at::Tensor gate_up;     // [2 I, H]: gate_proj, up_proj stacked
  at::Tensor down;        // [H, I]
  // Weight-only quantized projections (WeightQuant below, bits 8 or 4): qkv, o, gate_up and down
  // then hold the qweights (int8 [N, K], or uint8 [N, ceil(K / 32) * 16] for int4) and these
  // their float32 scales ([N], or [N, ceil(K / group_size)]); qkv's and gate_up's stack the
  // rows' of q/k/v and gate/up like the weights. Undefined for unquantized weights.
  at::Tensor qkv_scales, o_scales, gate_up_scales, down_scales;

  // The one place the positional list Python passes (emu_fast/layer_weights.py, LayerWeights.as_list:
  // 6 tensors, or 10 with the scales) becomes names. The caller checked its length.
  static DecoderLayerWeights from_list(const std::vector<at::Tensor>& w);
};

// How the four projections of every layer are stored (emu_fast/quant/schemes.py defines the
// schemes): bits 0 (the model's dtype), 8 (int8 per output row) or 4 (int4 in groups of
// group_size inputs). One scheme for the whole decoder; norms, the head and up stay unquantized.
struct WeightQuant {
  int64_t bits = 0;
  int64_t group_size = 0;  // int4 only
};

// Test-only: the bytes of the scratch a quantized prefill dequantizes each chunk of a weight's
// rows into (so small models take several chunks); 0 restores the default. Process-wide.
void set_prefill_chunk_bytes(int64_t bytes);

class EmuDecoder {
 public:
  // rope_fn(P) returns the model's (cos, sin) float32 [P, D/2] for positions 0..P-1; the decoder
  // calls it when its tables are too short. Empty: the tables given are all there is.
  using RopeFn = std::function<std::tuple<at::Tensor, at::Tensor>(int64_t)>;

  // layers: per layer [input_norm, qkv, o, post_norm, gate_up, down] as above; with quantized
  // weights (weight_bits 8 or 4) followed by [qkv_scales, o_scales, gate_up_scales, down_scales].
  // head_weight [Dout, H] is the regression head (Emu1 stu_regress_head, Emu2 project_down);
  // up_weight [H, Dout] maps an output back to the next input (Emu2 project_up), or none (Emu1).
  // rope_cos/rope_sin: float32 [P, D/2] for positions 0..P-1 (P may be 0 with a rope_fn, which
  // extends them as requests need: a prompt's padded length plus the steps after it). They
  // come from the model's own rotary module, not from rope_theta: a model whose frequencies
  // were rounded (upstream Emu1 casts its LLaMA to bfloat16 once, which rounds the
  // non-persistent inv_freq for good) runs with those.
  EmuDecoder(const std::vector<std::vector<at::Tensor>>& layers, at::Tensor final_norm,
             at::Tensor head_weight, c10::optional<at::Tensor> up_weight, int64_t num_heads,
             int64_t num_kv_heads, double rms_eps, at::Tensor rope_cos, at::Tensor rope_sin,
             c10::optional<int64_t> max_batch, c10::optional<int64_t> max_seq_len, RopeFn rope_fn = {},
             const std::string& kernels = "auto", std::vector<int64_t> segment_starts = {},
             int64_t weight_bits = 0, int64_t group_size = 0, int64_t tp_size = 1,
             const std::string& tp_group = "");
  // kernels: "auto", "custom" or "aten" (above). segment_starts: the first layer of each segment
  // (empty: one segment, every layer on one device); each segment's weights share a device.
  // tp_size / tp_group: the tensor-parallel group's size and its torch.distributed name
  // (ProcessGroup.group_name); num_heads / num_kv_heads are then the whole model's, the layers
  // this rank's shards (above). tp_size 1: no tensor parallelism.

  // Runs the prompts ([B,T,H] embeddings, [B,T] 0/1 attention mask: each row one run of
  // ones, left or right padded) through the decoder, fills the KV cache, and returns the
  // regression head's output at each row's last valid token: output 0, [B, Dout].
  // Positions are the raw indices 0..T-1 of the padded rows, as upstream Emu uses them.
  at::Tensor prefill(const at::Tensor& inputs_embeds, const at::Tensor& attention_mask);

  // One decode step for the whole batch: the previous output [B, Dout] in (Emu2: through
  // up_weight), the next output [B, Dout] out.
  at::Tensor step(const at::Tensor& prev_output);

  // `steps` decode steps in a row from the previous output, each fed the one before:
  // [B, steps, Dout]. On CUDA the step is captured once per batch size into a CUDA graph and
  // replayed (no host sync, no per-layer launches from the host) unless use_cuda_graphs is off.
  at::Tensor decode(const at::Tensor& prev_output, int64_t steps);

  // prefill + n - 1 decode steps under one lock: [B, n, Dout], written into one tensor. Checks
  // that every prompt plus n - 1 steps fits max_seq_len (if set) before running anything.
  at::Tensor generate(const at::Tensor& inputs_embeds, const at::Tensor& attention_mask, int64_t n);

  void reset();  // (all public calls are serialized by a per-decoder mutex)

  // Rows that come and go (in-flight batching, emu_fast.Engine; rows.cpp). admit() prefills the
  // prompts (as prefill() takes them) into new rows after the active ones, leaving the rows in
  // progress untouched, and returns their first outputs [A, Dout]; the cache is grown for their
  // prompts plus `steps` decode steps. Every row then decodes at its own position, so a prompt
  // admitted alone with no padding computes what generate() computes for it alone. retire()
  // removes rows (indices into the active batch, any order, no repeats); the rows after them
  // move down, keeping their order.
  at::Tensor admit(const at::Tensor& inputs_embeds, const at::Tensor& attention_mask, int64_t steps);
  void retire(const std::vector<int64_t>& rows);

  // Grows the KV cache to hold at least `batch` rows of `seq_len` positions (within the limits),
  // keeping the active batch; never shrinks it. prefill/generate/step/decode call it themselves.
  void reserve(int64_t batch, int64_t seq_len);

  int64_t batch_size() const { return batch_; }
  std::vector<int64_t> lengths() const;
  // The limits (none: nothing but memory) and the cache's current capacity.
  c10::optional<int64_t> max_batch() const { return limited(max_batch_); }
  c10::optional<int64_t> max_seq_len() const { return limited(max_seq_len_); }
  int64_t capacity_batch() const { return cap_batch_; }
  int64_t capacity_seq_len() const { return cap_seq_; }
  int64_t rope_positions() const { return rope_cos_.size(0); }
  // Bytes of the weights the decoder reads, and of what else it holds beside the KV cache (RoPE
  // tables, per-row lengths, CUDA graph buffers).
  int64_t weight_bytes() const;
  int64_t scratch_bytes() const;
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  int64_t weight_bits() const { return quant_.bits; }        // 0: unquantized
  int64_t group_size() const { return quant_.group_size; }   // int4's group; 0 otherwise
  int64_t hidden_size() const { return hidden_; }
  int64_t output_size() const { return head_.size(0); }
  int64_t num_heads() const { return num_heads_; }        // this rank's (all of them without TP)
  int64_t num_kv_heads() const { return num_kv_heads_; }
  int64_t tp_size() const { return tp_size_; }
  const std::string& tp_group() const { return tp_group_; }
  int64_t head_dim() const { return head_dim_; }
  // The whole KV cache of a decoder with one segment: [L, 2, capacity_batch, Hkv, capacity_seq_len, D].
  at::Tensor kv_cache() const;
  // Per segment: [layers in it, 2, capacity_batch, Hkv, capacity_seq_len, D] on its device.
  std::vector<at::Tensor> kv_caches() const;
  int64_t kv_cache_bytes() const;
  // Per segment: (first layer, end layer, device).
  std::vector<std::tuple<int64_t, int64_t, std::string>> segments() const;
  // Where prompts go in (the first segment's device) and outputs come out (the head's).
  at::Device input_device() const { return segs_.front().device; }
  at::Device output_device() const { return final_norm_.device(); }
  // The kernels asked for ("auto", "custom", "aten"), the ones in use now ("custom", "aten"),
  // and why a self-check moved this decoder to ATen ("" if it did not).
  const std::string& kernel_mode() const { return mode_; }
  std::string kernels() const;
  std::string fallback_reason() const;
  bool use_cuda_graphs() const { return use_cuda_graphs_; }
  void set_use_cuda_graphs(bool on) { use_cuda_graphs_ = on; }
  // On the CPU, run a step as one parallel region (default) or op by op like on CUDA.
  bool fused_cpu_step() const { return fused_cpu_step_; }
  void set_fused_cpu_step(bool on) { fused_cpu_step_ = on; }

 private:
  at::Tensor rope_prefill(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) const;
  PromptLayout parse(const char* who, const at::Tensor& embeds, const at::Tensor& attention_mask) const;
  at::Tensor prefill_locked(const at::Tensor& embeds, const PromptLayout& prompts);
  // The prompts into rows [first, first + batch) (the cache already holds them), batch_ set to
  // their end; the rows before `first` are untouched.
  at::Tensor prefill_rows_locked(const at::Tensor& embeds, const PromptLayout& prompts, int64_t first);
  // Decode steps from prev into result [B, steps, Dout] (a view may do).
  void decode_into(const at::Tensor& prev, const at::Tensor& result);
  void check_step_input(const at::Tensor& prev, const char* who, int64_t steps) const;
  at::Tensor next_input(const at::Tensor& prev);
  // The body of a step from its input x [B, H]: every layer, the head; advances the device-side
  // lengths. Only device work (capturable); returns (output, next input or [B,0]).
  std::tuple<at::Tensor, at::Tensor> run_step(const at::Tensor& x);
  std::tuple<at::Tensor, at::Tensor> run_step_with(const at::Tensor& x, const OpSet& kernels, bool fused);
  void reset_locked();
  static constexpr int64_t kNoLimit = INT64_MAX;
  static c10::optional<int64_t> limited(int64_t v) {
    return v == kNoLimit ? c10::nullopt : c10::optional<int64_t>(v);
  }
  // Makes the cache hold batch x seq_len (rounded up; see decoder.cpp), copying the active rows
  // when keep is set; drops CUDA graphs and rebuilds the CPU step after any reallocation.
  void grow_locked(int64_t batch, int64_t seq_len, bool keep);
  // Makes the RoPE tables cover positions 0..positions-1 (through rope_fn_).
  void ensure_rope_locked(const char* who, int64_t positions);
  void rebuild_step_locked();
  void set_rope_locked(const at::Tensor& cos, const at::Tensor& sin);
  bool graphs_possible() const;  // every part on CUDA, no tensor parallelism (cuda_graphs.cpp)
  // Sums t across the tensor-parallel group in place (nothing without one); a failed or timed-out
  // collective raises naming the group (tensor_parallel.cpp).
  void all_reduce_(const at::Tensor& t) const;
  void check_tensor_parallel(int64_t num_heads, int64_t num_kv_heads) const;
  // A run of consecutive layers on one device and what the step keeps there.
  struct Segment {
    int64_t begin, end;  // layers [begin, end)
    at::Device device;
    at::Tensor kv;       // [end - begin, 2, cap_batch, Hkv, cap_seq, D]
    at::Tensor rope_cos, rope_sin;          // this device's copy of the RoPE tables
    at::Tensor lengths_dev, starts_dev;     // int64 [cap_batch]: cached entries, first position
    // int32 [cap_batch * Hkv] zeros, decode_attention's split_counters for every layer here (the
    // CUDA kernel merges its splits in one launch with them and leaves them zero)
    at::Tensor split_counters;
    std::shared_ptr<const cpu::FusedStep> fused;  // the CPU step over these layers (null off the CPU)
    bool fused_head = false;                      // ... and the regression head after them
  };
  // A part of the op-by-op step: consecutive segments on one device, and the head when it is
  // the last part and the head sits there. On CUDA each part is one graph.
  struct Part {
    at::Device device;
    size_t first_seg, end_seg;
    bool head;
  };
  // Runs a part from the residual stream h [B, H] on its device: (the residual stream after its
  // layers, undefined) or, with the head, (output, next input or [B, 0]).
  std::tuple<at::Tensor, at::Tensor> run_part(const Part& part, const OpSet& kernels, at::Tensor h);
  // A segment's layers op by op from the residual stream; returns the residual stream after
  // them (each projection added to it as it is computed, rounded as the fused CPU step rounds
  // it, so cutting a model into segments changes no bit).
  at::Tensor run_layers(Segment& seg, const OpSet& kernels, at::Tensor h);
  // Layer l's attention from its fused QKV projection [B, (Hq + 2 Hkv) D]: appends to the cache,
  // returns [B, Hq, D] (both step compositions, plain and quantized).
  at::Tensor attend(Segment& seg, const OpSet& kernels, int64_t l, const at::Tensor& qkv,
                    const at::Tensor& lens, const at::Tensor& positions);
  // The same over quantized projections: rms_norm / add_rms_norm, then the quantized GEMV op,
  // with the fused CPU step's roundings (each projection rounded, then added).
  at::Tensor run_layers_quantized(Segment& seg, const OpSet& kernels, at::Tensor h);
  // x @ W^T of one projection for prefill (GEMM-bound): the weight itself, or its dequantized
  // copy in x's dtype (one projection's worth, freed on return).
  at::Tensor prefill_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) const;
  // Installs per-segment caches (one tensor per segment) and rebuilds the per-layer views.
  void set_caches_locked(std::vector<at::Tensor> kv);
  // The first step at a batch size, in "auto" mode, from the previous output (Emu2's project_up
  // is checked too): the checked ATen step, then ours from the same cache; returns ours if they
  // agree, else falls back to ATen for good and returns its.
  std::tuple<at::Tensor, at::Tensor> checked_step(const at::Tensor& prev);
  void fall_back_locked(const std::string& reason);
  bool self_check_due(int64_t batch) const;
  // Undoes run_step's device-side length increment (to run a step again from the same cache).
  void rewind_lengths_locked(int64_t batch);
  void fit_locked(const char* who, int64_t batch, const int64_t* starts, const int64_t* lens, int64_t steps,
                  bool keep);
  void fit_prompts_locked(const char* who, const PromptLayout& prompts, int64_t steps);
  void fit_steps_locked(const char* who, int64_t steps);
  int64_t graph_bytes() const;  // cuda_graphs.cpp; 0 without CUDA
  // Runs result.size(1) steps from x through a CUDA graph; returns how many it ran (fewer when
  // the graph's own self-check failed: the caller finishes on the ATen step).
  int64_t decode_with_graph(at::Tensor x, const at::Tensor& result);

  std::vector<DecoderLayerWeights> layers_;
  WeightQuant quant_;
  at::Tensor final_norm_, head_;
  c10::optional<at::Tensor> up_;
  int64_t num_heads_, num_kv_heads_, head_dim_, hidden_;  // heads: this rank's
  int64_t tp_size_ = 1;
  std::string tp_group_;
  double eps_;
  int64_t max_batch_, max_seq_len_;  // limits; kNoLimit when none
  int64_t cap_batch_ = 0, cap_seq_ = 0;  // the cache's capacity
  std::vector<Segment> segs_;
  std::vector<Part> parts_;
  std::vector<at::Tensor> k_cache_, v_cache_;  // per-layer views of the segments' caches [cap_batch, Hkv, cap_seq, D]
  at::Tensor rope_cos_, rope_sin_;  // float32 [P, D/2] as rope_fn gave them (each segment has its copy)
  RopeFn rope_fn_;
  std::string mode_;                    // "auto", "custom", "aten"
  const OpSet* kernels_;          // in use now
  // per batch size, one bit per quantized-input setting (input_setting_bit): our step matched ATen's
  std::vector<uint8_t> self_checked_;
  std::string fallback_reason_;

  // The active batch: 0 before prefill. Row b's cache holds lengths_[b] entries, the first at
  // RoPE position starts_[b] (its left padding in the prompt).
  int64_t batch_ = 0;
  std::vector<int64_t> lengths_, starts_;       // host copies, for checks without a device sync

  bool use_cuda_graphs_ = true;
  bool fused_cpu_step_ = true;
  std::mutex mutex_;  // one call at a time: prefill/step/decode mutate the cache and lengths
  struct Graph;                                    // defined in cuda_graphs.cpp
  std::vector<std::shared_ptr<Graph>> graphs_;     // one per batch size, captured on first use
};

}  // namespace emu_fast
