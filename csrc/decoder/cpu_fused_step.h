// EmuDecoder's CPU step in one parallel region (cpu_decode_step.cpp), with its layer table
// (weight and cache pointers, shapes) built once when the decoder is constructed.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <functional>
#include <memory>
#include <vector>

namespace emu_fast {
struct DecoderLayerWeights;  // decoder.h

namespace cpu {

class FusedStep {
 public:
  // Sums a tensor across the tensor-parallel ranks in place (EmuDecoder::all_reduce_); empty
  // without tensor parallelism.
  using AllReduce = std::function<void(const at::Tensor&)>;

  virtual ~FusedStep() = default;
  // One step for x [B, H] (B <= max_batch): lengths/positions are host arrays [B]; writes
  // out [B, Dout] and, with an up projection, next [B, H]. Appends to the KV cache. Without a
  // head, out is the residual stream [B, H] after the last layer.
  virtual void run(const at::Tensor& x, const int64_t* lengths, const int64_t* positions, const at::Tensor& out,
                   const at::Tensor& next) const = 0;
};

// What a fused step runs: a segment's layers and KV caches, and the model's facts.
struct FusedStepSpec {
  std::vector<DecoderLayerWeights> layers;
  std::vector<at::Tensor> k_cache, v_cache;
  at::Tensor final_norm;
  at::Tensor head;  // undefined: the step ends at the residual stream
  c10::optional<at::Tensor> up;
  at::Tensor rope_cos, rope_sin;
  int64_t num_heads = 0, num_kv_heads = 0;  // the heads these layers hold (a tensor-parallel rank's share)
  int64_t head_dim = 0;
  double eps = 0.0;
  int64_t bits = 0, group_size = 0;  // the decoder's WeightQuant
  FusedStep::AllReduce all_reduce;   // empty without tensor parallelism
};

// nullptr where there is no fused step (weights not on the CPU, or float16).
std::shared_ptr<const FusedStep> make_fused_step(const FusedStepSpec& spec);

}  // namespace cpu
}  // namespace emu_fast
