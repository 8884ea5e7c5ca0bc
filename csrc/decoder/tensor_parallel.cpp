// Tensor parallelism: the checks on a rank's share of the model, and the all-reduce that sums the
// ranks' partial projections. The collective is torch.distributed's own, reached through the
// dispatcher (_c10d_functional::all_reduce_ on the group's name): gloo on the CPU, NCCL on CUDA,
// with the group's own timeout; no transport of ours.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>

#include <exception>
#include <string>

#include "decoder/decoder.h"

namespace emu_fast {
namespace {

// The ops, looked up at first use (they are registered with torch.distributed).
const c10::OperatorHandle* all_reduce_op() {
  static const auto op = c10::Dispatcher::singleton().findSchema({"_c10d_functional::all_reduce_", ""});
  return op.has_value() ? &*op : nullptr;
}

const c10::OperatorHandle* wait_op() {
  static const auto op = c10::Dispatcher::singleton().findSchema({"_c10d_functional::wait_tensor", ""});
  return op.has_value() ? &*op : nullptr;
}

}  // namespace

void EmuDecoder::check_tensor_parallel(int64_t num_heads, int64_t num_kv_heads) const {
  TORCH_CHECK_VALUE(tp_size_ >= 1, kDecoderName, ": tp_size must be >= 1, got ", tp_size_);
  if (tp_size_ == 1) return;
  TORCH_CHECK_VALUE(!tp_group_.empty(), kDecoderName, ": tp_size ", tp_size_,
                    " needs tp_group, the torch.distributed group's name (ProcessGroup.group_name)");
  TORCH_CHECK_VALUE(num_heads % tp_size_ == 0 && num_kv_heads % tp_size_ == 0, kDecoderName, ": ", num_heads,
                    " heads and ", num_kv_heads, " KV heads do not split over ", tp_size_,
                    " tensor-parallel ranks (each rank takes whole heads and whole KV heads)");
  TORCH_CHECK_VALUE(all_reduce_op() != nullptr && wait_op() != nullptr, kDecoderName,
                    ": tensor parallelism needs torch.distributed's functional collectives "
                    "(_c10d_functional::all_reduce_), which this PyTorch build lacks");
}

void EmuDecoder::all_reduce_(const at::Tensor& t) const {
  if (tp_size_ == 1) return;
  try {
    // Below autograd: the op's autograd kernel is registered from Python, and a step needs no
    // gradient; the backend's kernel is C++ and needs no GIL.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    torch::jit::Stack stack{t, std::string("sum"), tp_group_};
    all_reduce_op()->callBoxed(&stack);
    stack = {t};
    wait_op()->callBoxed(&stack);
  } catch (const std::exception& e) {
    // A rank that died or hangs surfaces here on gloo (its error, or its timeout). NCCL reports
    // such faults through its own watchdog instead (see docs/gpu.md).
    const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
    TORCH_CHECK(false, kDecoderName, ": the tensor-parallel all-reduce over group '", tp_group_, "' (", tp_size_,
                " ranks) failed; a rank may have died, hung past the group's timeout, or been called with other "
                "inputs: ", c10_error != nullptr ? c10_error->what_without_backtrace() : e.what());
  }
}

}  // namespace emu_fast
