// Test-only faults: a named custom kernel made wrong on purpose (its output shifted by one), so
// the tests can show the self-check catches it and the fallback gives the right answer. Set from
// Python with emu_fast._C._set_test_fault; never outside tests. While none is set, a kernel's
// output passes through untouched after one relaxed atomic load.
#include <ATen/ATen.h>

#include <atomic>
#include <mutex>
#include <string>

#include "ops/op_set.h"

namespace emu_fast {
namespace {

std::mutex fault_mutex;
std::string fault_op;                // guarded by fault_mutex
std::atomic<bool> fault_set{false};  // fast path: no lock while no fault is set

}  // namespace

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

at::Tensor apply_test_fault(const char* op, at::Tensor t) { return test_fault(op) ? t.add(1.0) : t; }

}  // namespace emu_fast
