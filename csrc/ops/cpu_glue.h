// What the CPU implementations of the ops (ops/<op>.cpp) share to unwrap tensors for the torch-free
// kernels of kernels/cpu/: the kernel scalar type of a dtype, raw pointers, float32 copies of
// activation rows, parallel chunking, and the row loops two ops use (rms_norm rows, silu_mul).
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "kernels/cpu/norm.h"
#include "kernels/cpu/scalar.h"
#include "ops/checks.h"

namespace emu_fast::cpu_glue {

using kernels::bf16;

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// Calls f(T{}) with T the kernel scalar type of s.
template <typename F>
void dispatch_float(at::ScalarType s, F&& f) {
  if (s == at::kFloat) {
    f(float{});
  } else if (s == at::kBFloat16) {
    f(bf16{});
  } else {
    TORCH_CHECK_TYPE(false, "emu_fast: unsupported dtype ", py_dtype(s), " on the CPU");
  }
}

// Rows per parallel chunk so that each chunk has at least ~16k multiply-adds of work.
inline int64_t grain_rows(int64_t work_per_row) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, work_per_row)); }

// x [B,K] of T -> float32 copy [B, ld] with contiguous rows, zeros in columns K..ld-1 (int4's
// padded blocks); a few KB: activations, not weights.
template <typename T>
std::vector<float> widen_rows_padded(const at::Tensor& x, int64_t ld) {
  const int64_t B = x.size(0), K = x.size(1);
  std::vector<float> out(B * ld, 0.f);
  const T* base = ptr<T>(x);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K; ++k) out[b * ld + k] = kernels::to_float(base[b * x.stride(0) + k * x.stride(1)]);
  return out;
}

template <typename T>
std::vector<float> widen_rows(const at::Tensor& x) {
  return widen_rows_padded<T>(x, x.size(1));
}

// y [B, N] of T from float32 rows that compute_rows(float* y) writes: in place for float32,
// else into a float32 buffer rounded to T once.
template <typename T, typename F>
void into_output(T* out, int64_t B, int64_t N, F&& compute_rows) {
  std::vector<float> y(std::is_same_v<T, float> ? 0 : B * N);
  float* yp = std::is_same_v<T, float> ? reinterpret_cast<float*>(out) : y.data();
  compute_rows(yp);
  if constexpr (!std::is_same_v<T, float>) {
    for (int64_t i = 0; i < B * N; ++i) out[i] = kernels::from_float<T>(y[i]);
  }
}

// Rows x [B, H] (row stride ldx) -> rms_norm rows y [B, H].
template <typename T>
void rms_norm_rows(const T* x, int64_t ldx, const T* w, float eps, int64_t B, int64_t H, T* y) {
  at::parallel_for(0, B, grain_rows(H), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) kernels::rms_norm_row_cpu(x + b * ldx, w, eps, H, y + b * H);
  });
}

// gate_up [B, 2I] = [gate | up] -> silu(gate) * up, gate_up already checked.
inline at::Tensor silu_mul_unchecked(const at::Tensor& gate_up_in) {
  const at::Tensor gate_up = gate_up_in.contiguous();
  const int64_t B = gate_up.size(0), I = gate_up.size(1) / 2;
  at::Tensor out = at::empty({B, I}, gate_up.options());
  dispatch_float(gate_up.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, B, grain_rows(I), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        kernels::silu_mul_cpu(ptr<T>(gate_up) + b * 2 * I, ptr<T>(gate_up) + b * 2 * I + I, I, ptr<T>(out) + b * I);
    });
  });
  return out;
}

}  // namespace emu_fast::cpu_glue
