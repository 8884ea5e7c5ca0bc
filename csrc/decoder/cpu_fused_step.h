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
struct WeightQuant;          // decoder.h

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

// nullptr where there is no fused step (weights not on the CPU, or float16). layers and caches:
// the ones this step runs (a segment's); head undefined: the step ends at the residual stream.
// num_heads / num_kv_heads: the heads these layers hold (a tensor-parallel rank's share).
std::shared_ptr<const FusedStep> make_fused_step(const std::vector<DecoderLayerWeights>& layers,
                                                 const std::vector<at::Tensor>& k_cache,
                                                 const std::vector<at::Tensor>& v_cache, const at::Tensor& final_norm,
                                                 const at::Tensor& head, const c10::optional<at::Tensor>& up,
                                                 const at::Tensor& rope_cos, const at::Tensor& rope_sin,
                                                 int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                                 double eps, const WeightQuant& quant,
                                                 FusedStep::AllReduce all_reduce = {});

}  // namespace cpu
}  // namespace emu_fast
