// emu_fast::splice_embeddings: token embeddings with image vectors written into the slots of a
// slot token. Its schema, argument checks, CPU implementation (kernels/cpu/splice_embeddings.h) and ATen
// twin; the CUDA implementation is splice_embeddings.cu.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "kernels/cpu/splice_embeddings.h"
#include "ops/checks.h"
#include "ops/cpu_glue.h"
#include "ops/registration.h"

namespace emu_fast {

namespace {

// The schemas, defined for emu_fast:: (our kernels) and emu_fast_aten:: (their ATen twins).
constexpr const char* kSchemas[] = {
    // Token embeddings with image vectors written into the slots whose id is slot_token_id, in
    // row-major order: input_ids [B,T] int64, embed_table [V,H], slot_values [S,H] -> [B,T,H].
    // S must equal the number of slots; slot_token_id < 0 means no slots (S must be 0).
    "splice_embeddings(Tensor input_ids, Tensor embed_table, Tensor slot_values, int slot_token_id) -> Tensor",
};

}  // namespace

void check_splice(const at::Tensor& ids, const at::Tensor& table, const at::Tensor& values,
                  bool allow_half) {
  const char* op = "splice_embeddings";
  check_dim(op, "input_ids", ids, 2);
  check_dim(op, "embed_table", table, 2);
  check_dim(op, "slot_values", values, 2);
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, "emu_fast.", op, ": input_ids must be int64, got ",
                   py_dtype(ids.scalar_type()));
  check_float_dtype(op, "embed_table", table, allow_half);
  check_same_dtype(op, table, "slot_values", values);
  check_same_device(op, table, "input_ids", ids);
  check_same_device(op, table, "slot_values", values);
  TORCH_CHECK_VALUE(values.size(1) == table.size(1), "emu_fast.", op, ": slot_values have width ",
                    values.size(1), " but the embedding table has hidden size ", table.size(1));
  check_contiguous(op, "embed_table", table);
}

void check_splice_slots(int64_t numbered, const int64_t* ids, int64_t T, int64_t vocab, int64_t slot_id,
                        int64_t S) {
  if (numbered < 0) {
    const int64_t p = -numbered - 1;
    TORCH_CHECK_INDEX(false, "emu_fast.splice_embeddings: token id ", ids[p], " at (row ", p / T, ", position ",
                      p % T, ") is outside the embedding table of ", vocab, " rows");
  }
  TORCH_CHECK_VALUE(numbered == S, "emu_fast.splice_embeddings: the input has ", numbered, " slots (token id ",
                    slot_id, ") but ", S, " slot vectors were given");
}

namespace {

using namespace cpu_glue;

// ---- CPU ----

at::Tensor splice_embeddings_cpu(const at::Tensor& ids, const at::Tensor& table,
                                 const at::Tensor& values, int64_t slot_id) {
  check_splice(ids, table, values, /*allow_half=*/true);
  const int64_t B = ids.size(0), T = ids.size(1), V = table.size(0), H = table.size(1);
  const int64_t S = values.size(0);
  const at::Tensor ids_c = ids.contiguous();
  const at::Tensor values_c = values.contiguous();
  const int64_t* id = ids_c.data_ptr<int64_t>();

  // Pass 1 over the ids only: validate, and give each slot its row-major index.
  std::vector<int64_t> slot_index(B * T, -1);
  check_splice_slots(kernels::number_slots(id, B * T, V, slot_id, slot_index.data()), id, T, V, slot_id, S);

  // Pass 2: one row copy per position, straight into the output.
  at::Tensor out = at::empty({B, T, H}, table.options());
  const size_t row_bytes = H * table.element_size();
  const char* src_table = static_cast<const char*>(table.data_ptr());
  const char* src_values = static_cast<const char*>(values_c.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, B * T, grain_rows(H), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const char* src = slot_index[p] >= 0 ? src_values + slot_index[p] * row_bytes
                                           : src_table + id[p] * row_bytes;
      std::memcpy(dst + p * row_bytes, src, row_bytes);
    }
  });
  return out;
}

// ---- ATen twins: the same op in plain ATen (any device; the portable step) ----

// The table's rows, then the slot vectors in row-major order over the slots (a host sync to
// number them and check their count, as the kernels check it).
at::Tensor splice_embeddings_aten(const at::Tensor& ids, const at::Tensor& table, const at::Tensor& values,
                                  int64_t slot_id) {
  check_splice(ids, table, values, /*allow_half=*/true);
  const int64_t T = ids.size(1), V = table.size(0), S = values.size(0);
  const at::Tensor ids_c = ids.contiguous().cpu();
  std::vector<int64_t> slot_index(ids.numel(), -1);
  check_splice_slots(kernels::number_slots(ids_c.data_ptr<int64_t>(), ids.numel(), V, slot_id, slot_index.data()),
                     ids_c.data_ptr<int64_t>(), T, V, slot_id, S);
  const at::Tensor is_slot = ids == slot_id;
  at::Tensor out = at::embedding(table, at::where(is_slot, at::zeros_like(ids), ids));
  if (S > 0) out.index_put_({is_slot}, values.to(table.scalar_type()));
  return out;
}

}  // namespace

EMU_FAST_DEFINE_OP_AND_TWIN(kSchemas)

TORCH_LIBRARY_IMPL(emu_fast, CPU, m) {
  m.impl("splice_embeddings", &splice_embeddings_cpu);
}

TORCH_LIBRARY_IMPL(emu_fast_aten, CompositeExplicitAutograd, m) {
  m.impl("splice_embeddings", &splice_embeddings_aten);
}

}  // namespace emu_fast
