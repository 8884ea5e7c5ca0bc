// C entry points (for ctypes) that run the real CUDA kernels of csrc/cuda/kernels/ through
// their own host launchers on the emulator. Arguments mirror what csrc/cuda/ops_cuda.cu passes
// after its checks; dtype: 0 float32, 1 bfloat16, 2 float16. Each returns the cudaError_t of
// the launch; emu_last_error() says what went wrong.
#include "cuda/kernels/decode_attention.cuh"
#include "cuda/kernels/elementwise.cuh"
#include "cuda/kernels/gemv.cuh"

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

}  // namespace

extern "C" {

void emu_set_schedule_seed(uint64_t seed) { emu_fast::emulation::set_schedule_seed(seed); }
const char* emu_last_error() { return emu_fast::emulation::last_error_message(); }

int emu_gemv(int dtype, int norm, const void* w, const void* x, void* y, const void* norm_w, float eps, int batch,
             int k_dim, int n_rows, int64_t ldx, int64_t ldy) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* wt = static_cast<const T*>(w);
    auto* xt = static_cast<const T*>(x);
    auto* nt = static_cast<const T*>(norm_w);
    return static_cast<int>(norm ? launch_gemv<T, true>(wt, xt, static_cast<T*>(y), nt, eps, batch, k_dim, n_rows, ldx, ldy, nullptr)
                                 : launch_gemv<T, false>(wt, xt, static_cast<T*>(y), nt, eps, batch, k_dim, n_rows, ldx, ldy, nullptr));
  });
}

int emu_decode_attention_splits(int64_t batch, int64_t num_kv_heads, int64_t capacity, int sm_count) {
  return decode_attention_splits(batch, num_kv_heads, capacity, sm_count);
}

int64_t emu_decode_attention_workspace_floats(int64_t batch, int64_t num_heads, int splits, int head_dim) {
  return decode_attention_workspace_floats(batch, num_heads, splits, head_dim);
}

int emu_decode_attention(int dtype, int head_dim, int batch, const void* q, const void* k, const void* v,
                         int64_t q_stride, int64_t k_stride, int64_t v_stride, void* k_cache, void* v_cache,
                         const int64_t* cache_lens, const int64_t* positions, const float* rope_cos,
                         const float* rope_sin, int64_t max_position, void* out, float* workspace, int num_heads,
                         int num_kv_heads, int capacity, int splits, float scale) {
  DecodeAttentionParams p{};
  p.q = q;
  p.k = k;
  p.v = v;
  p.q_stride = q_stride;
  p.k_stride = k_stride;
  p.v_stride = v_stride;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.cache_lens = cache_lens;
  p.positions = positions;
  p.rope_cos = rope_cos;
  p.rope_sin = rope_sin;
  p.out = out;
  p.max_position = max_position;
  p.num_heads = num_heads;
  p.num_kv_heads = num_kv_heads;
  p.capacity = capacity;
  p.splits = splits;
  p.scale = scale;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (head_dim == 64) return static_cast<int>(launch_decode_attention<T, 64>(p, batch, workspace, nullptr));
    if (head_dim == 128) return static_cast<int>(launch_decode_attention<T, 128>(p, batch, workspace, nullptr));
    return -1;
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

int emu_silu_mul(int dtype, const void* gate_up, int64_t rows, int inter, void* y) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    return static_cast<int>(launch_silu_mul<T>(static_cast<const T*>(gate_up), rows, inter, static_cast<T*>(y), nullptr));
  });
}

int emu_splice(int dtype, const int64_t* ids, const int64_t* slot_index, const void* table, const void* values,
               int64_t positions, int hidden, void* out) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    return static_cast<int>(launch_splice<T>(ids, slot_index, static_cast<const T*>(table), static_cast<const T*>(values),
                                             positions, hidden, static_cast<T*>(out), nullptr));
  });
}

}  // extern "C"
