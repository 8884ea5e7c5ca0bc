#include "checks.h"

#include <c10/util/Exception.h>

#include "kernels/quantized_gemv.h"
#include "op_limits.h"

namespace emu_fast {

std::string py_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(s);
  }
}

void check_float_dtype(const char* op, const char* name, const at::Tensor& t, bool allow_half) {
  const auto s = t.scalar_type();
  const bool ok = s == at::kFloat || s == at::kBFloat16 || (allow_half && s == at::kHalf);
  TORCH_CHECK_TYPE(ok, "emu_fast.", op, ": ", name, " must be float32 or bfloat16",
                   allow_half ? " or float16" : " on this device", ", got ", py_dtype(s));
}

void check_same_device(const char* op, const at::Tensor& ref, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "emu_fast.", op, ": ", name, " is on ", t.device(),
                    " but the other inputs are on ", ref.device());
}

void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, "emu_fast.", op, ": ", name, " must be ", dim,
                    "-D, got shape ", t.sizes());
}

void check_cuda_attention_limits(const char* who, int64_t head_dim, int64_t group) {
  TORCH_CHECK_VALUE(limits::cuda_head_dim_supported(head_dim), who, ": head_dim ", head_dim,
                    " is not supported on CUDA (", limits::kCudaHeadDimsText, ")");
  TORCH_CHECK_VALUE(group <= limits::kMaxQueryGroup, who, ": ", group, " query heads per KV head; at most ",
                    limits::kMaxQueryGroup, " on CUDA");
}

static void check_same_dtype(const char* op, const at::Tensor& ref, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "emu_fast.", op, ": ", name, " is ",
                   py_dtype(t.scalar_type()), " but must match the other inputs' ", py_dtype(ref.scalar_type()));
}

// The bytes [lo, hi) a tensor's elements span within its storage; empty for no elements.
static std::pair<int64_t, int64_t> byte_span(const at::Tensor& t) {
  if (t.numel() == 0) return {0, 0};
  int64_t lo = t.storage_offset(), hi = t.storage_offset();
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t reach = (t.size(d) - 1) * t.stride(d);
    (reach < 0 ? lo : hi) += reach;
  }
  const int64_t item = static_cast<int64_t>(t.element_size());
  return {lo * item, (hi + 1) * item};
}

void check_no_overlap(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                      const at::Tensor& b) {
  if (!a.has_storage() || !b.has_storage() || a.numel() == 0 || b.numel() == 0) return;
  // Same storage (meta and fake tensors too), or two storages over the same memory.
  const bool same = a.storage().is_alias_of(b.storage());
  const char *base_a = nullptr, *base_b = nullptr;
  if (!same && a.device() == b.device() && !a.is_meta()) {
    try {  // some storages (fake tensors') refuse data-pointer access; then only aliasing counts
      base_a = static_cast<const char*>(a.storage().data());
      base_b = static_cast<const char*>(b.storage().data());
    } catch (const c10::Error&) {
      base_a = base_b = nullptr;
    }
  }
  if (!same && (base_a == nullptr || base_b == nullptr)) return;
  const auto [lo_a, hi_a] = byte_span(a);
  const auto [lo_b, hi_b] = byte_span(b);
  // Offsets relative to one base: a's storage start, b's shifted by the distance between them.
  const int64_t shift = same ? 0 : static_cast<int64_t>(base_b - base_a);
  const bool disjoint = hi_a <= lo_b + shift || hi_b + shift <= lo_a;
  TORCH_CHECK_VALUE(disjoint, "emu_fast.", op, ": ", name_a, " and ", name_b, " overlap in memory; the op writes ",
                    name_b, ", so they must be separate tensors");
}

static void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "emu_fast.", op, ": ", name, " must be contiguous");
}

void check_splice(const at::Tensor& ids, const at::Tensor& table, const at::Tensor& values,
                  bool allow_half) {
  const char* op = "splice_embeddings";
  check_dim(op, "input_ids", ids, 2);
  check_dim(op, "embed_table", table, 2);
  check_dim(op, "slot_values", values, 2);
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, "emu_fast.", op, ": input_ids must be int64, got ",
                   py_dtype(ids.scalar_type()));
  check_float_dtype(op, "embed_table", table, allow_half);
  check_same_dtype(op, table, "slot_values", values);
  check_same_device(op, table, "input_ids", ids);
  check_same_device(op, table, "slot_values", values);
  TORCH_CHECK_VALUE(values.size(1) == table.size(1), "emu_fast.", op, ": slot_values have width ",
                    values.size(1), " but the embedding table has hidden size ", table.size(1));
  check_contiguous(op, "embed_table", table);
}

void check_splice_slots(int64_t numbered, const int64_t* ids, int64_t T, int64_t vocab, int64_t slot_id,
                        int64_t S) {
  if (numbered < 0) {
    const int64_t p = -numbered - 1;
    TORCH_CHECK_INDEX(false, "emu_fast.splice_embeddings: token id ", ids[p], " at (row ", p / T, ", position ",
                      p % T, ") is outside the embedding table of ", vocab, " rows");
  }
  TORCH_CHECK_VALUE(numbered == S, "emu_fast.splice_embeddings: the input has ", numbered, " slots (token id ",
                    slot_id, ") but ", S, " slot vectors were given");
}

void check_split_counters(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& counters) {
  const char* op = "decode_attention";
  check_same_device(op, q, "split_counters", counters);
  TORCH_CHECK_TYPE(counters.scalar_type() == at::kInt, "emu_fast.", op, ": split_counters must be int32, got ",
                   counters.scalar_type());
  TORCH_CHECK_VALUE(counters.dim() == 1 && counters.is_contiguous(), "emu_fast.", op,
                    ": split_counters must be a contiguous vector, got shape ", counters.sizes());
  const int64_t needed = q.dim() == 3 && k_cache.dim() == 4 ? q.size(0) * k_cache.size(1) : 0;
  TORCH_CHECK_VALUE(counters.numel() >= needed, "emu_fast.", op, ": split_counters needs one entry per sequence and KV "
                    "head (", needed, "), got ", counters.numel());
}

void check_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& cache_lens, const at::Tensor& positions,
                            const at::Tensor& rope_cos, const at::Tensor& rope_sin, bool allow_half) {
  const char* op = "decode_attention";
  check_dim(op, "q", q, 3);
  check_dim(op, "k", k, 3);
  check_dim(op, "v", v, 3);
  check_dim(op, "k_cache", k_cache, 4);
  check_dim(op, "v_cache", v_cache, 4);
  check_dim(op, "cache_lens", cache_lens, 1);
  check_dim(op, "positions", positions, 1);
  check_dim(op, "rope_cos", rope_cos, 2);
  check_dim(op, "rope_sin", rope_sin, 2);
  check_float_dtype(op, "q", q, allow_half);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v},
                         {"k_cache", k_cache}, {"v_cache", v_cache}})
    check_same_dtype(op, q, name, t);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v},
                         {"k_cache", k_cache}, {"v_cache", v_cache}, {"cache_lens", cache_lens},
                         {"positions", positions}, {"rope_cos", rope_cos}, {"rope_sin", rope_sin}})
    check_same_device(op, q, name, t);
  TORCH_CHECK_TYPE(cache_lens.scalar_type() == at::kLong && positions.scalar_type() == at::kLong,
                   "emu_fast.", op, ": cache_lens and positions must be int64");
  TORCH_CHECK_TYPE(rope_cos.scalar_type() == at::kFloat && rope_sin.scalar_type() == at::kFloat,
                   "emu_fast.", op, ": rope_cos and rope_sin must be float32");

  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Bmax = k_cache.size(0), Hkv = k_cache.size(1), S = k_cache.size(2);
  TORCH_CHECK_VALUE(Hq > 0 && Hkv > 0, "emu_fast.", op, ": need at least one query and one KV head, got ", Hq,
                    " and ", Hkv);
  TORCH_CHECK_VALUE(D % 2 == 0 && D > 0, "emu_fast.", op, ": head_dim must be even, got ", D);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes() && k.size(0) == B && k.size(2) == D, "emu_fast.", op,
                    ": k and v must be [", B, ", Hkv, ", D, "], got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK_VALUE(k.size(1) == Hkv && v_cache.sizes() == k_cache.sizes() && k_cache.size(3) == D,
                    "emu_fast.", op, ": caches must be [Bmax, ", k.size(1), ", S, ", D, "], got ",
                    k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK_VALUE(Hq % Hkv == 0, "emu_fast.", op, ": ", Hq, " query heads is not a multiple of ",
                    Hkv, " KV heads");
  TORCH_CHECK_VALUE(B <= Bmax, "emu_fast.", op, ": batch ", B, " exceeds the cache's ", Bmax, " slots");
  TORCH_CHECK_VALUE(S > 0, "emu_fast.", op, ": the cache has no room (capacity 0)");
  TORCH_CHECK_VALUE(cache_lens.size(0) == B && positions.size(0) == B, "emu_fast.", op,
                    ": cache_lens and positions must have one entry per sequence (", B, "), got ",
                    cache_lens.size(0), " and ", positions.size(0));
  TORCH_CHECK_VALUE(rope_cos.sizes() == rope_sin.sizes() && rope_cos.size(1) == D / 2, "emu_fast.", op,
                    ": rope_cos/rope_sin must be [P, ", D / 2, "], got ", rope_cos.sizes(), " and ",
                    rope_sin.sizes());
  // Row-major heads with contiguous head_dim; the batch stride is free, so q/k/v may be
  // slices of one fused QKV projection.
  // The stride of a size-1 dimension is never used, and an empty tensor has no elements to
  // lay out: neither constrains the layout.
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {"k", k}, {"v", v}}) {
    const bool heads_ok = t.numel() == 0 || ((t.size(2) == 1 || t.stride(2) == 1) &&
                                             (t.size(1) == 1 || t.stride(1) == D));
    TORCH_CHECK_VALUE(heads_ok, "emu_fast.", op, ": ", name, " must have contiguous heads (strides [*, ", D,
                      ", 1]), got ", t.strides());
  }
  check_contiguous(op, "k_cache", k_cache);
  check_contiguous(op, "v_cache", v_cache);
  // The op writes both caches: no input may share memory with them, nor they with each other.
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {"k", k}, {"v", v},
                         {"cache_lens", cache_lens}, {"positions", positions}, {"rope_cos", rope_cos},
                         {"rope_sin", rope_sin}}) {
    check_no_overlap(op, name, t, "k_cache", k_cache);
    check_no_overlap(op, name, t, "v_cache", v_cache);
  }
  check_no_overlap(op, "k_cache", k_cache, "v_cache", v_cache);
  check_contiguous(op, "rope_cos", rope_cos);
  check_contiguous(op, "rope_sin", rope_sin);
  check_contiguous(op, "cache_lens", cache_lens);
  check_contiguous(op, "positions", positions);
}

void check_regression_head(const at::Tensor& hidden, const at::Tensor& norm_weight,
                           const at::Tensor& head_weight, const c10::optional<at::Tensor>& up_weight,
                           bool allow_half) {
  const char* op = "regression_head";
  check_dim(op, "hidden", hidden, 2);
  check_dim(op, "norm_weight", norm_weight, 1);
  check_dim(op, "head_weight", head_weight, 2);
  check_float_dtype(op, "hidden", hidden, allow_half);
  check_same_dtype(op, hidden, "norm_weight", norm_weight);
  check_same_dtype(op, hidden, "head_weight", head_weight);
  check_same_device(op, hidden, "norm_weight", norm_weight);
  check_same_device(op, hidden, "head_weight", head_weight);
  const int64_t H = hidden.size(1);
  TORCH_CHECK_VALUE(norm_weight.size(0) == H && head_weight.size(1) == H, "emu_fast.", op,
                    ": hidden size ", H, " does not match norm_weight ", norm_weight.sizes(),
                    " and head_weight ", head_weight.sizes());
  check_contiguous(op, "head_weight", head_weight);
  check_contiguous(op, "norm_weight", norm_weight);
  if (up_weight.has_value()) {
    const auto& up = *up_weight;
    check_dim(op, "up_weight", up, 2);
    check_same_dtype(op, hidden, "up_weight", up);
    check_same_device(op, hidden, "up_weight", up);
    TORCH_CHECK_VALUE(up.size(1) == head_weight.size(0), "emu_fast.", op, ": up_weight ", up.sizes(),
                      " does not take the head's output size ", head_weight.size(0));
    check_contiguous(op, "up_weight", up);
  }
}

namespace {
// x [B, K] @ weight [N, K]^T (named `name` in messages), for each GEMV op.
void check_gemv_operands(const char* op, const at::Tensor& x, const at::Tensor& weight, bool allow_half,
                         const char* name = "weight") {
  check_dim(op, "x", x, 2);
  check_dim(op, name, weight, 2);
  check_float_dtype(op, "x", x, allow_half);
  check_same_dtype(op, x, name, weight);
  check_same_device(op, x, name, weight);
  TORCH_CHECK_VALUE(x.size(1) == weight.size(1), "emu_fast.", op, ": x ", x.sizes(), " does not match ", name, " ",
                    weight.sizes(), " (inner sizes differ)");
  check_contiguous(op, name, weight);
}

// A further operand of a GEMV op: `dim` dimensions, x's dtype and device.
void check_operand(const char* op, const at::Tensor& x, const char* name, const at::Tensor& t, int64_t dim) {
  check_dim(op, name, t, dim);
  check_same_dtype(op, x, name, t);
  check_same_device(op, x, name, t);
}
}  // namespace

void check_gemv(const at::Tensor& x, const at::Tensor& weight, bool allow_half) {
  check_gemv_operands("gemv", x, weight, allow_half);
}

namespace {
// x [B, K], norm_weight [K], weight [N, K] (named `name`): the operands of the norm GEMV ops.
void check_norm_gemv_operands(const char* op, const at::Tensor& x, const at::Tensor& norm_weight,
                              const at::Tensor& weight, bool allow_half, const char* name) {
  check_gemv_operands(op, x, weight, allow_half, name);
  check_operand(op, x, "norm_weight", norm_weight, 1);
  TORCH_CHECK_VALUE(norm_weight.size(0) == x.size(1), "emu_fast.", op, ": norm_weight ", norm_weight.sizes(),
                    " does not match x ", x.sizes());
  check_contiguous(op, "norm_weight", norm_weight);
}
}  // namespace

void check_norm_gemv(const at::Tensor& x, const at::Tensor& norm_weight, const at::Tensor& weight, bool allow_half) {
  check_norm_gemv_operands("norm_gemv", x, norm_weight, weight, allow_half, "weight");
}

void check_norm_gemv_silu(const at::Tensor& x, const at::Tensor& norm_weight, const at::Tensor& gate_up_weight,
                          bool allow_half) {
  const char* op = "norm_gemv_silu";
  check_norm_gemv_operands(op, x, norm_weight, gate_up_weight, allow_half, "gate_up_weight");
  TORCH_CHECK_VALUE(gate_up_weight.size(0) % 2 == 0, "emu_fast.", op,
                    ": gate_up_weight must be [gate rows; up rows]; its ", gate_up_weight.size(0), " rows are odd");
}

void check_gemv_add(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& residual, bool allow_half) {
  const char* op = "gemv_add";
  check_gemv_operands(op, x, weight, allow_half);
  check_operand(op, x, "residual", residual, 2);
  TORCH_CHECK_VALUE(residual.size(0) == x.size(0) && residual.size(1) == weight.size(0), "emu_fast.", op,
                    ": residual ", residual.sizes(), " is not [", x.size(0), ", ", weight.size(0), "]");
}

void check_rms_norm(const char* op, const at::Tensor& x, const at::Tensor& weight, bool allow_half) {
  check_dim(op, "x", x, 2);
  check_dim(op, "weight", weight, 1);
  check_float_dtype(op, "x", x, allow_half);
  check_same_dtype(op, x, "weight", weight);
  check_same_device(op, x, "weight", weight);
  TORCH_CHECK_VALUE(weight.size(0) == x.size(1), "emu_fast.", op, ": weight ", weight.sizes(),
                    " does not match x ", x.sizes());
  check_contiguous(op, "weight", weight);
}

void check_add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                        bool allow_half) {
  const char* op = "add_rms_norm";
  check_rms_norm(op, x, weight, allow_half);
  check_same_dtype(op, x, "residual", residual);
  check_same_device(op, x, "residual", residual);
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes(), "emu_fast.", op, ": residual ", residual.sizes(),
                    " does not match x ", x.sizes());
}

void check_silu_mul(const at::Tensor& gate_up, bool allow_half) {
  const char* op = "silu_mul";
  check_dim(op, "gate_up", gate_up, 2);
  check_float_dtype(op, "gate_up", gate_up, allow_half);
  TORCH_CHECK_VALUE(gate_up.size(1) % 2 == 0, "emu_fast.", op, ": gate_up must be [gate | up]; its width ",
                    gate_up.size(1), " is odd");
}

namespace {
// x [B, K], qweight (dtype q_dtype, 2-D, contiguous), scales float32 (scale_dim-D, contiguous):
// what both quantized GEMV ops take.
void check_quantized_operands(const char* op, const at::Tensor& x, const at::Tensor& qweight, at::ScalarType q_dtype,
                              const at::Tensor& scales, int64_t scale_dim, bool allow_half) {
  check_dim(op, "x", x, 2);
  check_dim(op, "qweight", qweight, 2);
  check_dim(op, "scales", scales, scale_dim);
  check_float_dtype(op, "x", x, allow_half);
  TORCH_CHECK_TYPE(qweight.scalar_type() == q_dtype, "emu_fast.", op, ": qweight must be ", py_dtype(q_dtype),
                   ", got ", py_dtype(qweight.scalar_type()));
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat, "emu_fast.", op, ": scales must be torch.float32, got ",
                   py_dtype(scales.scalar_type()));
  check_same_device(op, x, "qweight", qweight);
  check_same_device(op, x, "scales", scales);
  TORCH_CHECK_VALUE(scales.size(0) == qweight.size(0), "emu_fast.", op, ": scales ", scales.sizes(),
                    " must have one row per output row of qweight ", qweight.sizes());
  check_contiguous(op, "qweight", qweight);
  check_contiguous(op, "scales", scales);
}
}  // namespace

void check_gemv_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, bool allow_half) {
  const char* op = "gemv_int8";
  check_quantized_operands(op, x, qweight, at::kChar, scales, 1, allow_half);
  TORCH_CHECK_VALUE(qweight.size(1) == x.size(1), "emu_fast.", op, ": x ", x.sizes(), " does not match qweight ",
                    qweight.sizes(), " (inner sizes differ)");
}

void check_gemv_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t group_size,
                     bool allow_half) {
  const char* op = "gemv_int4";
  TORCH_CHECK_VALUE(group_size > 0 && group_size % kernels::kInt4Block == 0, "emu_fast.", op, ": group_size must be",
                    " a positive multiple of ", kernels::kInt4Block, ", got ", group_size);
  check_quantized_operands(op, x, qweight, at::kByte, scales, 2, allow_half);
  const int64_t K = x.size(1);
  TORCH_CHECK_VALUE(qweight.size(1) == kernels::int4_row_bytes(K), "emu_fast.", op, ": qweight ", qweight.sizes(),
                    " does not hold x's ", K, " inputs per row (two a byte, padded to a multiple of ",
                    kernels::kInt4Block, ": ", kernels::int4_row_bytes(K), " bytes)");
  TORCH_CHECK_VALUE(scales.size(1) == kernels::int4_groups(K, group_size), "emu_fast.", op, ": scales ",
                    scales.sizes(), " must have ", kernels::int4_groups(K, group_size), " groups per row (", K,
                    " inputs, group_size ", group_size, ")");
}

}  // namespace emu_fast
