// The op sets (ours and the ATen twins'), how they find an op, and what the decoder asks before
// choosing ours.
#include <ATen/core/dispatch/Dispatcher.h>

#ifdef EMU_FAST_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#include <string>

#include "ops/limits.h"
#include "ops/op_set.h"
#include "ops/schemes.h"

namespace emu_fast {

c10::OperatorHandle find_op(const char* ns, const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow((std::string(ns) + "::" + name).c_str(), "");
}

const OpSet& custom_kernels() {
  static const OpSet ops(OpSet::Kind::kOurs);
  return ops;
}

const OpSet& aten_kernels() {
  static const OpSet ops(OpSet::Kind::kAten);
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
