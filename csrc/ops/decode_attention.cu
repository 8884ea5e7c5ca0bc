// emu_fast::decode_attention on CUDA: the checks (decode_attention.cpp), then
// kernels/cuda/decode_attention.cuh's launch plan and launcher on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels/cuda/decode_attention.cuh"
#include "ops/checks.h"
#include "ops/cuda_glue.h"

namespace emu_fast {
namespace {

using cuda_glue::check_launch;
using cuda_glue::dispatch_float;
using cuda_glue::ptr;

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

}  // namespace

TORCH_LIBRARY_IMPL(emu_fast, CUDA, m) {
  m.impl("decode_attention", &decode_attention_cuda);
}

}  // namespace emu_fast
