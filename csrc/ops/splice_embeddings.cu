// emu_fast::splice_embeddings on CUDA: the checks (splice_embeddings.cpp), then the slot numbering
// on the host and one copy kernel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels/cpu/splice_embeddings.h"
#include "kernels/cuda/splice_embeddings.cuh"
#include "ops/checks.h"
#include "ops/cuda_glue.h"

namespace emu_fast {
namespace {

using cuda_glue::check_launch;
using cuda_glue::dispatch_float;
using cuda_glue::ptr;

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

}  // namespace

TORCH_LIBRARY_IMPL(emu_fast, CUDA, m) {
  m.impl("splice_embeddings", &splice_embeddings_cuda);
}

}  // namespace emu_fast
