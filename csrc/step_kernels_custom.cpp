// The custom-kernel StepKernels: each operation is the emu_fast::* op, called through the
// dispatcher so it runs the CPU or CUDA kernel by its tensors' device (and a CUDA graph
// captures it). Also what the decoder asks before choosing them, and the test-only faults.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/add.h>

#ifdef EMU_FAST_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#include <atomic>
#include <mutex>
#include <string>

#include "op_limits.h"
#include "step_kernels.h"

namespace emu_fast {
namespace {

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

std::mutex fault_mutex;
std::string fault_op;                     // guarded by fault_mutex
std::atomic<bool> fault_set{false};       // fast path: no lock while no fault is set

// A wrong kernel, on purpose (tests only): its output shifted by one.
at::Tensor faulty(const char* op, at::Tensor t) {
  return test_fault(op) ? t.add(1.0) : t;
}

class CustomKernels final : public StepKernels {
 public:
  const char* name() const override { return "custom"; }

  Tensor gemv(const Tensor& x, const Tensor& weight) const override {
    static const auto op = handle<Tensor(const Tensor&, const Tensor&)>("emu_fast::gemv");
    return faulty("gemv", op.call(x, weight));
  }
  Tensor norm_gemv(const Tensor& x, const Tensor& norm_weight, double eps, const Tensor& weight) const override {
    static const auto op =
        handle<Tensor(const Tensor&, const Tensor&, double, const Tensor&)>("emu_fast::norm_gemv");
    return faulty("norm_gemv", op.call(x, norm_weight, eps, weight));
  }
  Tensor gemv_add(const Tensor& x, const Tensor& weight, const Tensor& residual) const override {
    static const auto op = handle<Tensor(const Tensor&, const Tensor&, const Tensor&)>("emu_fast::gemv_add");
    return faulty("gemv_add", op.call(x, weight, residual));
  }
  Tensor norm_gemv_silu(const Tensor& x, const Tensor& norm_weight, double eps,
                        const Tensor& gate_up_weight) const override {
    static const auto op =
        handle<Tensor(const Tensor&, const Tensor&, double, const Tensor&)>("emu_fast::norm_gemv_silu");
    return faulty("norm_gemv_silu", op.call(x, norm_weight, eps, gate_up_weight));
  }
  Tensor gemv_quantized(const Tensor& x, const Tensor& qweight, const Tensor& scales, int64_t bits,
                        int64_t group_size) const override {
    static const auto int8 = handle<Tensor(const Tensor&, const Tensor&, const Tensor&)>("emu_fast::gemv_int8");
    static const auto int4 =
        handle<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t)>("emu_fast::gemv_int4");
    if (bits == 8) return faulty("gemv_int8", int8.call(x, qweight, scales));
    return faulty("gemv_int4", int4.call(x, qweight, scales, group_size));
  }
  Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) const override {
    static const auto op = handle<Tensor(const Tensor&, const Tensor&, double)>("emu_fast::rms_norm");
    return faulty("rms_norm", op.call(x, weight, eps));
  }
  Pair add_rms_norm(const Tensor& x, const Tensor& residual, const Tensor& weight, double eps) const override {
    static const auto op =
        handle<Pair(const Tensor&, const Tensor&, const Tensor&, double)>("emu_fast::add_rms_norm");
    auto [y, sum] = op.call(x, residual, weight, eps);
    return {faulty("add_rms_norm", y), sum};
  }
  Tensor silu_mul(const Tensor& gate_up) const override {
    static const auto op = handle<Tensor(const Tensor&)>("emu_fast::silu_mul");
    return faulty("silu_mul", op.call(gate_up));
  }
  Tensor decode_attention(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& k_cache, Tensor& v_cache,
                          const Tensor& cache_lens, const Tensor& positions, const Tensor& rope_cos,
                          const Tensor& rope_sin, double scale,
                          const c10::optional<Tensor>& split_counters) const override {
    static const auto op = handle<Tensor(const Tensor&, const Tensor&, const Tensor&, Tensor&, Tensor&, const Tensor&,
                                         const Tensor&, const Tensor&, const Tensor&, double,
                                         const c10::optional<Tensor>&)>("emu_fast::decode_attention");
    return faulty("decode_attention", op.call(q, k, v, k_cache, v_cache, cache_lens, positions, rope_cos, rope_sin,
                                              scale, split_counters));
  }
  Pair regression_head(const Tensor& hidden, const Tensor& norm_weight, double eps, const Tensor& head_weight,
                       const c10::optional<Tensor>& up_weight) const override {
    static const auto op =
        handle<Pair(const Tensor&, const Tensor&, double, const Tensor&, const c10::optional<Tensor>&)>(
            "emu_fast::regression_head");
    auto [out, next] = op.call(hidden, norm_weight, eps, head_weight, up_weight);
    return {faulty("regression_head", out), next};
  }
};

}  // namespace

const StepKernels& custom_kernels() {
  static const CustomKernels k;
  return k;
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
  const char* name = bits == 8 ? "emu_fast::gemv_int8" : "emu_fast::gemv_int4";
  const c10::DispatchKey key = c10::TensorOptions().device(device).computeDispatchKey();
  if (c10::Dispatcher::singleton().findSchemaOrThrow(name, "").hasKernelForDispatchKey(key)) return true;
  if (why != nullptr) *why = std::string(name) + " has no kernel for " + device.str() + " in this build";
  return false;
}

void set_test_fault(const std::string& op) {
  const std::lock_guard<std::mutex> lock(fault_mutex);
  fault_op = op;
  fault_set.store(!op.empty());
}

bool test_fault(const char* op) {
  if (!fault_set.load(std::memory_order_relaxed)) return false;
  const std::lock_guard<std::mutex> lock(fault_mutex);
  return fault_op == op;
}

}  // namespace emu_fast
