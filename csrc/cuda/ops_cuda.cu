// CUDA implementations of the emu_fast ops: argument checks (shared with the CPU), then the
// host launchers of csrc/cuda/kernels/ on the current stream. This file only unwraps tensors:
// launch plans, size rules and empty-input handling live in the launchers (which the CUDA
// emulator runs too), compositions in compose.h. float32, bfloat16 and float16.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "compose.h"
#include "cuda/torch_glue.h"
#include "cuda/kernels/decode_attention.cuh"
#include "cuda/kernels/elementwise.cuh"
#include "cuda/kernels/gemv.cuh"
#include "kernels/splice.h"

namespace emu_fast {
namespace {

using cuda_glue::check_launch;
using cuda_glue::dispatch_float;
using cuda_glue::ptr;

// Rows the launchers take as they are: unit column stride and rows that do not overlap (a row
// stride of at least the row's length; the GEMM path's 2-D copy refuses a smaller pitch). An
// expanded or otherwise overlapping x is copied dense first.
bool rows_usable(const at::Tensor& x) {
  return x.stride(1) == 1 && (x.size(0) <= 1 || x.stride(0) >= x.size(1));
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

// cuBLAS for the GEMV batches our kernels do not take (cuda::launch_gemv decides): the pointers
// it is handed wrapped as tensors of `options` for at::mm_out.
cudaError_t cublas_gemm(void* ctx, const void* w, const void* x, int64_t ldx, void* y, int64_t ldy, int64_t batch,
                        int64_t k_dim, int64_t n_rows, cudaStream_t) {
  const auto& options = *static_cast<const at::TensorOptions*>(ctx);
  const at::Tensor xt = at::from_blob(const_cast<void*>(x), {batch, k_dim}, {ldx, 1}, options);
  const at::Tensor wt = at::from_blob(const_cast<void*>(w), {n_rows, k_dim}, {k_dim, 1}, options);
  at::Tensor yt = at::from_blob(y, {batch, n_rows}, {ldy, 1}, options);
  at::mm_out(yt, xt, wt.t());
  return cudaSuccess;
}

at::Tensor splice_embeddings_cuda(const at::Tensor& ids, const at::Tensor& table, const at::Tensor& values,
                                  int64_t slot_id) {
  check_splice(ids, table, values, /*allow_half=*/true);
  const c10::cuda::CUDAGuard guard(table.device());
  const int64_t B = ids.size(0), T = ids.size(1), V = table.size(0), H = table.size(1), S = values.size(0);
  // The ids go to the host once (this op runs once per prompt, not per step) to be checked and
  // to number the slots, as on the CPU.
  const at::Tensor ids_host = ids.to(at::kCPU).contiguous();
  at::Tensor slot_index = at::empty({B * T}, ids_host.options());
  check_splice_slots(kernels::number_slots(ids_host.data_ptr<int64_t>(), B * T, V, slot_id,
                                           slot_index.data_ptr<int64_t>()),
                     ids_host.data_ptr<int64_t>(), T, V, slot_id, S);
  slot_index = slot_index.to(table.device());
  const at::Tensor ids_c = ids.contiguous(), values_c = values.contiguous();
  at::Tensor out = at::empty({B, T, H}, table.options());
  dispatch_float(table.scalar_type(), [&](auto tag) {
    using Tt = decltype(tag);
    check_launch(cuda::launch_splice<Tt>(ptr<int64_t>(ids_c), ptr<int64_t>(slot_index), ptr<Tt>(table),
                                         ptr<Tt>(values_c), B * T, static_cast<int>(H), ptr<Tt>(out),
                                         c10::cuda::getCurrentCUDAStream()),
                 "splice_embeddings");
  });
  return out;
}

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                                 at::Tensor& v_cache, const at::Tensor& cache_lens, const at::Tensor& positions,
                                 const at::Tensor& rope_cos, const at::Tensor& rope_sin, double scale,
                                 const c10::optional<at::Tensor>& split_counters) {
  check_decode_attention(q, k, v, k_cache, v_cache, cache_lens, positions, rope_cos, rope_sin, true);
  if (split_counters) check_split_counters(q, k_cache, *split_counters);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(1), S = k_cache.size(2);
  check_cuda_attention_limits("emu_fast.decode_attention", D, Hq / Hkv);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({B, Hq, D}, q.options());
  const cuda::DecodeAttentionPlan plan =
      cuda::plan_decode_attention(B, Hq, Hkv, S, static_cast<int>(D), sm_count(q.get_device()));
  const at::Tensor workspace = at::empty({plan.workspace_floats}, q.options().dtype(at::kFloat));
  const cuda::DecodeAttentionParams p = cuda::decode_attention_params(
      q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0), k.stride(0), v.stride(0), k_cache.data_ptr(),
      v_cache.data_ptr(), cache_lens.data_ptr<int64_t>(), positions.data_ptr<int64_t>(), rope_cos.data_ptr<float>(),
      rope_sin.data_ptr<float>(), rope_cos.size(0), out.data_ptr(), static_cast<int>(Hq), static_cast<int>(Hkv),
      static_cast<int>(S), static_cast<float>(scale), split_counters ? split_counters->data_ptr<int>() : nullptr);
  dispatch_float(q.scalar_type(), [&](auto tag) {
    check_launch(cuda::launch_decode_attention<decltype(tag)>(plan, p, static_cast<int>(B), static_cast<int>(D),
                                                              workspace.data_ptr<float>(),
                                                              c10::cuda::getCurrentCUDAStream()),
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
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using Tt = decltype(tag);
    check_launch(cuda::launch_rms_norm<Tt>(ptr<Tt>(x), residual_in ? ptr<Tt>(residual) : nullptr, ptr<Tt>(weight),
                                           static_cast<float>(eps), B, static_cast<int>(H), ptr<Tt>(y),
                                           residual_in ? ptr<Tt>(sum) : nullptr, c10::cuda::getCurrentCUDAStream()),
                 "rms_norm");
  });
  return {y, sum};
}

// y = x' @ weight^T (+ residual) through cuda::launch_gemv, x' = x or rms_norm(x) (norm_weight):
// emu_fast::gemv, norm_gemv and gemv_add.
at::Tensor gemv_impl(const char* op, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor* norm_weight,
                     double eps, const at::Tensor* residual_in) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_usable(x_in) ? x_in : x_in.contiguous();
  const int64_t B = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor residual;
  if (residual_in != nullptr) residual = residual_in->stride(1) == 1 ? *residual_in : residual_in->contiguous();
  at::Tensor out = at::empty({B, N}, x.options());
  const at::Tensor workspace =
      at::empty({cuda::gemv_workspace_elems(B, K, x.stride(0), norm_weight != nullptr)}, x.options());
  at::TensorOptions options = x.options();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using Tt = decltype(tag);
    const Tt* r = residual_in != nullptr ? ptr<Tt>(residual) : nullptr;
    const int64_t ldr = residual_in != nullptr ? residual.stride(0) : 0;
    const cuda::Gemm gemm{&cublas_gemm, &options};
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    check_launch(norm_weight != nullptr
                     ? cuda::launch_gemv<Tt, true>(ptr<Tt>(weight), ptr<Tt>(x), ptr<Tt>(out), ptr<Tt>(*norm_weight),
                                                   static_cast<float>(eps), B, K, N, x.stride(0), N, r, ldr,
                                                   ptr<Tt>(workspace), gemm, stream)
                     : cuda::launch_gemv<Tt, false>(ptr<Tt>(weight), ptr<Tt>(x), ptr<Tt>(out), nullptr, 0.f, B, K, N,
                                                    x.stride(0), N, r, ldr, nullptr, gemm, stream),
                 op);
  });
  return out;
}

at::Tensor gemv_cuda(const at::Tensor& x, const at::Tensor& weight) {
  check_gemv(x, weight, true);
  return gemv_impl("gemv", x, weight, nullptr, 0.0, nullptr);
}

at::Tensor norm_gemv_cuda(const at::Tensor& x, const at::Tensor& norm_weight, double eps, const at::Tensor& weight) {
  check_norm_gemv(x, norm_weight, weight, true);
  return gemv_impl("norm_gemv", x, weight, &norm_weight, eps, nullptr);
}

at::Tensor gemv_add_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& residual) {
  check_gemv_add(x, weight, residual, true);
  return gemv_impl("gemv_add", x, weight, nullptr, 0.0, &residual);
}

at::Tensor norm_gemv_silu_cuda(const at::Tensor& x_in, const at::Tensor& norm_weight, double eps,
                               const at::Tensor& gate_up_weight) {
  check_norm_gemv_silu(x_in, norm_weight, gate_up_weight, true);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_usable(x_in) ? x_in : x_in.contiguous();
  const int64_t B = x.size(0), K = x.size(1), I = gate_up_weight.size(0) / 2;
  at::Tensor out = at::empty({B, I}, x.options());
  const at::Tensor workspace =
      at::empty({cuda::norm_gemv_silu_workspace_elems(B, K, x.stride(0), I)}, x.options());
  at::TensorOptions options = x.options();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using Tt = decltype(tag);
    check_launch(cuda::launch_norm_gemv_silu<Tt>(ptr<Tt>(gate_up_weight), ptr<Tt>(x), ptr<Tt>(out),
                                                 ptr<Tt>(norm_weight), static_cast<float>(eps), B, K, I, x.stride(0),
                                                 ptr<Tt>(workspace), {&cublas_gemm, &options},
                                                 c10::cuda::getCurrentCUDAStream()),
                 "norm_gemv_silu");
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> regression_head_cuda(const at::Tensor& hidden_in, const at::Tensor& norm_weight,
                                                        double eps, const at::Tensor& head_weight,
                                                        const c10::optional<at::Tensor>& up_weight) {
  check_regression_head(hidden_in, norm_weight, head_weight, up_weight, true);
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const at::Tensor hidden = rows_usable(hidden_in) ? hidden_in : hidden_in.contiguous();
  const int64_t B = hidden.size(0), H = hidden.size(1), Dout = head_weight.size(0), ld = hidden.stride(0);
  at::Tensor out = at::empty({B, Dout}, hidden.options());
  at::Tensor next = at::empty({B, up_weight.has_value() ? H : 0}, hidden.options());
  const at::Tensor workspace = at::empty({cuda::regression_head_workspace_elems(B, H, ld)}, hidden.options());
  at::TensorOptions options = hidden.options();
  dispatch_float(hidden.scalar_type(), [&](auto tag) {
    using Tt = decltype(tag);
    cuda::GemvBackend<Tt> gpu{ptr<Tt>(workspace), {&cublas_gemm, &options}, c10::cuda::getCurrentCUDAStream()};
    check_launch(compose::regression_head<Tt>(gpu, ptr<Tt>(hidden), ld, ptr<Tt>(norm_weight), static_cast<float>(eps),
                                              ptr<Tt>(head_weight), up_weight ? ptr<Tt>(*up_weight) : nullptr,
                                              ptr<Tt>(out), ptr<Tt>(next), B, H, Dout),
                 "regression_head");
  });
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
  dispatch_float(gate_up.scalar_type(), [&](auto tag) {
    using Tt = decltype(tag);
    check_launch(cuda::launch_silu_mul<Tt>(ptr<Tt>(gate_up), B, static_cast<int>(I), ptr<Tt>(out),
                                           c10::cuda::getCurrentCUDAStream()),
                 "silu_mul");
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(emu_fast, CUDA, m) {
  m.impl("splice_embeddings", &splice_embeddings_cuda);
  m.impl("decode_attention", &decode_attention_cuda);
  m.impl("regression_head", &regression_head_cuda);
  m.impl("gemv", &gemv_cuda);
  m.impl("norm_gemv", &norm_gemv_cuda);
  m.impl("gemv_add", &gemv_add_cuda);
  m.impl("norm_gemv_silu", &norm_gemv_silu_cuda);
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("add_rms_norm", &add_rms_norm_cuda);
  m.impl("silu_mul", &silu_mul_cuda);
}

}  // namespace emu_fast
