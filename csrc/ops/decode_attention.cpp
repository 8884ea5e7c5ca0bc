// emu_fast::decode_attention: one decode step of attention over a KV cache, appending the step's
// rotated key and value. Its schema, argument checks, CPU implementation
// (kernels/cpu/decode_attention.h) and ATen twin; CUDA: decode_attention.cu.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "kernels/cpu/decode_attention.h"
#include "ops/checks.h"
#include "ops/cpu_glue.h"
#include "ops/limits.h"
#include "ops/registration.h"

namespace emu_fast {

namespace {

// The schemas, defined for emu_fast:: (our kernels) and emu_fast_aten:: (their ATen twins).
constexpr const char* kSchemas[] = {
    // One decode step of attention for B sequences (row b uses cache slot b): rotates q and k at
    // positions[b], appends k and v at index cache_lens[b] of k_cache/v_cache [Bmax,Hkv,S,D],
    // and attends over entries [0, cache_lens[b]]. q [B,Hq,D], k/v [B,Hkv,D], cache_lens and
    // positions int64 [B], rope_cos/rope_sin float32 [P, D/2]. Returns [B,Hq,D].
    // split_counters (CUDA; int32, at least B * Hkv, all zero): lets the last of the blocks that
    // share a row and KV head merge their partial results in the same launch (no second kernel);
    // the op leaves them zero again, so a caller keeps one buffer for every call on a stream. The
    // CPU kernel checks and ignores them.
    "decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_lens, Tensor positions, Tensor rope_cos, Tensor rope_sin, float scale, Tensor(c!)? split_counters=None) -> Tensor",
};

}  // namespace

void check_cuda_attention_limits(const char* who, int64_t head_dim, int64_t group) {
  TORCH_CHECK_VALUE(limits::cuda_head_dim_supported(head_dim), who, ": head_dim ", head_dim,
                    " is not supported on CUDA (", limits::kCudaHeadDimsText, ")");
  TORCH_CHECK_VALUE(group <= limits::kMaxQueryGroup, who, ": ", group, " query heads per KV head; at most ",
                    limits::kMaxQueryGroup, " on CUDA");
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

namespace {

using namespace cpu_glue;

// ---- CPU ----

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

// ---- ATen twins: the same op in plain ATen (any device; the portable step) ----

// Rotate-half RoPE in float32: x [..., D] with cos/sin broadcastable to [..., D/2].
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor x1 = xf.narrow(-1, 0, half), x2 = xf.narrow(-1, half, half);
  return at::cat({x1 * cos - x2 * sin, x2 * cos + x1 * sin}, -1);
}

// No host syncs and no data-dependent shapes (attention runs over the whole cache capacity under
// a length mask), so a CUDA graph captures it. split_counters: no splits here.
at::Tensor decode_attention_aten(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                                 at::Tensor& v_cache, const at::Tensor& cache_lens, const at::Tensor& positions,
                                 const at::Tensor& rope_cos, const at::Tensor& rope_sin, double scale,
                                 const c10::optional<at::Tensor>& /*split_counters*/) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1), S = k_cache.size(2);
  const at::Tensor cos = rope_cos.index_select(0, positions).unsqueeze(1);  // [B, 1, D/2]
  const at::Tensor sin = rope_sin.index_select(0, positions).unsqueeze(1);
  const at::Tensor q_rot = rotate(q, cos, sin);  // kept in float32, as the kernels keep it
  const at::Tensor k_rot = rotate(k, cos, sin).to(k_cache.scalar_type());

  // Append at each row's own length: a scatter along the sequence dim (no host sync).
  at::Tensor kc = k_cache.narrow(0, 0, B), vc = v_cache.narrow(0, 0, B);
  const at::Tensor at_len = cache_lens.view({B, 1, 1, 1}).expand({B, Hkv, 1, D});
  kc.scatter_(2, at_len, k_rot.unsqueeze(2));
  vc.scatter_(2, at_len, v.to(v_cache.scalar_type()).unsqueeze(2));

  // Attend over the whole capacity under a length mask (fixed shapes for a graph). A row's
  // G query heads of one KV head share its keys: [B, Hkv, G, D] x [B, Hkv, D, S].
  const at::Tensor valid = at::arange(S, cache_lens.options()).view({1, 1, 1, S}) <= cache_lens.view({B, 1, 1, 1});
  const at::Tensor scores =
      at::matmul(q_rot.reshape({B, Hkv, Hq / Hkv, D}), kc.to(at::kFloat).transpose(-1, -2)).mul_(scale);
  const at::Tensor probs =
      scores.masked_fill(valid.logical_not(), -std::numeric_limits<float>::infinity()).softmax(-1);
  // Entries past a row's length may hold anything (an earlier request's, or never written):
  // zero them so 0 * garbage cannot make a NaN.
  const at::Tensor values = at::where(valid.view({B, 1, S, 1}), vc.to(at::kFloat), at::zeros({}, probs.options()));
  return at::matmul(probs, values).reshape({B, Hq, D}).to(q.scalar_type());
}

}  // namespace

EMU_FAST_DEFINE_OP_AND_TWIN(kSchemas)

TORCH_LIBRARY_IMPL(emu_fast, CPU, m) {
  m.impl("decode_attention", &decode_attention_cpu);
}

TORCH_LIBRARY_IMPL(emu_fast_aten, CompositeExplicitAutograd, m) {
  m.impl("decode_attention", &decode_attention_aten);
}

}  // namespace emu_fast
