// The first-use self-check: before a decoder trusts our kernels at a batch size, one decode
// step runs on them and on the ATen step (ops/op_set.h) from the same cache and input, and every
// op is compared with its ATen twin on the same inputs (a checked op set, OpSet::Kind::kChecked).
// A mismatch (an error over the dtype's bound, or a non-finite value where ATen's is finite)
// makes the decoder warn once, naming the op and the batch size, and fall back to the ATen step
// for good. Our kernels have only been run on a CPU emulator of CUDA; on a user's GPU this is
// what stands between a wrong kernel and a wrong image. EMU_FAST_SELF_CHECK=0 turns it off.
#pragma once
#include <ATen/core/Tensor.h>

namespace emu_fast {

// Off only when the environment says EMU_FAST_SELF_CHECK=0 (read at each check).
bool self_check_enabled();

// ||a - b|| / ||b|| over all elements in float64 (0 when both are zero); +inf when a has a
// non-finite value where b is finite. Syncs with the device.
double relative_error(const at::Tensor& a, const at::Tensor& b);

// The largest relative error (as above) a step or an op may show against ATen in this dtype:
// rounding differences only (accumulation order, one ulp of the storage type per op).
double self_check_bound(at::ScalarType dtype);

}  // namespace emu_fast
