// CUDA implementations of the emu_fast ops: argument checks (shared with the CPU), then the
// kernels in csrc/cuda/kernels/ on the current stream. float32, bfloat16 and float16.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cuda/kernels/decode_attention.cuh"
#include "cuda/kernels/elementwise.cuh"
#include "cuda/kernels/gemv.cuh"

namespace emu_fast {
namespace {

// Calls f(T{}) with T the CUDA storage type of s.
template <typename F>
void dispatch_float(at::ScalarType s, F&& f) {
  switch (s) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(__nv_bfloat16{});
    case at::kHalf: return f(__half{});
    default: TORCH_CHECK_TYPE(false, "emu_fast: unsupported dtype ", py_dtype(s), " on CUDA");
  }
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "emu_fast.", op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

int sm_count(int device) {
  static int cached[64] = {};
  if (device < 0 || device >= 64) return 108;
  if (cached[device] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) n = 108;
    cached[device] = n;
  }
  return cached[device];
}

at::Tensor splice_embeddings_cuda(const at::Tensor& ids, const at::Tensor& table, const at::Tensor& values,
                                  int64_t slot_id) {
  check_splice(ids, table, values, /*allow_half=*/true);
  const c10::cuda::CUDAGuard guard(table.device());
  const int64_t B = ids.size(0), T = ids.size(1), V = table.size(0), H = table.size(1), S = values.size(0);
  const at::Tensor ids_c = ids.contiguous();
  at::Tensor out = at::empty({B, T, H}, table.options());
  if (B * T == 0) {
    TORCH_CHECK_VALUE(S == 0, "emu_fast.splice_embeddings: the input has 0 slots (token id ", slot_id, ") but ", S,
                      " slot vectors were given");
    return out;
  }
  // Validation reads the ids back to the host: this op runs once per prompt, not per step.
  const at::Tensor bad = (ids_c < 0) | (ids_c >= V);
  if (bad.any().item<bool>()) {
    const int64_t p = bad.flatten().nonzero()[0][0].item<int64_t>();
    TORCH_CHECK_INDEX(false, "emu_fast.splice_embeddings: token id ", ids_c.flatten()[p].item<int64_t>(),
                      " at (row ", p / T, ", position ", p % T, ") is outside the embedding table of ", V, " rows");
  }
  const at::Tensor is_slot = slot_id >= 0 ? (ids_c == slot_id).flatten() : at::zeros({B * T}, ids_c.options().dtype(at::kBool));
  const int64_t n_slots = is_slot.sum().item<int64_t>();
  TORCH_CHECK_VALUE(n_slots == S, "emu_fast.splice_embeddings: the input has ", n_slots, " slots (token id ",
                    slot_id, ") but ", S, " slot vectors were given");
  const at::Tensor slot_index = at::where(is_slot, at::cumsum(is_slot, 0) - 1, at::full({}, -1, ids_c.options()));
  const at::Tensor values_c = values.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(table.scalar_type(), [&](auto tag) {
    using Tt = decltype(tag);
    check_launch(cuda::launch_splice<Tt>(ptr<int64_t>(ids_c), ptr<int64_t>(slot_index), ptr<Tt>(table),
                                         ptr<Tt>(values_c), B * T, static_cast<int>(H), ptr<Tt>(out), stream),
                 "splice_embeddings");
  });
  return out;
}

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                                 at::Tensor& v_cache, const at::Tensor& cache_lens, const at::Tensor& positions,
                                 const at::Tensor& rope_cos, const at::Tensor& rope_sin, double scale) {
  check_decode_attention(q, k, v, k_cache, v_cache, cache_lens, positions, rope_cos, rope_sin, true);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(1), S = k_cache.size(2);
  check_cuda_attention_limits("emu_fast.decode_attention", D, Hq / Hkv);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({B, Hq, D}, q.options());
  if (B == 0) return out;
  const int splits = cuda::decode_attention_splits(B, Hkv, S, sm_count(q.get_device()));
  cuda::DecodeAttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_stride = q.stride(0);
  p.k_stride = k.stride(0);
  p.v_stride = v.stride(0);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.cache_lens = cache_lens.data_ptr<int64_t>();
  p.positions = positions.data_ptr<int64_t>();
  p.rope_cos = rope_cos.data_ptr<float>();
  p.rope_sin = rope_sin.data_ptr<float>();
  p.out = out.data_ptr();
  p.num_heads = static_cast<int>(Hq);
  p.num_kv_heads = static_cast<int>(Hkv);
  p.capacity = static_cast<int>(S);
  p.max_position = rope_cos.size(0);
  p.splits = splits;
  p.scale = static_cast<float>(scale);
  const int64_t workspace_floats = cuda::decode_attention_workspace_floats(B, Hq, splits, static_cast<int>(D));
  const at::Tensor workspace = at::empty({workspace_floats}, q.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(q.scalar_type(), [&](auto tag) {
    using Tt = decltype(tag);
    float* ws = workspace.data_ptr<float>();
    check_launch(D == 64 ? cuda::launch_decode_attention<Tt, 64>(p, static_cast<int>(B), ws, stream)
                         : cuda::launch_decode_attention<Tt, 128>(p, static_cast<int>(B), ws, stream),
                 "decode_attention");
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> norm_impl(const at::Tensor& x_in, const at::Tensor* residual_in,
                                             const at::Tensor& weight, double eps) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor residual = residual_in ? residual_in->contiguous() : at::Tensor();
  const int64_t B = x.size(0), H = x.size(1);
  at::Tensor y = at::empty({B, H}, x.options());
  at::Tensor sum = residual_in ? at::empty({B, H}, x.options()) : at::Tensor();
  if (B == 0) return {y, sum};
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using Tt = decltype(tag);
    check_launch(cuda::launch_rms_norm<Tt>(ptr<Tt>(x), residual_in ? ptr<Tt>(residual) : nullptr, ptr<Tt>(weight),
                                           static_cast<float>(eps), B, static_cast<int>(H), ptr<Tt>(y),
                                           residual_in ? ptr<Tt>(sum) : nullptr, stream),
                 "rms_norm");
  });
  return {y, sum};
}

// y = x' @ weight^T with x' = x or rms_norm(x, norm_weight) (fused prologue).
at::Tensor gemv_impl(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor* norm_weight, double eps) {
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t B = x.size(0), K = x.size(1), N = weight.size(0);
  if (B > cuda::kGemvMaxBatch) {  // large batches are GEMMs: cuBLAS
    return at::linear(norm_weight ? std::get<0>(norm_impl(x, nullptr, *norm_weight, eps)) : x, weight);
  }
  at::Tensor out = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using Tt = decltype(tag);
    const Tt* nw = norm_weight ? ptr<Tt>(*norm_weight) : nullptr;
    const cudaError_t err =
        norm_weight ? cuda::launch_gemv<Tt, true>(ptr<Tt>(weight), ptr<Tt>(x), ptr<Tt>(out), nw, static_cast<float>(eps),
                                                  static_cast<int>(B), static_cast<int>(K), static_cast<int>(N),
                                                  x.stride(0), N, stream)
                    : cuda::launch_gemv<Tt, false>(ptr<Tt>(weight), ptr<Tt>(x), ptr<Tt>(out), nullptr, 0.f,
                                                   static_cast<int>(B), static_cast<int>(K), static_cast<int>(N),
                                                   x.stride(0), N, stream);
    check_launch(err, "gemv");
  });
  return out;
}

at::Tensor gemv_cuda(const at::Tensor& x, const at::Tensor& weight) {
  check_gemv(x, weight, true);
  const c10::cuda::CUDAGuard guard(x.device());
  return gemv_impl(x, weight, nullptr, 0.0);
}

std::tuple<at::Tensor, at::Tensor> regression_head_cuda(const at::Tensor& hidden, const at::Tensor& norm_weight,
                                                        double eps, const at::Tensor& head_weight,
                                                        const c10::optional<at::Tensor>& up_weight) {
  check_regression_head(hidden, norm_weight, head_weight, up_weight, true);
  const c10::cuda::CUDAGuard guard(hidden.device());
  at::Tensor out = gemv_impl(hidden, head_weight, &norm_weight, eps);
  at::Tensor next = up_weight.has_value() ? gemv_impl(out, *up_weight, nullptr, 0.0)
                                          : at::empty({hidden.size(0), 0}, hidden.options());
  return {out, next};
}

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm("rms_norm", x, weight, true);
  return std::get<0>(norm_impl(x, nullptr, weight, eps));
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps) {
  check_add_rms_norm(x, residual, weight, true);
  return norm_impl(x, &residual, weight, eps);
}

at::Tensor silu_mul_cuda(const at::Tensor& gate_up_in) {
  check_silu_mul(gate_up_in, true);
  const c10::cuda::CUDAGuard guard(gate_up_in.device());
  const at::Tensor gate_up = gate_up_in.contiguous();
  const int64_t B = gate_up.size(0), I = gate_up.size(1) / 2;
  at::Tensor out = at::empty({B, I}, gate_up.options());
  if (B * I == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(gate_up.scalar_type(), [&](auto tag) {
    using Tt = decltype(tag);
    check_launch(cuda::launch_silu_mul<Tt>(ptr<Tt>(gate_up), B, static_cast<int>(I), ptr<Tt>(out), stream), "silu_mul");
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(emu_fast, CUDA, m) {
  m.impl("splice_embeddings", &splice_embeddings_cuda);
  m.impl("decode_attention", &decode_attention_cuda);
  m.impl("regression_head", &regression_head_cuda);
  m.impl("gemv", &gemv_cuda);
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("add_rms_norm", &add_rms_norm_cuda);
  m.impl("silu_mul", &silu_mul_cuda);
}

}  // namespace emu_fast
