// EmuDecoder's CPU step in one parallel region (cpu_decode_step.cpp), with its layer table
// (weight and cache pointers, shapes) built once when the decoder is constructed.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <memory>
#include <vector>

namespace emu_fast {
struct DecoderLayerWeights;  // decoder.h
struct WeightQuant;          // decoder.h

namespace cpu {

class FusedStep {
 public:
  virtual ~FusedStep() = default;
  // One step for x [B, H] (B <= max_batch): lengths/positions are host arrays [B]; writes
  // out [B, Dout] and, with an up projection, next [B, H]. Appends to the KV cache. Without a
  // head, out is the residual stream [B, H] after the last layer.
  virtual void run(const at::Tensor& x, const int64_t* lengths, const int64_t* positions, const at::Tensor& out,
                   const at::Tensor& next) const = 0;
};

// nullptr where there is no fused step (weights not on the CPU, or float16). layers and caches:
// the ones this step runs (a segment's); head undefined: the step ends at the residual stream.
std::shared_ptr<const FusedStep> make_fused_step(const std::vector<DecoderLayerWeights>& layers,
                                                 const std::vector<at::Tensor>& k_cache,
                                                 const std::vector<at::Tensor>& v_cache, const at::Tensor& final_norm,
                                                 const at::Tensor& head, const c10::optional<at::Tensor>& up,
                                                 const at::Tensor& rope_cos, const at::Tensor& rope_sin,
                                                 int64_t num_heads, int64_t num_kv_heads, double eps,
                                                 const WeightQuant& quant);

}  // namespace cpu
}  // namespace emu_fast
