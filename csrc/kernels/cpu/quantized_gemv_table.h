// The CPU quantized GEMVs as a table, as ggml's CPU backend keeps its type traits: for each
// instruction-set level (quantized_gemv_<level>.cpp) and each pair (weight type, input type),
// the kernel and the input layout it reads. quantized_gemv.cpp looks a product up from the
// active level down to the generic table (which has every entry), rounds x into the layout
// the kernel found reads, and calls it. A level fills only the entries it does better.
#pragma once
#include <cstdint>

#include "kernels/cpu/isa.h"
#include "kernels/cpu/quantized_gemv.h"
#include "kernels/cpu/quantized_inputs.h"

namespace emu_fast::kernels {

enum class QuantizedWeight { kInt8, kInt4 };

// One product's weights (layouts in quantized_gemv.h): q is int8_t [N, k_dim] (kInt8) or
// uint8_t [N, int4_row_bytes(k_dim)] (kInt4, with `group`, already int4_kernel_group'ed).
struct QuantizedWeights {
  const void* q;
  const float* scales;
  int64_t group;
  int64_t k_dim;
  const int8_t* int8() const { return static_cast<const int8_t*>(q); }
  const uint8_t* int4() const { return static_cast<const uint8_t*>(q); }
};

// Its inputs, in the layout the kernel reads: x (kFloat32; [batch, k_dim], int4:
// [batch, int4_padded_k(k_dim)] with zeros past k_dim), or the rounded blocks.
struct PreparedInputs {
  const float* x = nullptr;
  const Int16Input* i16 = nullptr;
  const Int8Input* i8 = nullptr;
};

// Its outputs: y[b * ldy + n] for b < batch, n in [n_begin, n_end).
struct OutputRows {
  float* y;
  int64_t batch, ldy, n_begin, n_end;
};

using QuantizedGemvFn = void (*)(const QuantizedWeights&, const PreparedInputs&, const OutputRows&);

struct QuantizedGemvKernel {
  QuantizedGemvFn fn = nullptr;  // none: the next lower level's
  InputLayout reads = InputLayout::kFloat32;
  int64_t group_multiple = 1;  // int4: the groups it takes (others: the next lower level's)
  bool takes(int64_t group) const { return fn != nullptr && group % group_multiple == 0; }
};

struct QuantizedGemvTable {
  QuantizedGemvKernel kernel[2][3];  // [QuantizedWeight][QuantizedInput]
  QuantizedGemvKernel& at(QuantizedWeight w, QuantizedInput x) {
    return kernel[static_cast<int>(w)][static_cast<int>(x)];
  }
  const QuantizedGemvKernel& at(QuantizedWeight w, QuantizedInput x) const {
    return kernel[static_cast<int>(w)][static_cast<int>(x)];
  }
};

// Each level's table; nullptr for a level this build has no kernels of (off x86).
const QuantizedGemvTable* quantized_gemv_table_generic();
const QuantizedGemvTable* quantized_gemv_table_avx2();
const QuantizedGemvTable* quantized_gemv_table_avx512();

// The level whose table serves (weight, input, group) at active_isa() (for the tests: each level
// serves what its table claims).
Isa quantized_gemv_level(QuantizedWeight weight, QuantizedInput input, int64_t group);

// The blocks of kInt4Block values group g spans, in a row padded to int4_padded_k(k_dim).
inline void int4_group_blocks(int64_t g, int64_t group, int64_t k_pad, int64_t* j0, int64_t* j1) {
  *j0 = g * group / kInt4Block;
  *j1 = (k_pad < (g + 1) * group ? k_pad : (g + 1) * group) / kInt4Block;
}

}  // namespace emu_fast::kernels
