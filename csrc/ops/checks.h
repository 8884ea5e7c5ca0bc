// Argument checks of the emu_fast ops, shared by every backend (each op's CPU and CUDA
// implementations call the same one). They raise Python ValueError/TypeError
// (TORCH_CHECK_VALUE/TYPE) naming the op and what is wrong; they only read metadata, never
// tensor data, so they cost no device sync. Defined in checks.cpp (the common parts) and in
// ops/<op>.cpp (each op's own, declared below).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

namespace emu_fast {

// A dtype as Python users write it: "torch.bfloat16", not "BFloat16".
std::string py_dtype(at::ScalarType s);

// Float dtypes a backend supports, for the message.
void check_float_dtype(const char* op, const char* name, const at::Tensor& t, bool allow_half);
void check_same_device(const char* op, const at::Tensor& ref, const char* name, const at::Tensor& t);
void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim);
void check_same_dtype(const char* op, const at::Tensor& ref, const char* name, const at::Tensor& t);
void check_contiguous(const char* op, const char* name, const at::Tensor& t);
// ValueError unless a and b share no byte of memory (the op writes b). Reads only metadata and
// storage pointers, so it also holds for meta/fake tensors (same storage, overlapping ranges).
void check_no_overlap(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                      const at::Tensor& b);

// What the CUDA decode attention supports (op_limits.h): `who` is "emu_fast.decode_attention" or
// "emu_fast.EmuDecoder"; group = query heads per KV head.
void check_cuda_attention_limits(const char* who, int64_t head_dim, int64_t group);

void check_splice(const at::Tensor& ids, const at::Tensor& table, const at::Tensor& values,
                  bool allow_half);
// The result of kernels::number_slots (ids [B*T], rows of T) against the S slot vectors given.
void check_splice_slots(int64_t numbered, const int64_t* ids, int64_t T, int64_t vocab, int64_t slot_id, int64_t S);
void check_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& cache_lens, const at::Tensor& positions,
                            const at::Tensor& rope_cos, const at::Tensor& rope_sin, bool allow_half);
// The optional split-counter buffer of decode_attention: int32, contiguous, on q's device, at
// least batch * Hkv elements.
void check_split_counters(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& counters);
void check_regression_head(const at::Tensor& hidden, const at::Tensor& norm_weight,
                           const at::Tensor& head_weight, const c10::optional<at::Tensor>& up_weight,
                           bool allow_half);
void check_gemv(const at::Tensor& x, const at::Tensor& weight, bool allow_half);
void check_norm_gemv(const at::Tensor& x, const at::Tensor& norm_weight, const at::Tensor& weight, bool allow_half);
void check_norm_gemv_silu(const at::Tensor& x, const at::Tensor& norm_weight, const at::Tensor& gate_up_weight,
                          bool allow_half);
void check_gemv_add(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& residual, bool allow_half);
void check_rms_norm(const char* op, const at::Tensor& x, const at::Tensor& weight, bool allow_half);
void check_add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                        bool allow_half);
void check_silu_mul(const at::Tensor& gate_up, bool allow_half);
// The weight-only quantized GEMVs (layouts: kernels/cpu/quantized_gemv.h).
void check_gemv_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, bool allow_half);
void check_gemv_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t group_size,
                     bool allow_half);

// Each op the decoder calls, as a handle: its name (emu_fast::<name>, and its ATen twin
// emu_fast_aten::<name>) and the C++ signature of its schema (ops/<op>.cpp). The decoder calls an
// op through an op set (ops/op_set.h): `kernels.call<ops::gemv>(x, weight)`. `residual`: the
// argument the self-check leaves out of its comparison (-1: none).
template <typename R, typename... Args>
struct OpHandle {
  using Result = R;
  using Sig = R(Args...);
  static constexpr int residual = -1;
};

namespace ops {
using T = const at::Tensor&;
using Pair = std::tuple<at::Tensor, at::Tensor>;
using OptT = const c10::optional<at::Tensor>&;
struct gemv : OpHandle<at::Tensor, T, T> {
  static constexpr const char* name = "gemv";
};
struct norm_gemv : OpHandle<at::Tensor, T, T, double, T> {
  static constexpr const char* name = "norm_gemv";
};
struct gemv_add : OpHandle<at::Tensor, T, T, T> {
  static constexpr const char* name = "gemv_add";
  static constexpr int residual = 2;
};
struct norm_gemv_silu : OpHandle<at::Tensor, T, T, double, T> {
  static constexpr const char* name = "norm_gemv_silu";
};
struct gemv_int8 : OpHandle<at::Tensor, T, T, T> {
  static constexpr const char* name = "gemv_int8";
};
struct gemv_int4 : OpHandle<at::Tensor, T, T, T, int64_t> {
  static constexpr const char* name = "gemv_int4";
};
struct rms_norm : OpHandle<at::Tensor, T, T, double> {
  static constexpr const char* name = "rms_norm";
};
struct add_rms_norm : OpHandle<Pair, T, T, T, double> {
  static constexpr const char* name = "add_rms_norm";
};
struct silu_mul : OpHandle<at::Tensor, T> {
  static constexpr const char* name = "silu_mul";
};
// q, k, v, k_cache, v_cache (written), cache_lens, positions, rope_cos, rope_sin, scale, split_counters.
struct decode_attention : OpHandle<at::Tensor, T, T, T, at::Tensor&, at::Tensor&, T, T, T, T, double, OptT> {
  static constexpr const char* name = "decode_attention";
};
struct regression_head : OpHandle<Pair, T, T, double, T, OptT> {
  static constexpr const char* name = "regression_head";
};
}  // namespace ops

}  // namespace emu_fast
