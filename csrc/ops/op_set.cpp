// The op sets: one class calling an op namespace through the dispatcher (emu_fast:: for ours,
// emu_fast_aten:: for the ATen twins), and what the decoder asks before choosing ours.
#include <ATen/core/dispatch/Dispatcher.h>

#ifdef EMU_FAST_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#include <string>

#include "ops/limits.h"
#include "ops/op_set.h"
#include "ops/schemes.h"

namespace emu_fast {
namespace {

using Tensor = at::Tensor;
using Pair = std::tuple<at::Tensor, at::Tensor>;
using OptTensor = c10::optional<at::Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const std::string& ns, const char* op) {
  return c10::Dispatcher::singleton().findSchemaOrThrow((ns + "::" + op).c_str(), "").typed<Sig>();
}

class DispatchedOps final : public StepKernels {
 public:
  DispatchedOps(std::string ns, const char* name, bool faults)
      : name_(name),
        faults_(faults),
        gemv_(handle<Tensor(const Tensor&, const Tensor&)>(ns, "gemv")),
        norm_gemv_(handle<Tensor(const Tensor&, const Tensor&, double, const Tensor&)>(ns, "norm_gemv")),
        gemv_add_(handle<Tensor(const Tensor&, const Tensor&, const Tensor&)>(ns, "gemv_add")),
        norm_gemv_silu_(handle<Tensor(const Tensor&, const Tensor&, double, const Tensor&)>(ns, "norm_gemv_silu")),
        gemv_int8_(handle<Tensor(const Tensor&, const Tensor&, const Tensor&)>(ns, "gemv_int8")),
        gemv_int4_(handle<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t)>(ns, "gemv_int4")),
        rms_norm_(handle<Tensor(const Tensor&, const Tensor&, double)>(ns, "rms_norm")),
        add_rms_norm_(handle<Pair(const Tensor&, const Tensor&, const Tensor&, double)>(ns, "add_rms_norm")),
        silu_mul_(handle<Tensor(const Tensor&)>(ns, "silu_mul")),
        decode_attention_(handle<Tensor(const Tensor&, const Tensor&, const Tensor&, Tensor&, Tensor&, const Tensor&,
                                        const Tensor&, const Tensor&, const Tensor&, double, const OptTensor&)>(
            ns, "decode_attention")),
        regression_head_(
            handle<Pair(const Tensor&, const Tensor&, double, const Tensor&, const OptTensor&)>(ns, "regression_head")) {}

  const char* name() const override { return name_; }
  Tensor gemv(const Tensor& x, const Tensor& w) const override { return out("gemv", gemv_.call(x, w)); }
  Tensor norm_gemv(const Tensor& x, const Tensor& nw, double eps, const Tensor& w) const override {
    return out("norm_gemv", norm_gemv_.call(x, nw, eps, w));
  }
  Tensor gemv_add(const Tensor& x, const Tensor& w, const Tensor& residual) const override {
    return out("gemv_add", gemv_add_.call(x, w, residual));
  }
  Tensor norm_gemv_silu(const Tensor& x, const Tensor& nw, double eps, const Tensor& w) const override {
    return out("norm_gemv_silu", norm_gemv_silu_.call(x, nw, eps, w));
  }
  Tensor gemv_quantized(const Tensor& x, const Tensor& qweight, const Tensor& scales, int64_t bits,
                        int64_t group_size) const override {
    if (bits == 8) return out("gemv_int8", gemv_int8_.call(x, qweight, scales));
    return out("gemv_int4", gemv_int4_.call(x, qweight, scales, group_size));
  }
  Tensor rms_norm(const Tensor& x, const Tensor& w, double eps) const override {
    return out("rms_norm", rms_norm_.call(x, w, eps));
  }
  Pair add_rms_norm(const Tensor& x, const Tensor& residual, const Tensor& w, double eps) const override {
    auto [y, sum] = add_rms_norm_.call(x, residual, w, eps);
    return {out("add_rms_norm", y), sum};
  }
  Tensor silu_mul(const Tensor& gate_up) const override { return out("silu_mul", silu_mul_.call(gate_up)); }
  Tensor decode_attention(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& k_cache, Tensor& v_cache,
                          const Tensor& cache_lens, const Tensor& positions, const Tensor& rope_cos,
                          const Tensor& rope_sin, double scale, const OptTensor& split_counters) const override {
    return out("decode_attention", decode_attention_.call(q, k, v, k_cache, v_cache, cache_lens, positions, rope_cos,
                                                          rope_sin, scale, split_counters));
  }
  Pair regression_head(const Tensor& hidden, const Tensor& nw, double eps, const Tensor& head,
                       const OptTensor& up) const override {
    auto [o, next] = regression_head_.call(hidden, nw, eps, head, up);
    return {out("regression_head", o), next};
  }

 private:
  // Our set's outputs pass through the test-only faults (ops/test_faults.cpp; nothing while none is set).
  Tensor out(const char* op, Tensor t) const { return faults_ ? apply_test_fault(op, std::move(t)) : t; }

  const char* name_;
  bool faults_;
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&)> gemv_;
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, double, const Tensor&)> norm_gemv_;
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&)> gemv_add_;
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, double, const Tensor&)> norm_gemv_silu_;
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&)> gemv_int8_;
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t)> gemv_int4_;
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, double)> rms_norm_;
  c10::TypedOperatorHandle<Pair(const Tensor&, const Tensor&, const Tensor&, double)> add_rms_norm_;
  c10::TypedOperatorHandle<Tensor(const Tensor&)> silu_mul_;
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&, Tensor&, Tensor&, const Tensor&,
                                  const Tensor&, const Tensor&, const Tensor&, double, const OptTensor&)>
      decode_attention_;
  c10::TypedOperatorHandle<Pair(const Tensor&, const Tensor&, double, const Tensor&, const OptTensor&)>
      regression_head_;
};

}  // namespace

const StepKernels& custom_kernels() {
  static const DispatchedOps ops("emu_fast", "custom", /*faults=*/true);
  return ops;
}

const StepKernels& aten_kernels() {
  static const DispatchedOps ops("emu_fast_aten", "aten", /*faults=*/false);
  return ops;
}

bool custom_kernels_support(const at::Device& device, at::ScalarType dtype, int64_t head_dim, int64_t group,
                            std::string* why) {
  auto no = [why](std::string reason) {
    if (why != nullptr) *why = std::move(reason);
    return false;
  };
  if (device.is_cpu()) {
    if (dtype == at::kFloat || dtype == at::kBFloat16) return true;
    return no("the CPU kernels take float32 and bfloat16 only");
  }
  if (device.is_cuda()) {
#ifdef EMU_FAST_WITH_CUDA
    // The tensor-core GEMV (mma.sync for bf16/fp16) and the other kernels are built for sm_80
    // and later (TORCH_CUDA_ARCH_LIST); older GPUs run the ATen step.
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index()) != cudaSuccess) {
      (void)cudaGetLastError();
      return no("cannot query " + device.str() + "'s compute capability");
    }
    if (major < 8)
      return no(device.str() + " has compute capability " + std::to_string(major) +
                ".x; emu_fast's CUDA kernels need 8.0 (A100) or newer");
    if (!limits::cuda_head_dim_supported(head_dim))
      return no("the CUDA attention is compiled for head_dim " + std::string(limits::kCudaHeadDimsText) +
                ", not " + std::to_string(head_dim));
    if (group > limits::kMaxQueryGroup)
      return no(std::to_string(group) + " query heads per KV head; the CUDA attention takes at most " +
                std::to_string(limits::kMaxQueryGroup));
    return true;
#else
    return no("this emu_fast build has no CUDA kernels (it was built against a CPU-only torch)");
#endif
  }
  return no("emu_fast has no kernels for " + device.str() + " devices");
}

bool custom_quantized_support(const at::Device& device, int64_t bits, std::string* why) {
  if (bits == 0 || device.is_cpu()) return true;
  const std::string name = std::string("emu_fast::") + quant_scheme(bits)->op;
  const c10::DispatchKey key = c10::TensorOptions().device(device).computeDispatchKey();
  if (c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "").hasKernelForDispatchKey(key)) return true;
  if (why != nullptr) *why = name + " has no kernel for " + device.str() + " in this build";
  return false;
}

}  // namespace emu_fast
