// The fiber scheduler behind include/emulator.h. Single-threaded: one launch at a time (a mutex
// guards it), one block at a time, the block's threads as fibers. A fiber is started with
// makecontext/setcontext; after that every switch is _setjmp/_longjmp, which unlike
// swapcontext makes no system call (tens of millions of switches in a test run). A memory
// fault in a kernel (SIGSEGV/SIGBUS, including a fiber overflowing its stack into the guard
// page below it) becomes a launch error instead of killing the process.
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cstdio>

#include <algorithm>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda_runtime.h"

namespace emu_fast::emulation {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 64 * 1024;  // PROT_NONE below each stack
constexpr int kWarp = 32;

struct StackDeleter {
  void operator()(char* p) const { munmap(p - kGuardBytes, kGuardBytes + kStackBytes); }
};

std::unique_ptr<char, StackDeleter> new_stack() {
  void* base = mmap(nullptr, kGuardBytes + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                    -1, 0);
  if (base == MAP_FAILED) throw std::bad_alloc();
  mprotect(base, kGuardBytes, PROT_NONE);
  return std::unique_ptr<char, StackDeleter>(static_cast<char*>(base) + kGuardBytes);
}

enum class Wait { kNone, kBarrier, kShuffle, kDone };

struct Fiber {
  ucontext_t ctx;  // start only
  jmp_buf resume;  // where it waits
  bool started = false;
  std::unique_ptr<char, StackDeleter> stack;
  dim3 tid;
  int warp = 0, lane = 0;
  Wait wait = Wait::kNone;
  int64_t target = 0;    // barrier generation / warp arrivals to wait for
  int64_t shuffles = 0;  // shuffles this thread has published
  bool waited = false;   // called griddepcontrol.wait (PDL)
};

struct Warp {
  int lanes = 0;
  int64_t arrived = 0;         // shuffle publications by this warp's lanes, ever
  uint64_t slot[2][kWarp] = {};  // double-buffered by shuffle parity (see exchange)
};

struct State {
  std::mutex launch_mutex;
  std::vector<Fiber> fibers;  // stacks reused across blocks and launches
  std::vector<Warp> warps;
  int threads = 0, exited = 0;
  int64_t barrier_gen = 0;
  int barrier_arrived = 0;
  dim3 grid, block, block_id;
  Fiber* current = nullptr;
  jmp_buf scheduler;
  const std::function<void()>* body = nullptr;
  std::string error;         // of the running launch
  std::string last_message;  // of the last failed launch
  cudaError_t last_error = cudaSuccess;
  uint64_t seed = 0;
  uint64_t block_serial = 0;  // counts blocks run, so shared memory is poisoned once per block
  bool pdl = false;           // the running launch is a programmatic dependent launch
  int64_t waits = 0;          // threads of the running launch that called griddepcontrol.wait
  volatile sig_atomic_t faulted = 0;
  char fault[160] = {};
};

State& state() {
  static State s;
  return s;
}

std::string where(const State& s, const Fiber* f) {
  auto d = [](const dim3& v) { return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")"; };
  return "block " + d(s.block_id) + (f ? " thread " + d(f->tid) : "");
}

void yield(State& s) {
  if (_setjmp(s.current->resume) == 0) _longjmp(s.scheduler, 1);
}

void resume(State& s, Fiber& f) {
  s.current = &f;
  if (_setjmp(s.scheduler) == 0) {
    if (f.started) _longjmp(f.resume, 1);
    f.started = true;
    setcontext(&f.ctx);
  }
  s.current = nullptr;
}

// Stops the block: the fiber is never resumed again.
[[noreturn]] void fail(State& s, const std::string& message) {
  if (s.error.empty()) s.error = message + " (" + where(s, s.current) + ")";
  s.current->wait = Wait::kDone;
  yield(s);
  __builtin_unreachable();
}

void fiber_main() {
  State& s = state();
  (*s.body)();
  if (s.pdl && !s.current->waited)
    fail(s, "a thread of a programmatic dependent launch returned without griddepcontrol.wait "
            "(wait_for_prior_grid): the kernel after it could start before this one's inputs are written");
  s.current->wait = Wait::kDone;
  ++s.exited;
  _longjmp(s.scheduler, 1);  // never returns: uc_link is unused
}

bool runnable(const State& s, const Fiber& f) {
  switch (f.wait) {
    case Wait::kNone: return true;
    case Wait::kBarrier: return s.barrier_gen >= f.target;
    case Wait::kShuffle: return s.warps[f.warp].arrived >= f.target;
    case Wait::kDone: return false;
  }
  return false;
}

std::string describe_deadlock(const State& s) {
  int at_barrier = 0, at_shuffle = 0;
  for (int i = 0; i < s.threads; ++i) {
    at_barrier += s.fibers[i].wait == Wait::kBarrier;
    at_shuffle += s.fibers[i].wait == Wait::kShuffle;
  }
  return "deadlock: " + std::to_string(at_barrier) + " threads wait at __syncthreads, " + std::to_string(at_shuffle) +
         " at a warp shuffle, " + std::to_string(s.exited) + " of " + std::to_string(s.threads) + " have returned (" +
         where(s, nullptr) + ")";
}

// Resumes f if it can go; true if it did.
bool step(State& s, Fiber& f) {
  if (!s.error.empty() || !runnable(s, f)) return false;
  f.wait = Wait::kNone;
  resume(s, f);
  if (s.faulted && s.error.empty()) s.error = std::string(s.fault) + " (" + where(s, &f) + ")";
  return true;
}

void run_block(State& s, std::mt19937_64& rng) {
  ++s.block_serial;
  s.exited = 0;
  s.barrier_gen = 0;
  s.barrier_arrived = 0;
  for (int w = 0; w < static_cast<int>(s.warps.size()); ++w) {
    s.warps[w] = Warp{};
    s.warps[w].lanes = std::min(kWarp, s.threads - w * kWarp);
  }
  for (int i = 0; i < s.threads; ++i) {
    Fiber& f = s.fibers[i];
    f.tid = dim3(i % s.block.x, i / s.block.x % s.block.y, i / (s.block.x * s.block.y));
    f.warp = i / kWarp;
    f.lane = i % kWarp;
    f.wait = Wait::kNone;
    f.shuffles = 0;
    f.waited = false;
    f.started = false;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
  if (s.seed == 0) {
    // Index order: every thread that can go goes once per round, so the warps keep in step.
    while (true) {
      bool progress = false;
      for (int i = 0; i < s.threads; ++i) progress |= step(s, s.fibers[i]);
      if (!s.error.empty() || s.exited == s.threads) return;
      if (!progress) return void(s.error = describe_deadlock(s));
    }
  }
  // Seeded: warps in a random order, each run as far as it can get (until every lane waits
  // for another warp or has returned) before the next one starts, its lanes in random order.
  // Warps end up as far ahead of one another as the barriers allow: a missing barrier or a
  // shared-memory race changes the result.
  std::vector<int> warps(s.warps.size()), lanes(kWarp);
  std::iota(warps.begin(), warps.end(), 0);
  while (true) {
    std::shuffle(warps.begin(), warps.end(), rng);
    bool progress = false;
    for (int w : warps) {
      const int n = s.warps[w].lanes;  // the last warp of a block may be short
      for (bool warp_progress = true; warp_progress;) {
        warp_progress = false;
        std::iota(lanes.begin(), lanes.begin() + n, 0);
        std::shuffle(lanes.begin(), lanes.begin() + n, rng);
        for (int l = 0; l < n; ++l) warp_progress |= step(s, s.fibers[w * kWarp + lanes[l]]);
        if (!s.error.empty()) return;
        progress |= warp_progress;
      }
    }
    if (s.exited == s.threads) return;
    if (!progress) return void(s.error = describe_deadlock(s));
  }
}

// Runs on the alternate signal stack. Kernel code never allocates, so the fault cannot have
// left malloc's state half-changed; the message goes to a fixed buffer all the same.
void on_fault(int sig, siginfo_t* info, void*) {
  State& s = state();
  if (s.current == nullptr) {  // not in a kernel: let it crash as it would have
    signal(sig, SIG_DFL);
    raise(sig);
    return;
  }
  std::snprintf(s.fault, sizeof s.fault, "%s at address %p in a kernel (an invalid, misaligned or stack-overflowing access)",
                sig == SIGSEGV ? "segmentation fault" : "bus error", info->si_addr);
  s.faulted = 1;
  s.current->wait = Wait::kDone;
  _longjmp(s.scheduler, 1);  // SA_NODEFER: the signal is not left blocked
}

// Installs on_fault (on its own stack) for one launch and puts the previous handlers back.
class FaultGuard {
 public:
  FaultGuard() {
    stack_t alt{};
    alt.ss_sp = alt_stack_;
    alt.ss_size = sizeof alt_stack_;
    sigaltstack(&alt, &old_alt_);
    struct sigaction sa {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &old_segv_);
    sigaction(SIGBUS, &sa, &old_bus_);
  }
  ~FaultGuard() {
    sigaction(SIGSEGV, &old_segv_, nullptr);
    sigaction(SIGBUS, &old_bus_, nullptr);
    sigaltstack(&old_alt_, nullptr);
  }

 private:
  alignas(16) static inline char alt_stack_[64 * 1024];
  stack_t old_alt_{};
  struct sigaction old_segv_ {}, old_bus_ {};
};

bool valid_config(dim3 g, dim3 b) {
  const uint64_t threads = uint64_t{b.x} * b.y * b.z;
  return g.x >= 1 && g.x <= 0x7fffffffu && g.y >= 1 && g.y <= 65535 && g.z >= 1 && g.z <= 65535 && b.x >= 1 &&
         b.y >= 1 && b.z >= 1 && b.x <= 1024 && b.y <= 1024 && b.z <= 64 && threads <= 1024;
}

}  // namespace

const dim3& thread_idx() { return state().current->tid; }
const dim3& block_idx() { return state().block_id; }
const dim3& block_dim() { return state().block; }
const dim3& grid_dim() { return state().grid; }

void sync_threads() {
  State& s = state();
  if (s.exited > 0) fail(s, "__syncthreads reached after " + std::to_string(s.exited) + " threads of the block returned");
  Fiber& f = *s.current;
  f.wait = Wait::kBarrier;
  f.target = s.barrier_gen + 1;
  if (++s.barrier_arrived == s.threads) {
    ++s.barrier_gen;
    s.barrier_arrived = 0;
  }
  yield(s);
}

// Shuffle k of a warp uses slot[k & 1]. A lane can publish shuffle k + 2 (reusing the buffer)
// only after every lane has published k + 1, which each does only after reading k.
uint64_t exchange(unsigned mask, uint64_t bits, const std::function<int(int)>& src_of) {
  State& s = state();
  Fiber& f = *s.current;
  Warp& w = s.warps[f.warp];
  const unsigned full = w.lanes == kWarp ? 0xffffffffu : (1u << w.lanes) - 1u;
  if (mask != full) fail(s, "warp shuffle with mask " + std::to_string(mask) + "; the kernels use full warps only");
  const int64_t k = f.shuffles++;
  w.slot[k & 1][f.lane] = bits;
  ++w.arrived;
  f.wait = Wait::kShuffle;
  f.target = static_cast<int64_t>(w.lanes) * (k + 1);
  yield(s);
  const int src = src_of(f.lane);
  if (src < 0 || src >= w.lanes) fail(s, "warp shuffle reads lane " + std::to_string(src) + ", which does not exist");
  return w.slot[k & 1][src];
}

void grid_dependency_wait() {
  State& s = state();
  if (!s.current->waited) ++s.waits;
  s.current->waited = true;
}

void launch_dependents() {
  State& s = state();
  if (s.pdl && !s.current->waited)
    fail(s, "griddepcontrol.launch_dependents before griddepcontrol.wait: the next kernel could start "
            "before the one before this has finished (csrc/kernels/cuda/common.cuh)");
}

int64_t last_launch_waits() { return state().waits; }

void run_grid(dim3 grid, dim3 block, const std::function<void()>& body, bool pdl) {
  State& s = state();
  const std::lock_guard<std::mutex> lock(s.launch_mutex);
  s.pdl = pdl;
  s.waits = 0;
  if (!valid_config(grid, block)) {
    s.last_error = cudaErrorInvalidConfiguration;
    s.last_message = "invalid launch configuration: grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) +
                     "," + std::to_string(grid.z) + "), block (" + std::to_string(block.x) + "," +
                     std::to_string(block.y) + "," + std::to_string(block.z) + ")";
    return;
  }
  s.grid = grid;
  s.block = block;
  s.threads = static_cast<int>(block.x * block.y * block.z);
  while (static_cast<int>(s.fibers.size()) < s.threads) {
    s.fibers.emplace_back();
    s.fibers.back().stack = new_stack();
  }
  s.warps.assign((s.threads + kWarp - 1) / kWarp, Warp{});
  s.body = &body;
  s.error.clear();
  s.faulted = 0;
  std::mt19937_64 rng(s.seed);
  // Blocks in grid order, or with a seed in a random order (CUDA promises none).
  std::vector<dim3> blocks;
  blocks.reserve(static_cast<size_t>(grid.x) * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.emplace_back(x, y, z);
  if (s.seed != 0) std::shuffle(blocks.begin(), blocks.end(), rng);
  const FaultGuard guard;
  for (size_t i = 0; i < blocks.size() && s.error.empty(); ++i) {
    s.block_id = blocks[i];
    run_block(s, rng);
  }
  if (!s.error.empty()) {
    s.last_error = cudaErrorLaunchFailure;
    s.last_message = s.error;
  }
}

uint64_t block_serial() { return state().block_serial; }
void set_schedule_seed(uint64_t seed) { state().seed = seed; }
const char* last_error_message() { return state().last_message.c_str(); }

}  // namespace emu_fast::emulation

cudaError_t cudaGetLastError() {
  auto& s = emu_fast::emulation::state();
  const cudaError_t err = s.last_error;
  s.last_error = cudaSuccess;
  return err;
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}
