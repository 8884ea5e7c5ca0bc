// CPU implementations of the emu_fast ops: argument checks, then the torch-free kernels in
// csrc/kernels/ run under at::parallel_for. float32 and bfloat16, float32 accumulation.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "checks.h"
#include "compose.h"
#include "kernels/decode_attention.h"
#include "kernels/gemv.h"
#include "kernels/norm.h"
#include "kernels/quantized_gemv.h"
#include "kernels/splice.h"

namespace emu_fast {
namespace {

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
int64_t grain_rows(int64_t work_per_row) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, work_per_row)); }

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

at::Tensor splice_embeddings_cpu(const at::Tensor& ids, const at::Tensor& table,
                                 const at::Tensor& values, int64_t slot_id) {
  check_splice(ids, table, values, /*allow_half=*/true);
  const int64_t B = ids.size(0), T = ids.size(1), V = table.size(0), H = table.size(1);
  const int64_t S = values.size(0);
  const at::Tensor ids_c = ids.contiguous();
  const at::Tensor values_c = values.contiguous();
  const int64_t* id = ids_c.data_ptr<int64_t>();

  // Pass 1 over the ids only: validate, and give each slot its row-major index.
  std::vector<int64_t> slot_index(B * T, -1);
  check_splice_slots(kernels::number_slots(id, B * T, V, slot_id, slot_index.data()), id, T, V, slot_id, S);

  // Pass 2: one row copy per position, straight into the output.
  at::Tensor out = at::empty({B, T, H}, table.options());
  const size_t row_bytes = H * table.element_size();
  const char* src_table = static_cast<const char*>(table.data_ptr());
  const char* src_values = static_cast<const char*>(values_c.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, B * T, grain_rows(H), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const char* src = slot_index[p] >= 0 ? src_values + slot_index[p] * row_bytes
                                           : src_table + id[p] * row_bytes;
      std::memcpy(dst + p * row_bytes, src, row_bytes);
    }
  });
  return out;
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_lens,
                                const at::Tensor& positions, const at::Tensor& rope_cos,
                                const at::Tensor& rope_sin, double scale,
                                const c10::optional<at::Tensor>& split_counters) {
  check_decode_attention(q, k, v, k_cache, v_cache, cache_lens, positions, rope_cos, rope_sin, false);
  if (split_counters) check_split_counters(q, k_cache, *split_counters);  // the CPU kernel has no splits to merge
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(2), P = rope_cos.size(0);
  // Private copies: what is validated is what the kernel reads, whatever else writes the
  // caller's tensors meanwhile.
  const std::vector<int64_t> lens_copy(cache_lens.data_ptr<int64_t>(), cache_lens.data_ptr<int64_t>() + B);
  const std::vector<int64_t> pos_copy(positions.data_ptr<int64_t>(), positions.data_ptr<int64_t>() + B);
  const int64_t* lens = lens_copy.data();
  const int64_t* pos = pos_copy.data();
  // Validate every row before writing any: a rejected call leaves the caches untouched.
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(lens[b] >= 0 && lens[b] < S, "emu_fast.decode_attention: sequence ", b, " has ",
                      lens[b], " cached entries; the cache holds ", S, " so there is no room for one more");
    TORCH_CHECK_VALUE(pos[b] >= 0 && pos[b] < P, "emu_fast.decode_attention: position ", pos[b],
                      " of sequence ", b, " is outside the RoPE table of ", P, " positions");
  }
  at::Tensor out = at::empty({B, Hq, D}, q.options());
  dispatch_float(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const kernels::DecodeBatch<T> batch{ptr<T>(q), ptr<T>(k), ptr<T>(v), q.stride(0), k.stride(0), v.stride(0),
                                        ptr<T>(k_cache), ptr<T>(v_cache), ptr<T>(out), Hq, Hkv, D, S, lens, pos,
                                        ptr<float>(rope_cos), ptr<float>(rope_sin), static_cast<float>(scale)};
    at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> scratch;
      kernels::decode_attention_tasks(batch, t0, t1, scratch);
    });
  });
  return out;
}

// y [B, N] = xf [B, K] (widened to float32) @ w^T, float32 accumulation, rounded to T once.
template <typename T>
void gemv_widened(const T* w, const float* xf, T* out, int64_t B, int64_t K, int64_t N) {
  if (B == 0 || N == 0) return;
  into_output(out, B, N, [&](float* y) {
    at::parallel_for(0, N, grain_rows(K * B), [&](int64_t n0, int64_t n1) {
      kernels::gemv_rows(w, xf, y, B, K, N, n0, n1);
    });
  });
}

// Rows x [B, H] (row stride ldx) -> rms_norm rows y [B, H].
template <typename T>
void rms_norm_rows(const T* x, int64_t ldx, const T* w, float eps, int64_t B, int64_t H, T* y) {
  at::parallel_for(0, B, grain_rows(H), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) kernels::rms_norm_row_cpu(x + b * ldx, w, eps, H, y + b * H);
  });
}

// The CPU backend of the compositions in compose.h.
template <typename T>
struct CpuBackend {
  static bool ok(bool) { return true; }
  bool gemv(const T* w, const T* x, int64_t ldx, T* y, int64_t B, int64_t K, int64_t N) {
    std::vector<float> xf(B * K);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < K; ++k) xf[b * K + k] = kernels::to_float(x[b * ldx + k]);
    gemv_widened(w, xf.data(), y, B, K, N);
    return true;
  }
  bool norm_gemv(const T* w, const T* x, int64_t ldx, T* y, const T* norm_w, float eps, int64_t B, int64_t K,
                 int64_t N) {
    std::vector<T> normed(B * K);
    rms_norm_rows(x, ldx, norm_w, eps, B, K, normed.data());
    return gemv(w, normed.data(), K, y, B, K, N);
  }
};

at::Tensor gemv_cpu(const at::Tensor& x, const at::Tensor& weight) {
  check_gemv(x, weight, false);
  const int64_t B = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor out = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return out;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    gemv_widened(ptr<T>(weight), widen_rows<T>(x).data(), ptr<T>(out), B, K, N);
  });
  return out;
}

// x [B, K] with unit column stride: as it is, else a contiguous copy (what the backend takes).
at::Tensor unit_columns(const at::Tensor& x) { return x.stride(1) == 1 ? x : x.contiguous(); }

// rms_norm(x) @ weight^T, the operands already checked (norm_gemv, norm_gemv_silu).
at::Tensor norm_gemv_unchecked(const at::Tensor& x_in, const at::Tensor& norm_weight, double eps,
                               const at::Tensor& weight) {
  const at::Tensor x = unit_columns(x_in);
  const int64_t B = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor out = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return out;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    CpuBackend<T>{}.norm_gemv(ptr<T>(weight), ptr<T>(x), x.stride(0), ptr<T>(out), ptr<T>(norm_weight),
                              static_cast<float>(eps), B, K, N);
  });
  return out;
}

at::Tensor norm_gemv_cpu(const at::Tensor& x, const at::Tensor& norm_weight, double eps, const at::Tensor& weight) {
  check_norm_gemv(x, norm_weight, weight, false);
  return norm_gemv_unchecked(x, norm_weight, eps, weight);
}

// residual + x @ weight^T: the product rounded to the dtype, then the sum (as ATen's
// residual + linear(x, weight), and as the fused CPU step adds a projection to the residual).
at::Tensor gemv_add_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& residual_in) {
  check_gemv_add(x, weight, residual_in, false);
  const int64_t B = x.size(0), K = x.size(1), N = weight.size(0);
  const at::Tensor residual = residual_in.contiguous();
  at::Tensor out = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return out;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    T* y = ptr<T>(out);
    const T* r = ptr<T>(residual);
    gemv_widened(ptr<T>(weight), widen_rows<T>(x).data(), y, B, K, N);
    for (int64_t i = 0; i < B * N; ++i) y[i] = kernels::from_float<T>(kernels::to_float(r[i]) + kernels::to_float(y[i]));
  });
  return out;
}

at::Tensor rms_norm_cpu(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  check_rms_norm("rms_norm", x_in, weight, false);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), H = x.size(1);
  at::Tensor out = at::empty({B, H}, x.options());
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    rms_norm_rows(ptr<T>(x), H, ptr<T>(weight), static_cast<float>(eps), B, H, ptr<T>(out));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x_in, const at::Tensor& residual_in,
                                                    const at::Tensor& weight, double eps) {
  check_add_rms_norm(x_in, residual_in, weight, false);
  const at::Tensor x = x_in.contiguous(), residual = residual_in.contiguous();
  const int64_t B = x.size(0), H = x.size(1);
  at::Tensor normed = at::empty({B, H}, x.options());
  at::Tensor sum = at::empty({B, H}, x.options());
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, B, grain_rows(H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        kernels::add_rms_norm_row_cpu(ptr<T>(x) + b * H, ptr<T>(residual) + b * H, ptr<T>(weight),
                                  static_cast<float>(eps), H, ptr<T>(sum) + b * H, ptr<T>(normed) + b * H);
    });
  });
  return {normed, sum};
}

// gate_up [B, 2I] = [gate | up] -> silu(gate) * up, gate_up already checked.
at::Tensor silu_mul_unchecked(const at::Tensor& gate_up_in) {
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

at::Tensor silu_mul_cpu(const at::Tensor& gate_up) {
  check_silu_mul(gate_up, false);
  return silu_mul_unchecked(gate_up);
}

// The composition itself: the CPU decode step fuses it (csrc/cpu/decode_step.cpp), not this op.
at::Tensor norm_gemv_silu_cpu(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                              const at::Tensor& gate_up_weight) {
  check_norm_gemv_silu(x, norm_weight, gate_up_weight, false);
  return silu_mul_unchecked(norm_gemv_unchecked(x, norm_weight, eps, gate_up_weight));
}

std::tuple<at::Tensor, at::Tensor> regression_head_cpu(const at::Tensor& hidden, const at::Tensor& norm_weight,
                                                       double eps, const at::Tensor& head_weight,
                                                       const c10::optional<at::Tensor>& up_weight) {
  check_regression_head(hidden, norm_weight, head_weight, up_weight, false);
  const at::Tensor h = hidden.contiguous();
  const int64_t B = h.size(0), H = h.size(1), Dout = head_weight.size(0);
  at::Tensor out = at::empty({B, Dout}, h.options());
  at::Tensor next = at::empty({B, up_weight.has_value() ? H : 0}, h.options());
  dispatch_float(h.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    CpuBackend<T> cpu;
    compose::regression_head<T>(cpu, ptr<T>(h), H, ptr<T>(norm_weight), static_cast<float>(eps), ptr<T>(head_weight),
                                up_weight.has_value() ? ptr<T>(*up_weight) : nullptr, ptr<T>(out), ptr<T>(next), B, H,
                                Dout);
  });
  return {out, next};
}

at::Tensor gemv_int8_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  check_gemv_int8(x, qweight, scales, false);
  const int64_t B = x.size(0), K = x.size(1), N = qweight.size(0);
  at::Tensor out = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return out;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const std::vector<float> xf = widen_rows<T>(x);
    const auto input = kernels::resolve_quantized_input(kernels::quantized_input_for<T>());  // once: every row alike
    into_output(ptr<T>(out), B, N, [&](float* y) {
      at::parallel_for(0, N, grain_rows(K * B), [&](int64_t n0, int64_t n1) {
        kernels::gemv_int8_rows(ptr<int8_t>(qweight), ptr<float>(scales), xf.data(), y, B, K, N, n0, n1, input);
      });
    });
  });
  return out;
}

at::Tensor gemv_int4_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         int64_t group_size) {
  check_gemv_int4(x, qweight, scales, group_size, false);
  const int64_t B = x.size(0), K = x.size(1), N = qweight.size(0);
  at::Tensor out = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return out;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const std::vector<float> xf = widen_rows_padded<T>(x, kernels::int4_padded_k(K));
    const auto input = kernels::resolve_quantized_input(kernels::quantized_input_for<T>());  // once: every row alike
    into_output(ptr<T>(out), B, N, [&](float* y) {
      at::parallel_for(0, N, grain_rows(K * B), [&](int64_t n0, int64_t n1) {
        kernels::gemv_int4_rows(ptr<uint8_t>(qweight), ptr<float>(scales), group_size, xf.data(), y, B, K, N, n0,
                                n1, input);
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(emu_fast, CPU, m) {
  m.impl("splice_embeddings", &splice_embeddings_cpu);
  m.impl("decode_attention", &decode_attention_cpu);
  m.impl("regression_head", &regression_head_cpu);
  m.impl("gemv", &gemv_cpu);
  m.impl("norm_gemv", &norm_gemv_cpu);
  m.impl("gemv_add", &gemv_add_cpu);
  m.impl("norm_gemv_silu", &norm_gemv_silu_cpu);
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("add_rms_norm", &add_rms_norm_cpu);
  m.impl("silu_mul", &silu_mul_cpu);
  m.impl("gemv_int8", &gemv_int8_cpu);
  m.impl("gemv_int4", &gemv_int4_cpu);
}

}  // namespace emu_fast
