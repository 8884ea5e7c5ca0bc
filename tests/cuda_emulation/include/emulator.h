// A CUDA execution model on the CPU, for testing the kernels in csrc/kernels/cuda/ where no GPU
// is available. Each block runs on its own as blockDim cooperative fibers (ucontext) on one OS
// thread; a fiber runs until it reaches __syncthreads or a warp shuffle and then waits until
// every thread of its block (barrier) or of its warp (shuffle) has got there, exactly the
// points where CUDA threads meet. What it checks that a plain loop would not:
//   * launch configurations (grid and block limits) like the driver, as launch errors;
//   * warp shuffles: full mask, all 32 lanes present, results as the hardware exchanges them;
//   * __syncthreads reached by every thread of the block (not after some returned), and
//     deadlocks (threads waiting for a barrier or shuffle that never completes);
//   * with a seed, warps run in a random order, each as far ahead of the others as the
//     barriers allow, so results that depend on an order CUDA does not promise (a missing
//     barrier, a shared-memory race) show up as differences from the in-order run.
// It does not model memory-ordering effects, timing or occupancy: speed is for the GPU.
#pragma once
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <utility>

namespace emu_fast::emulation {

const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void sync_threads();

// Publishes this lane's bits and returns the bits of lane src_of(lane) of the same warp.
uint64_t exchange(unsigned mask, uint64_t bits, const std::function<int(int)>& src_of);

template <typename T, typename SrcOf>
T shuffle(unsigned mask, T value, SrcOf src_of) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = exchange(mask, bits, src_of);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// Shared memory: tests/cuda_emulator.py rewrites each `__shared__ T name[N]...;` of the
// kernel headers into `auto& name = shared_array<T[N]...>([] {});` (the lambda makes every
// declaration its own instantiation). It is filled with 0xFF bytes (NaN in every float type)
// when the first thread of each block reaches it, as a GPU's is garbage: a read of shared
// memory no thread of the block wrote shows up as NaN.
uint64_t block_serial();

template <typename T, typename Site>
T& shared_array(Site) {
  alignas(16) static T storage;
  static uint64_t poisoned_for = 0;  // block serials start at 1
  if (poisoned_for != block_serial()) {
    std::memset(static_cast<void*>(&storage), 0xFF, sizeof(T));
    poisoned_for = block_serial();
  }
  return storage;
}

// Runs body once per thread of every block of the grid; records launch errors for
// cudaGetLastError. pdl: a programmatic dependent launch, whose rules (csrc/kernels/cuda/
// common.cuh) are checked: every thread calls griddepcontrol.wait (wait_for_prior_grid) before
// it returns, and launch_dependents only after its wait. (What a thread reads before its wait is
// not checked: the emulator runs one launch after another.)
void run_grid(dim3 grid, dim3 block, const std::function<void()>& body, bool pdl = false);
// griddepcontrol.wait / griddepcontrol.launch_dependents of the running thread.
void grid_dependency_wait();
void launch_dependents();
// How many threads of the last launch called grid_dependency_wait (for the self-test).
int64_t last_launch_waits();

// kernel<<<grid, block, 0, stream>>>(args...) as Launch(grid, block, stream, kernel)(args...);
// with pdl, the launch EMU_FAST_LAUNCH_PDL makes.
template <typename... P>
struct Launch {
  dim3 grid, block;
  void (*kernel)(P...);
  bool pdl;
  Launch(dim3 g, dim3 b, cudaStream_t, void (*k)(P...), bool pdl_ = false) : grid(g), block(b), kernel(k), pdl(pdl_) {}
  template <typename... A>
  void operator()(A&&... args) const {
    const std::tuple<P...> params(std::forward<A>(args)...);  // converted once, as the driver does
    run_grid(grid, block, [&] { std::apply(kernel, params); }, pdl);
  }
};

// Scheduling: seed 0 runs the threads in index order between meeting points, all warps in
// step; any other seed runs each warp as far as it can before the next, in a random order.
void set_schedule_seed(uint64_t seed);
const char* last_error_message();

}  // namespace emu_fast::emulation
