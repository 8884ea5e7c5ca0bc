// The host half of emu_fast::splice_embeddings, shared by the CPU op, the CUDA op (which copies
// the ids to the host for it; the op runs once per prompt) and the CUDA emulator. Torch-free.
#pragma once
#include <cstdint>

namespace emu_fast::kernels {

// Checks ids [n] against a table of `vocab` rows and numbers the slots (id == slot_id; none
// when slot_id < 0) in row-major order: slot_index[p] = k for the k-th slot, -1 elsewhere.
// Returns the number of slots, or -(p + 1) for the first id outside [0, vocab), at p.
inline int64_t number_slots(const int64_t* ids, int64_t n, int64_t vocab, int64_t slot_id, int64_t* slot_index) {
  int64_t slots = 0;
  for (int64_t p = 0; p < n; ++p) {
    if (ids[p] < 0 || ids[p] >= vocab) return -(p + 1);
    slot_index[p] = slot_id >= 0 && ids[p] == slot_id ? slots++ : -1;
  }
  return slots;
}

}  // namespace emu_fast::kernels
