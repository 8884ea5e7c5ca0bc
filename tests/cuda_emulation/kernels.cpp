// C entry points (for ctypes) over the very host code csrc/ops/<op>.cu calls: the launchers
// of csrc/kernels/cuda/ (launch plans, size rules, empty input), the compositions of
// csrc/compose.h and the splice numbering of csrc/kernels/splice.h, run on the emulator. Each
// takes what the torch glue unwraps from its tensors; dtype: 0 float32, 1 bfloat16, 2 float16.
// Each returns the cudaError_t of the launch; emu_last_error() says what went wrong.
#include "ops/compose.h"
#include "kernels/cuda/decode_attention.cuh"
#include "kernels/cuda/norm.cuh"
#include "kernels/cuda/splice_embeddings.cuh"
#include "kernels/cuda/gemv.cuh"
#include "kernels/cuda/quantized_gemv.cuh"
#include "kernels/cpu/splice_embeddings.h"

namespace {

using namespace emu_fast::cuda;

template <typename F>
int dispatch(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f(float{});
    case 1: return f(__nv_bfloat16{});
    case 2: return f(__half{});
  }
  return -1;
}

// Where the glue calls cuBLAS (GEMV batches above kGemvMaxBatch): a plain float32-accumulating
// loop on the host.
template <typename T>
cudaError_t host_gemm(void*, const void* w, const void* x, int64_t ldx, void* y, int64_t ldy, int64_t batch,
                      int64_t k_dim, int64_t n_rows, cudaStream_t) {
  const T* wt = static_cast<const T*>(w);
  const T* xt = static_cast<const T*>(x);
  T* yt = static_cast<T*>(y);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t n = 0; n < n_rows; ++n) {
      float acc = 0.f;
      for (int64_t k = 0; k < k_dim; ++k) acc += to_f(xt[b * ldx + k]) * to_f(wt[n * k_dim + k]);
      yt[b * ldy + n] = from_f<T>(acc);
    }
  return cudaSuccess;
}

template <typename T>
Gemm host_gemm_for() {
  return {&host_gemm<T>, nullptr};
}

}  // namespace

extern "C" {

void emu_set_schedule_seed(uint64_t seed) { emu_fast::emulation::set_schedule_seed(seed); }
const char* emu_last_error() { return emu_fast::emulation::last_error_message(); }

int64_t emu_gemv_workspace_elems(int64_t batch, int64_t k_dim, int64_t ldx, int norm) {
  return gemv_workspace_elems(batch, k_dim, ldx, norm != 0);
}

// emu_fast::gemv, norm_gemv (norm_w given) and gemv_add (residual given, row stride ldr).
int emu_gemv(int dtype, const void* w, const void* x, void* y, int64_t batch, int64_t k_dim, int64_t n_rows,
             int64_t ldx, const void* norm_w, float eps, const void* residual, int64_t ldr, void* workspace) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T *wt = static_cast<const T*>(w), *xt = static_cast<const T*>(x), *r = static_cast<const T*>(residual);
    if (norm_w != nullptr)
      return static_cast<int>(launch_gemv<T, true>(wt, xt, static_cast<T*>(y), static_cast<const T*>(norm_w), eps,
                                                   batch, k_dim, n_rows, ldx, n_rows, r, ldr,
                                                   static_cast<T*>(workspace), host_gemm_for<T>(), nullptr));
    return static_cast<int>(launch_gemv<T, false>(wt, xt, static_cast<T*>(y), nullptr, 0.f, batch, k_dim, n_rows, ldx,
                                                  n_rows, r, ldr, nullptr, host_gemm_for<T>(), nullptr));
  });
}

// emu_fast::gemv_int8 (group 0) / gemv_int4 (group > 0) as csrc/ops/quantized_gemv.cu
// launches them, x already as that glue prepares it (int4: padded and aligned).
int emu_quantized_gemv(int dtype, const void* q, const float* scales, int64_t scale_ld, int group, const void* x,
                       int64_t ldx, void* y, int64_t batch, int k_dim, int n_rows) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const uint8_t* qb = static_cast<const uint8_t*>(q);
    const T* xt = static_cast<const T*>(x);
    T* yt = static_cast<T*>(y);
    return static_cast<int>(group > 0 ? launch_quantized_gemv<T, true>(qb, scales, scale_ld, group, xt, ldx, yt, n_rows,
                                                                        batch, k_dim, n_rows, nullptr)
                                      : launch_quantized_gemv<T, false>(qb, scales, 1, 0, xt, ldx, yt, n_rows, batch,
                                                                         k_dim, n_rows, nullptr));
  });
}

int64_t emu_regression_head_workspace_elems(int64_t batch, int64_t hidden, int64_t ld_hidden) {
  return regression_head_workspace_elems(batch, hidden, ld_hidden);
}

int emu_regression_head(int dtype, const void* hidden, int64_t ld_hidden, const void* norm_w, float eps,
                        const void* head, const void* up, void* out, void* next, int64_t batch, int64_t hidden_size,
                        int64_t out_size, void* workspace) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    GemvBackend<T> gpu{static_cast<T*>(workspace), host_gemm_for<T>(), nullptr};
    return static_cast<int>(emu_fast::compose::regression_head<T>(
        gpu, static_cast<const T*>(hidden), ld_hidden, static_cast<const T*>(norm_w), eps, static_cast<const T*>(head),
        static_cast<const T*>(up), static_cast<T*>(out), static_cast<T*>(next), batch, hidden_size, out_size));
  });
}

int emu_decode_attention_splits(int64_t batch, int64_t num_kv_heads, int64_t capacity, int sm_count) {
  return decode_attention_splits(batch, num_kv_heads, capacity, sm_count);
}

int64_t emu_decode_attention_workspace_floats(int64_t batch, int64_t num_heads, int64_t num_kv_heads,
                                              int64_t capacity, int head_dim, int sm_count) {
  return plan_decode_attention(batch, num_heads, num_kv_heads, capacity, head_dim, sm_count).workspace_floats;
}

int emu_decode_attention(int dtype, int head_dim, int batch, const void* q, const void* k, const void* v,
                         int64_t q_stride, int64_t k_stride, int64_t v_stride, void* k_cache, void* v_cache,
                         const int64_t* cache_lens, const int64_t* positions, const float* rope_cos,
                         const float* rope_sin, int64_t max_position, void* out, float* workspace, int num_heads,
                         int num_kv_heads, int capacity, float scale, int sm_count, int* split_counters) {
  const DecodeAttentionPlan plan = plan_decode_attention(batch, num_heads, num_kv_heads, capacity, head_dim, sm_count);
  const DecodeAttentionParams p =
      decode_attention_params(q, k, v, q_stride, k_stride, v_stride, k_cache, v_cache, cache_lens, positions, rope_cos,
                              rope_sin, max_position, out, num_heads, num_kv_heads, capacity, scale, split_counters);
  return dispatch(dtype, [&](auto tag) {
    return static_cast<int>(launch_decode_attention<decltype(tag)>(plan, p, batch, head_dim, workspace, nullptr));
  });
}

int emu_rms_norm(int dtype, const void* x, const void* residual, const void* w, float eps, int64_t rows, int hidden,
                 void* y, void* sum_out) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    return static_cast<int>(launch_rms_norm<T>(static_cast<const T*>(x), static_cast<const T*>(residual),
                                               static_cast<const T*>(w), eps, rows, hidden, static_cast<T*>(y),
                                               static_cast<T*>(sum_out), nullptr));
  });
}

int64_t emu_norm_gemv_silu_workspace_elems(int64_t batch, int64_t k_dim, int64_t ldx, int64_t inter) {
  return norm_gemv_silu_workspace_elems(batch, k_dim, ldx, inter);
}

int emu_norm_gemv_silu(int dtype, const void* w, const void* x, void* y, const void* norm_w, float eps, int64_t batch,
                       int64_t k_dim, int64_t inter, int64_t ldx, void* workspace) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    return static_cast<int>(launch_norm_gemv_silu<T>(static_cast<const T*>(w), static_cast<const T*>(x),
                                                     static_cast<T*>(y), static_cast<const T*>(norm_w), eps, batch,
                                                     k_dim, inter, ldx, static_cast<T*>(workspace),
                                                     host_gemm_for<T>(), nullptr));
  });
}

int emu_silu_mul(int dtype, const void* gate_up, int64_t rows, int inter, void* y) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    return static_cast<int>(launch_silu_mul<T>(static_cast<const T*>(gate_up), rows, inter, static_cast<T*>(y), nullptr));
  });
}

// The glue's host half (number_slots on the ids) and its launch. Returns the number of slots
// (or -(p + 1) for an id outside the table, with nothing launched) in *slots.
int emu_splice(int dtype, const int64_t* ids, int64_t* slot_index, const void* table, int64_t vocab,
               const void* values, int64_t slot_id, int64_t positions, int hidden, void* out, int64_t* slots) {
  *slots = emu_fast::kernels::number_slots(ids, positions, vocab, slot_id, slot_index);
  if (*slots < 0) return 0;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    return static_cast<int>(launch_splice<T>(ids, slot_index, static_cast<const T*>(table), static_cast<const T*>(values),
                                             positions, hidden, static_cast<T*>(out), nullptr));
  });
}

}  // extern "C"
