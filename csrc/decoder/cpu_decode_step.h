// One whole decode step of the LLaMA body and the regression head on the CPU, in a single
// parallel region: the threads split each GEMV's rows and the attention's (sequence, KV head)
// pairs and meet at a barrier between stages, instead of one fork/join, one dispatcher call
// and one allocation per op. Same kernels and roundings as the emu_fast ops; torch-free.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

namespace emu_fast::cpu {

// A projection's weight: T [N, K] (StepModel::bits 0), or the quantized weight of
// kernels/cpu/quantized_gemv.h (bits 8: int8 [N, K]; bits 4: packed uint8) with its float32 scales.
struct StepProj {
  const void* w;
  const float* scales;  // nullptr when unquantized
};

template <typename T>
struct StepLayer {
  const T *input_norm, *post_norm;
  StepProj qkv, o, gate_up, down;
  T *k_cache, *v_cache;  // this layer's [max_batch, Hkv, capacity, D]
};

// What stays fixed for a decoder's life (shapes, weights, caches, RoPE tables): built once, by
// cpu_fused_step.cpp when the decoder is constructed.
template <typename T>
struct StepModel {
  int64_t hidden, heads, kv_heads, head_dim, intermediate, capacity, out_dim;
  float eps, scale;
  int64_t bits = 0, group_size = 0;  // the layers' projections: 0 (T), 8 (int8) or 4 (int4, groups)
  std::vector<StepLayer<T>> layers;
  // head: nullptr for a segment of a split model that ends before the head (the output is then
  // the residual stream [batch, hidden]); up: nullptr when the output is the next input.
  const T *final_norm, *head, *up;
  const float *rope_cos, *rope_sin; // [P, D/2]
  // Tensor parallelism: sums n values across the ranks in place (o's and down's partial outputs);
  // empty without it. Called by the thread that entered the step, the others waiting; an error it
  // throws ends the step and is rethrown by decode_step.
  std::function<void(T*, int64_t)> all_reduce;
};

// What changes every step.
template <typename T>
struct StepIO {
  int64_t batch;
  const int64_t* lengths;           // [batch] cached entries per sequence (the new one goes there)
  const int64_t* positions;         // [batch] RoPE position of the new token
  const T* x;                       // [batch, hidden] the step's input
  T* out;                           // [batch, out_dim], or [batch, hidden] without a head
  T* next;                          // [batch, hidden] when up != nullptr
  int threads;
};

template <typename T>
void decode_step(const StepModel<T>& m, const StepIO<T>& io);

}  // namespace emu_fast::cpu
