// Ops composed of other ops, stated once for every backend. Torch-free: each backend (the CPU
// glue in ops/gemv.cpp, the CUDA glue in ops/gemv.cu through cuda::GemvBackend, and the
// CUDA emulator in tests/cuda_emulation/kernels.cpp, which runs the CUDA backend) supplies,
// over raw pointers of its storage type T (x rows of unit column stride, row stride ldx; y dense):
//   Status gemv(const T* w, const T* x, int64_t ldx, T* y, int64_t batch, int64_t k, int64_t n);
//   Status norm_gemv(const T* w, const T* x, int64_t ldx, T* y, const T* norm_w, float eps,
//                    int64_t batch, int64_t k, int64_t n);      // y = rms_norm(x) @ w^T
//   static bool ok(Status);
// emu_fast/reference.py states the same compositions in PyTorch, as the oracle.
#pragma once
#include <cstdint>

namespace emu_fast::compose {

// emu_fast::regression_head: out [B, Dout] = rms_norm(hidden; norm_w, eps) @ head^T, then, when
// up is given (Emu2's project_up), next [B, H] = out @ up^T. Each weight is read once a batch.
template <typename T, typename Backend>
auto regression_head(Backend& be, const T* hidden, int64_t ld_hidden, const T* norm_w, float eps, const T* head,
                     const T* up, T* out, T* next, int64_t batch, int64_t hidden_size, int64_t out_size) {
  auto status = be.norm_gemv(head, hidden, ld_hidden, out, norm_w, eps, batch, hidden_size, out_size);
  if (!Backend::ok(status) || up == nullptr) return status;
  return be.gemv(up, out, out_size, next, batch, out_size, hidden_size);
}

}  // namespace emu_fast::compose
