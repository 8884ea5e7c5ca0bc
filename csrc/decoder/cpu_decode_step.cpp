#include "decoder/cpu_decode_step.h"

#include <omp.h>

#include <algorithm>
#include <exception>

#include "kernels/cpu/decode_attention.h"
#include "kernels/cpu/gemv.h"
#include "kernels/cpu/norm.h"
#include "kernels/cpu/quantized_gemv.h"

namespace emu_fast::cpu {
namespace {

using kernels::bf16;

// This thread's share [begin, end) of n items, in blocks of `align` (GEMV rows go four at a time).
inline void share(int64_t n, int tid, int nt, int64_t align, int64_t& begin, int64_t& end) {
  const int64_t blocks = (n + align - 1) / align;
  begin = std::min(n, blocks * tid / nt * align);
  end = std::min(n, blocks * (tid + 1) / nt * align);
}

template <typename T>
struct Scratch {
  std::vector<T> h, xn, qkv, attn, gate_up, act, branch;
  std::vector<float> xf, yf;
  Scratch(const StepModel<T>& a, int64_t B) {
    const int64_t H = a.hidden, I = a.intermediate, QD = a.heads * a.head_dim;
    const int64_t qkv_w = (a.heads + 2 * a.kv_heads) * a.head_dim;
    h.resize(B * H);
    xn.resize(B * H);
    qkv.resize(B * qkv_w);
    attn.resize(B * QD);
    gate_up.resize(B * 2 * I);
    act.resize(B * I);
    branch.resize(B * H);
    // + a block: int4 reads its inputs in zero-padded blocks of 32 (kernels/cpu/quantized_gemv.h)
    xf.resize(B * (std::max({H, I, QD, a.out_dim}) + kernels::kInt4Block));
    yf.resize(B * std::max({qkv_w, 2 * I, H, a.out_dim}));
  }
};

template <typename T>
void widen(const T* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = kernels::to_float(x[i]);
}

// rows x [batch, k] to float32 rows of ld >= k, zeros in columns k..ld-1.
template <typename T>
void widen_rows(const T* x, int64_t batch, int64_t k, int64_t ld, float* out) {
  if (ld == k) return widen(x, batch * k, out);
  for (int64_t b = 0; b < batch; ++b) {
    widen(x + b * k, k, out + b * ld);
    std::fill(out + b * ld + k, out + (b + 1) * ld, 0.f);
  }
}

// Columns [k0, k1) of row b of widen_rows' output; the row's zero padding goes with the last
// columns (k1 == k), so threads that take disjoint column slices together write the whole row.
template <typename T>
void widen_slice(const T* x, int64_t b, int64_t k, int64_t ld, int64_t k0, int64_t k1, float* out) {
  widen(x + b * k + k0, k1 - k0, out + b * ld + k0);
  if (k1 == k) std::fill(out + b * ld + k, out + (b + 1) * ld, 0.f);
}

}  // namespace

template <typename T>
void decode_step(const StepModel<T>& a, const StepIO<T>& io) {
  // bfloat16 activations reach the quantized GEMVs as int16 blocks (kernels/cpu/quantized_gemv.h),
  // unless set_quantized_activations says otherwise: read once, so the whole step takes one mode
  const kernels::QuantizedInput input_mode = kernels::resolve_quantized_input(kernels::quantized_input_for<T>());
  const int64_t B = io.batch, H = a.hidden, D = a.head_dim, Hq = a.heads, Hkv = a.kv_heads, I = a.intermediate;
  const int64_t qkv_w = (Hq + 2 * Hkv) * D;
  Scratch<T> s(a, B);
  std::copy(io.x, io.x + B * H, s.h.begin());
  std::vector<std::vector<float>> attn_scratch(io.threads);
  std::exception_ptr reduce_error;  // a failed all-reduce: the threads leave the layers together

#pragma omp parallel num_threads(io.threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    // y[B, N] = (widened x)[B, K] @ w^T: this thread's rows, rounded to T right away. w is T
    // [N, K] (bits 0) or a quantized weight (bits 8 / 4, kernels/cpu/quantized_gemv.h: widened in
    // registers, float32 accumulation) with its scales.
    auto gemv = [&](const void* w, const float* scales, int64_t bits, int64_t N, int64_t K, T* y) {
      int64_t n0, n1;
      share(N, tid, nt, 4, n0, n1);
      if (n0 >= n1) return;
      if (bits == 8) {
        kernels::gemv_int8_rows(static_cast<const int8_t*>(w), scales, s.xf.data(), s.yf.data(), B, K, N, n0, n1,
                                input_mode);
      } else if (bits == 4) {
        kernels::gemv_int4_rows(static_cast<const uint8_t*>(w), scales, a.group_size, s.xf.data(), s.yf.data(), B, K,
                                N, n0, n1, input_mode);
      } else {
        kernels::gemv_rows(static_cast<const T*>(w), s.xf.data(), s.yf.data(), B, K, N, n0, n1);
      }
      for (int64_t b = 0; b < B; ++b)
        for (int64_t n = n0; n < n1; ++n) y[b * N + n] = kernels::from_float<T>(s.yf[b * N + n]);
    };
    // The layers' projections, in the model's scheme.
    auto proj = [&](const StepProj& p, int64_t N, int64_t K, T* y) { gemv(p.w, p.scales, a.bits, N, K, y); };
    // The projections' inputs as they read them: int4 in rows padded to its blocks.
    auto padded = [&](int64_t K) { return a.bits == 4 ? kernels::int4_padded_k(K) : K; };
    auto widen_in = [&](const T* x, int64_t K) { widen_rows(x, B, K, padded(K), s.xf.data()); };
    // After a barrier: the ranks' partial o / down outputs in s.branch summed (tensor
    // parallelism), by the thread that entered the step while the others wait. False when it
    // failed (the same answer on every thread, read after the barrier).
    auto reduce_branch = [&]() {
      if (!a.all_reduce) return true;
#pragma omp master
      {
        try {
          a.all_reduce(s.branch.data(), B * H);
        } catch (...) {
          reduce_error = std::current_exception();
        }
      }
#pragma omp barrier
      return reduce_error == nullptr;
    };
    for (size_t l = 0; l < a.layers.size(); ++l) {
      const StepLayer<T>& w = a.layers[l];
#pragma omp single
      {
        for (int64_t b = 0; b < B; ++b) {
          if (l == 0) {
            kernels::rms_norm_row_cpu(&s.h[b * H], w.input_norm, a.eps, H, &s.xn[b * H]);
          } else {  // the previous layer's MLP output joins the residual stream here
            kernels::add_rms_norm_row_cpu(&s.branch[b * H], &s.h[b * H], w.input_norm, a.eps, H, &s.h[b * H],
                                          &s.xn[b * H]);
          }
        }
        widen_in(s.xn.data(), H);
      }
      proj(w.qkv, qkv_w, H, s.qkv.data());
#pragma omp barrier
      {  // attention: (sequence, KV head) pairs split across the threads
        int64_t t0, t1;
        share(B * Hkv, tid, nt, 1, t0, t1);
        const T* qkv = s.qkv.data();
        const kernels::DecodeBatch<T> batch{qkv, qkv + Hq * D, qkv + (Hq + Hkv) * D, qkv_w, qkv_w, qkv_w,
                                            w.k_cache, w.v_cache, s.attn.data(), Hq, Hkv, D, a.capacity,
                                            io.lengths, io.positions, a.rope_cos, a.rope_sin, a.scale};
        kernels::decode_attention_tasks(batch, t0, t1, attn_scratch[tid]);
        // and each thread widens the heads it wrote, for o_proj (one barrier, not two)
        const int64_t group_width = Hq / Hkv * D;
        for (int64_t t = t0; t < t1; ++t)
          widen_slice(s.attn.data(), t / Hkv, Hq * D, padded(Hq * D), t % Hkv * group_width,
                      (t % Hkv + 1) * group_width, s.xf.data());
      }
#pragma omp barrier
      proj(w.o, H, Hq * D, s.branch.data());
#pragma omp barrier
      if (!reduce_branch()) break;
#pragma omp single
      {
        for (int64_t b = 0; b < B; ++b)
          kernels::add_rms_norm_row_cpu(&s.branch[b * H], &s.h[b * H], w.post_norm, a.eps, H, &s.h[b * H],
                                        &s.xn[b * H]);
        widen_in(s.xn.data(), H);
      }
      proj(w.gate_up, 2 * I, H, s.gate_up.data());
#pragma omp barrier
      {  // SiLU(gate) * up and its widening for down_proj, the columns split across the threads
        int64_t i0, i1;
        share(I, tid, nt, 16, i0, i1);
        if (i0 < i1)
          for (int64_t b = 0; b < B; ++b) {
            const T* gate = &s.gate_up[b * 2 * I];
            kernels::silu_mul_cpu(gate + i0, gate + I + i0, i1 - i0, &s.act[b * I + i0]);
            widen_slice(s.act.data(), b, I, padded(I), i0, i1, s.xf.data());
          }
      }
#pragma omp barrier
      proj(w.down, H, I, s.branch.data());
#pragma omp barrier
      if (!reduce_branch()) break;
    }
    if (reduce_error == nullptr) {
      // The residual stream's last add (rounded as add_rms_norm rounds it), then the head: RMSNorm,
      // the head GEMV and Emu2's project_up; without a head (a segment of a split model), the
      // residual stream itself is the output.
#pragma omp single
      {
        T* h = a.head != nullptr ? s.h.data() : io.out;
        for (int64_t i = 0; i < B * H; ++i)
          h[i] = kernels::from_float<T>(kernels::to_float(s.h[i]) + kernels::to_float(s.branch[i]));
        if (a.head != nullptr) {
          for (int64_t b = 0; b < B; ++b) kernels::rms_norm_row_cpu(&s.h[b * H], a.final_norm, a.eps, H, &s.xn[b * H]);
          widen(s.xn.data(), B * H, s.xf.data());
        }
      }
      if (a.head != nullptr) gemv(a.head, nullptr, 0, a.out_dim, H, io.out);
      if (a.head != nullptr && a.up != nullptr) {
#pragma omp barrier
#pragma omp single
        widen(io.out, B * a.out_dim, s.xf.data());
        gemv(a.up, nullptr, 0, H, a.out_dim, io.next);
      }
    }
  }
  if (reduce_error) std::rethrow_exception(reduce_error);
}

template void decode_step<float>(const StepModel<float>&, const StepIO<float>&);
template void decode_step<bf16>(const StepModel<bf16>&, const StepIO<bf16>&);

}  // namespace emu_fast::cpu
