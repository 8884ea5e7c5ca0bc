// Argument checks of the emu_fast ops, shared by every backend (each op's CPU and CUDA
// implementations call the same one). They raise Python ValueError/TypeError
// (TORCH_CHECK_VALUE/TYPE) naming the op and what is wrong; they only read metadata, never
// tensor data, so they cost no device sync. Defined in checks.cpp (the common parts) and in
// ops/<op>.cpp (each op's own, declared below).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>

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

}  // namespace emu_fast
