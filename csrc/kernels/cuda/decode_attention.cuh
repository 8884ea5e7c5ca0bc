// Decode attention over a preallocated KV cache, one step for B sequences, with RoPE and the
// K/V append fused in and a split-KV (flash-decoding) path. No torch includes.
//
// Grid: (B * Hkv, splits). A block of 4 warps handles one sequence, one KV head and its whole
// group of query heads (GQA: each K/V row is loaded once for the group), over the cache slice
// [split * chunk, min((split + 1) * chunk, len)), where chunk spreads this row's len + 1 keys
// evenly over the splits (read on the device, see below). The new token (index len) belongs to
// split len / chunk: that block rotates and appends it (no other block reads index len) and
// attends to it from registers. Each warp keeps an online softmax; the warps are merged in shared
// memory; with several splits each block writes (out, max, sum), and the last block of its
// (sequence, KV head) to finish merges them (split_counters, see below), or, without counters,
// decode_attention_combine_kernel does in a second launch.
// Lane l holds head dims [l*E, (l+1)*E), E = D/32; rotate-half pairs lane l with lane l^16.
#pragma once
#include "common.cuh"
#include "ops/limits.h"

namespace emu_fast::cuda {

constexpr int kAttnWarps = 4;
constexpr int kMaxGroup = limits::kMaxQueryGroup;  // query heads per KV head
constexpr int kKeysPerWarpStep = 4;
constexpr int kMinChunk = kAttnWarps * kKeysPerWarpStep;  // keys a block takes in one step

struct DecodeAttentionParams {
  const void* q;  // [B, Hq, D], batch stride q_stride
  const void* k;  // [B, Hkv, D]
  const void* v;
  int64_t q_stride, k_stride, v_stride;
  void* k_cache;  // [Bmax, Hkv, capacity, D]
  void* v_cache;
  const int64_t* cache_lens;  // [B]
  const int64_t* positions;   // [B]
  const float* rope_cos;      // [P, D/2]
  const float* rope_sin;
  void* out;                  // [B, Hq, D]
  float* part_out;            // [B, Hq, splits, D]   (splits > 1; set by the launcher)
  float* part_max;            // [B, Hq, splits]
  float* part_sum;            // [B, Hq, splits]
  // [B * Hkv] int32, zero before the launch and zero again after it (nullptr: the combine runs as
  // a second kernel). Each split's block counts itself in; the last one merges the splits, then
  // resets the count, so one zeroed buffer serves every later call (the decoder keeps one per
  // device; a CUDA graph replays with it).
  int* split_counters;
  int64_t max_position;       // P
  int num_heads, num_kv_heads, capacity, splits;
  float scale;
  bool vector_loads;          // both caches aligned to E * sizeof(T) bytes (set by the launcher)
};

// Output element d of query row hq (b * Hq + head) from the splits' partial results: each
// split's normalized output weighted by its share of the softmax mass. Coherent (L2) loads: in
// the attention kernel the partials come from other blocks of the same launch.
template <int D>
__device__ __forceinline__ float merge_splits(const DecodeAttentionParams& p, int64_t hq, int d) {
  const int64_t first = hq * p.splits;
  float mx = -INFINITY;
  for (int i = 0; i < p.splits; ++i) mx = fmaxf(mx, __ldcg(p.part_max + first + i));
  float sum = 0.f, a = 0.f;
  for (int i = 0; i < p.splits; ++i) {
    const float l = __ldcg(p.part_sum + first + i);
    if (l > 0.f) {
      const float f = l * __expf(__ldcg(p.part_max + first + i) - mx);
      sum += f;
      a += f * __ldcg(p.part_out + (first + i) * D + d);
    }
  }
  return a / sum;
}

// kGroup: the largest query group this instance takes (1, 2, 4 or kMaxGroup; the group's own
// size is p.num_heads / p.num_kv_heads <= kGroup): Emu is multi-head (group 1), and arrays sized
// for 8 would cost it registers and shared memory for nothing.
template <typename T, int D, int kGroup>
__global__ void __launch_bounds__(kAttnWarps * 32) decode_attention_kernel(DecodeAttentionParams p) {
  constexpr int E = D / 32;
  constexpr int kHalf = D / 2;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int b = blockIdx.x / p.num_kv_heads, h = blockIdx.x % p.num_kv_heads, split = blockIdx.y;
  const int group = p.num_heads / p.num_kv_heads;
  // The lengths, positions and RoPE tables were written by kernels before the previous one
  // (common.cuh: what may be read before wait_for_prior_grid), so they are read while the QKV
  // projection drains; q, k, v and the output are touched only after the wait.
  const int64_t len = p.cache_lens[b], pos = p.positions[b];
  // Lengths live on the device, so the host cannot check them without a sync: a full cache or
  // a position outside the RoPE table gives NaN outputs and leaves the cache untouched.
  const bool valid = len >= 0 && len < p.capacity && pos >= 0 && pos < p.max_position;
  if (!valid) {
    wait_for_prior_grid();
    allow_dependent_launch();
    if ((p.splits == 1 || p.split_counters != nullptr) && split == 0)
      for (int t = threadIdx.x; t < group * D; t += blockDim.x)
        static_cast<T*>(p.out)[(static_cast<int64_t>(b) * p.num_heads + h * group) * D + t] = from_f<T>(NAN);
    return;
  }
  // This row's len + 1 keys spread evenly over the splits, at least kMinChunk each: a row much
  // shorter than the cache (Emu's prompts are) still uses every block of its head rather than
  // leaving the work to the first few. The length is read here, on the device, so the launch
  // is the same at every step and a CUDA graph replays it as the cache grows. chunk * splits
  // > len, so some split always owns the new token.
  const int64_t chunk = max(static_cast<int64_t>(kMinChunk), (len + p.splits) / p.splits);
  const int64_t start = static_cast<int64_t>(split) * chunk;
  const int64_t end = min(start + chunk, len);
  const bool has_new = len / chunk == split;

  // This lane's RoPE coefficients at the new token's position.
  float c[E], s[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int f = (lane * E + e) % kHalf;
    c[e] = p.rope_cos[pos * kHalf + f];
    s[e] = p.rope_sin[pos * kHalf + f];
  }
  wait_for_prior_grid();
  allow_dependent_launch();
  const bool first_half = lane < 16;
  auto rope = [&](float (&x)[E]) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const float other = __shfl_xor_sync(0xffffffffu, x[e], 16);
      x[e] = first_half ? x[e] * c[e] - other * s[e] : x[e] * c[e] + other * s[e];
    }
  };

  float qf[kGroup][E];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    if (g < group) {
      const T* qr = static_cast<const T*>(p.q) + b * p.q_stride + static_cast<int64_t>(h * group + g) * D;
#pragma unroll
      for (int e = 0; e < E; ++e) qf[g][e] = to_f(qr[lane * E + e]);
      rope(qf[g]);
#pragma unroll
      for (int e = 0; e < E; ++e) qf[g][e] *= p.scale;
    }
  }

  T* kc = static_cast<T*>(p.k_cache) + (static_cast<int64_t>(b) * p.num_kv_heads + h) * p.capacity * D;
  T* vc = static_cast<T*>(p.v_cache) + (static_cast<int64_t>(b) * p.num_kv_heads + h) * p.capacity * D;

  // The new token: rotate k, append k and v, and keep them (as stored) for the softmax.
  float kn[E], vn[E];
  if (has_new) {
    const T* kr = static_cast<const T*>(p.k) + b * p.k_stride + static_cast<int64_t>(h) * D;
    const T* vr = static_cast<const T*>(p.v) + b * p.v_stride + static_cast<int64_t>(h) * D;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      kn[e] = to_f(kr[lane * E + e]);
      vn[e] = to_f(vr[lane * E + e]);
    }
    rope(kn);
#pragma unroll
    for (int e = 0; e < E; ++e) {
      kn[e] = round_to<T>(kn[e]);
      if (warp == 0) {
        kc[len * D + lane * E + e] = from_f<T>(kn[e]);
        vc[len * D + lane * E + e] = from_f<T>(vn[e]);
      }
    }
  }

  float m[kGroup], l[kGroup], acc[kGroup][E];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[g][e] = 0.f;
  }
  // Online-softmax update with kKeys keys at once: one max and one rescale per group of keys,
  // and all their K/V rows loaded before any is used, so each warp keeps several rows in
  // flight (decode attention is bound by reading the cache). A key index past the slice
  // (valid[u] false) is skipped; the first is always valid.
  constexpr int kKeys = kKeysPerWarpStep;
  auto attend = [&](const float (&kr)[kKeys][E], const float (&vr)[kKeys][E], const bool (&valid)[kKeys]) {
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      if (g < group) {
        float score[kKeys];
        float m_new = m[g];
#pragma unroll
        for (int u = 0; u < kKeys; ++u) {
          float dot = 0.f;
#pragma unroll
          for (int e = 0; e < E; ++e) dot += qf[g][e] * kr[u][e];
          score[u] = valid[u] ? warp_sum(dot) : -INFINITY;
          m_new = fmaxf(m_new, score[u]);
        }
        const float corr = __expf(m[g] - m_new);
        l[g] *= corr;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[g][e] *= corr;
#pragma unroll
        for (int u = 0; u < kKeys; ++u) {
          const float w = valid[u] ? __expf(score[u] - m_new) : 0.f;
          l[g] += w;
#pragma unroll
          for (int e = 0; e < E; ++e) acc[g][e] += w * vr[u][e];
        }
        m[g] = m_new;
      }
    }
  };
  for (int64_t j0 = start + warp; j0 < end; j0 += kAttnWarps * kKeys) {
    // All kKeys rows loaded before any is used, unconditionally: an index past the slice reads
    // row j0 again (valid, in the cache) and only its score is masked.
    float kr[kKeys][E], vr[kKeys][E];
    bool valid[kKeys];
    int64_t row[kKeys];
#pragma unroll
    for (int u = 0; u < kKeys; ++u) {
      const int64_t j = j0 + static_cast<int64_t>(u) * kAttnWarps;
      valid[u] = j < end;  // the same for the whole warp
      row[u] = (valid[u] ? j : j0) * D + lane * E;
    }
    if (p.vector_loads) {  // caches aligned: one load per lane per row
#pragma unroll
      for (int u = 0; u < kKeys; ++u) {
        load_floats<T, E>(kc + row[u], kr[u]);
        load_floats<T, E>(vc + row[u], vr[u]);
      }
    } else {
#pragma unroll
      for (int u = 0; u < kKeys; ++u)
#pragma unroll
        for (int e = 0; e < E; ++e) {
          kr[u][e] = to_f(kc[row[u] + e]);
          vr[u][e] = to_f(vc[row[u] + e]);
        }
    }
    attend(kr, vr, valid);
  }
  if (has_new && warp == kAttnWarps - 1) {
    float kr[kKeys][E] = {}, vr[kKeys][E] = {};
    bool valid[kKeys] = {true};
#pragma unroll
    for (int e = 0; e < E; ++e) {
      kr[0][e] = kn[e];
      vr[0][e] = vn[e];
    }
    attend(kr, vr, valid);
  }

  // Merge the warps' softmax states.
  __shared__ float sm_max[kAttnWarps][kGroup];
  __shared__ float sm_sum[kAttnWarps][kGroup];
  __shared__ float sm_acc[kAttnWarps][kGroup][D];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    if (g < group) {
      if (lane == 0) {
        sm_max[warp][g] = m[g];
        sm_sum[warp][g] = l[g];
      }
#pragma unroll
      for (int e = 0; e < E; ++e) sm_acc[warp][g][lane * E + e] = acc[g][e];
    }
  }
  __syncthreads();
  for (int t = threadIdx.x; t < group * D; t += blockDim.x) {
    const int g = t / D, d = t % D;
    float mx = -INFINITY;
    for (int w = 0; w < kAttnWarps; ++w) mx = fmaxf(mx, sm_max[w][g]);
    float sum = 0.f, a = 0.f;
    if (mx != -INFINITY) {  // an empty split has no keys at all
      for (int w = 0; w < kAttnWarps; ++w) {
        if (sm_sum[w][g] > 0.f) {
          const float f = __expf(sm_max[w][g] - mx);
          sum += sm_sum[w][g] * f;
          a += sm_acc[w][g][d] * f;
        }
      }
    }
    const int64_t hq = static_cast<int64_t>(b) * p.num_heads + h * group + g;
    if (p.splits == 1) {
      static_cast<T*>(p.out)[hq * D + d] = from_f<T>(a / sum);
    } else {
      const int64_t slot = hq * p.splits + split;
      p.part_out[slot * D + d] = sum > 0.f ? a / sum : 0.f;
      if (d == 0) {
        p.part_max[slot] = mx;
        p.part_sum[slot] = sum;
      }
    }
  }
  if (p.splits == 1 || p.split_counters == nullptr) return;

  // The last of this (sequence, KV head)'s splits to get here merges them all (the combine
  // folded in: no second launch). The fence before counting makes this block's partial results
  // visible to whichever block turns out last; that block fences again before reading them.
  __shared__ int is_last[1];
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    int* counter = p.split_counters + blockIdx.x;
    is_last[0] = atomicAdd(counter, 1) == p.splits - 1;
    if (is_last[0]) *counter = 0;  // every split has counted: ready for the next call
  }
  __syncthreads();
  if (!is_last[0]) return;
  __threadfence();
  for (int t = threadIdx.x; t < group * D; t += blockDim.x) {
    const int64_t hq = static_cast<int64_t>(b) * p.num_heads + h * group + t / D;
    static_cast<T*>(p.out)[hq * D + t % D] = from_f<T>(merge_splits<D>(p, hq, t % D));
  }
}

// Merges the splits of one (sequence, query head) per block; blockDim.x >= D. The kernel's path
// when the op has no split counters (merge_splits is defined above the attention kernel).
template <typename T, int D>
__global__ void decode_attention_combine_kernel(DecodeAttentionParams p) {
  const int64_t hq = blockIdx.x;
  const int d = threadIdx.x;
  wait_for_prior_grid();
  allow_dependent_launch();
  if (d >= D) return;
  const int64_t b = hq / p.num_heads, len = p.cache_lens[b], pos = p.positions[b];
  if (len < 0 || len >= p.capacity || pos < 0 || pos >= p.max_position) {
    static_cast<T*>(p.out)[hq * D + d] = from_f<T>(NAN);
    return;
  }
  static_cast<T*>(p.out)[hq * D + d] = from_f<T>(merge_splits<D>(p, hq, d));
}

// How many blocks share one (sequence, KV head): about 8 per SM at any batch (flash-decoding:
// a block's warps walk their keys one dependent DRAM round trip after another, so more, shorter
// slices finish sooner; at batch 8 with Emu's 40 heads, 2 per SM would leave each block 160
// round trips per warp at 640 keys), at most one per 64 cache rows. It depends only on shapes,
// never on the lengths (which stay on the device), so a CUDA graph can capture the launch.
inline int decode_attention_splits(int64_t batch, int64_t num_kv_heads, int64_t capacity, int sm_count) {
  const int64_t blocks = batch * num_kv_heads;
  const int64_t want = (8 * static_cast<int64_t>(sm_count) + blocks - 1) / blocks;
  const int64_t splits = want < (capacity + 63) / 64 ? want : (capacity + 63) / 64;
  return splits < 1 ? 1 : static_cast<int>(splits);
}

// float32 workspace the split path needs (part_out, part_max, part_sum); 0 with one split.
inline int64_t decode_attention_workspace_floats(int64_t batch, int64_t num_heads, int splits, int head_dim) {
  return splits > 1 ? batch * num_heads * splits * (head_dim + 2) : 0;
}

// The op's arguments as the kernels take them (the glue and the emulator both pack them here).
inline DecodeAttentionParams decode_attention_params(const void* q, const void* k, const void* v, int64_t q_stride,
                                                     int64_t k_stride, int64_t v_stride, void* k_cache, void* v_cache,
                                                     const int64_t* cache_lens, const int64_t* positions,
                                                     const float* rope_cos, const float* rope_sin,
                                                     int64_t max_position, void* out, int num_heads, int num_kv_heads,
                                                     int capacity, float scale, int* split_counters = nullptr) {
  DecodeAttentionParams p{};
  p.split_counters = split_counters;
  p.q = q;
  p.k = k;
  p.v = v;
  p.q_stride = q_stride;
  p.k_stride = k_stride;
  p.v_stride = v_stride;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.cache_lens = cache_lens;
  p.positions = positions;
  p.rope_cos = rope_cos;
  p.rope_sin = rope_sin;
  p.max_position = max_position;
  p.out = out;
  p.num_heads = num_heads;
  p.num_kv_heads = num_kv_heads;
  p.capacity = capacity;
  p.scale = scale;
  return p;
}

// The launch plan of one call: the split count and the workspace it needs.
struct DecodeAttentionPlan {
  int splits;
  int64_t workspace_floats;
};

inline DecodeAttentionPlan plan_decode_attention(int64_t batch, int64_t num_heads, int64_t num_kv_heads,
                                                 int64_t capacity, int head_dim, int sm_count) {
  if (batch == 0 || num_kv_heads == 0) return {1, 0};
  const int splits = decode_attention_splits(batch, num_kv_heads, capacity, sm_count);
  return {splits, decode_attention_workspace_floats(batch, num_heads, splits, head_dim)};
}

// Launches with p.splits from decode_attention_splits; with several splits
// `workspace` holds decode_attention_workspace_floats(...) floats.
template <typename T, int D>
cudaError_t launch_decode_attention(DecodeAttentionParams p, int batch, float* workspace, cudaStream_t stream) {
  // Lane rows start at multiples of E = D/32 elements: vector loads need the bases aligned to that.
  constexpr uintptr_t kRowBytes = D / 32 * sizeof(T);
  p.vector_loads = reinterpret_cast<uintptr_t>(p.k_cache) % kRowBytes == 0 &&
                   reinterpret_cast<uintptr_t>(p.v_cache) % kRowBytes == 0;
  const int64_t rows = static_cast<int64_t>(batch) * p.num_heads * p.splits;
  p.part_out = p.splits > 1 ? workspace : nullptr;
  p.part_max = p.splits > 1 ? workspace + rows * D : nullptr;
  p.part_sum = p.splits > 1 ? workspace + rows * (D + 1) : nullptr;
  const dim3 grid(static_cast<unsigned>(batch * p.num_kv_heads), static_cast<unsigned>(p.splits));
  const int group = p.num_heads / p.num_kv_heads;
  if (group <= 1)
    EMU_FAST_LAUNCH_PDL(grid, kAttnWarps * 32, stream, decode_attention_kernel<T, D, 1>)(p);
  else if (group <= 2)
    EMU_FAST_LAUNCH_PDL(grid, kAttnWarps * 32, stream, decode_attention_kernel<T, D, 2>)(p);
  else if (group <= 4)
    EMU_FAST_LAUNCH_PDL(grid, kAttnWarps * 32, stream, decode_attention_kernel<T, D, 4>)(p);
  else
    EMU_FAST_LAUNCH_PDL(grid, kAttnWarps * 32, stream, decode_attention_kernel<T, D, kMaxGroup>)(p);
  if (p.splits > 1 && p.split_counters == nullptr) {
    EMU_FAST_LAUNCH_PDL(static_cast<unsigned>(batch * p.num_heads), D, stream,
                        decode_attention_combine_kernel<T, D>)(p);
  }
  return cudaGetLastError();
}

// The op's launch: p as the op's arguments give it (p.splits from `plan`), head_dim one of
// limits::kCudaHeadDims (cudaErrorInvalidValue otherwise), workspace of plan.workspace_floats.
// Nothing to do for an empty batch.
template <typename T>
cudaError_t launch_decode_attention(const DecodeAttentionPlan& plan, DecodeAttentionParams p, int batch, int head_dim,
                                    float* workspace, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  p.splits = plan.splits;
  switch (head_dim) {
    case 64: return launch_decode_attention<T, 64>(p, batch, workspace, stream);
    case 128: return launch_decode_attention<T, 128>(p, batch, workspace, stream);
    default: return cudaErrorInvalidValue;
  }
}
static_assert(limits::cuda_head_dim_supported(64) && limits::cuda_head_dim_supported(128) &&
                  sizeof(limits::kCudaHeadDims) / sizeof(int) == 2,
              "launch_decode_attention dispatches exactly limits::kCudaHeadDims");

}  // namespace emu_fast::cuda

EMU_FAST_INSTANTIATE_LAUNCHERS(decode_attention,
  DecodeAttentionParams p{};
  launch_decode_attention<T>(plan_decode_attention(1, 1, 1, 8, 64, 1), p, 1, 64, nullptr, nullptr);)
