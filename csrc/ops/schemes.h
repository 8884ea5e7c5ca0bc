// The weight-only quantization schemes as the C++ side sees them (emu_fast/quant/schemes.py is
// their Python twin and defines the math): one row of a table per scheme, so code that checks,
// names or dispatches a quantized weight looks its scheme up instead of branching on bits.
// Layouts: kernels/cpu/quantized_gemv.h.
#pragma once
#include <c10/core/ScalarType.h>

#include <cstdint>

#include "kernels/cpu/quantized_gemv.h"
#include "ops/op_set.h"

namespace emu_fast {

struct QuantScheme {
  const char* name;        // "int8", "int4": what users pass as weights=
  int64_t bits;            // 8, 4: the decoder's weight_bits
  const char* op;          // the GEMV op that multiplies by it: "gemv_int8", "gemv_int4"
  at::ScalarType qweight;  // storage of the integer weights
  bool grouped;            // scales per group of inputs (2-D) rather than per output row (1-D)
  const char* layout;      // how a row is stored, for messages
  // Columns of qweight for K inputs, and of scales (0: 1-D scales) for a group size.
  int64_t (*qweight_cols)(int64_t k);
  int64_t (*scale_cols)(int64_t k, int64_t group);
  // x [B, K] @ W^T through an op set (ops/op_set.h): the scheme's op with its arguments.
  at::Tensor (*gemv)(const OpSet& kernels, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     int64_t group);
};

inline constexpr QuantScheme kQuantSchemes[] = {
    {"int8", 8, "gemv_int8", at::kChar, false, "one int8 a value", [](int64_t k) { return k; },
     [](int64_t, int64_t) -> int64_t { return 0; },
     [](const OpSet& k, const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, int64_t) {
       return k.call<ops::gemv_int8>(x, q, s);
     }},
    {"int4", 4, "gemv_int4", at::kByte, true, "two values a byte, rows padded to a multiple of 32 values",
     [](int64_t k) { return kernels::int4_row_bytes(k); },
     [](int64_t k, int64_t group) { return kernels::int4_groups(k, group); },
     [](const OpSet& k, const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, int64_t group) {
       return k.call<ops::gemv_int4>(x, q, s, group);
     }},
};

// The scheme of `bits` (8 or 4); nullptr for anything else (0: unquantized).
inline const QuantScheme* quant_scheme(int64_t bits) {
  for (const QuantScheme& s : kQuantSchemes)
    if (s.bits == bits) return &s;
  return nullptr;
}

}  // namespace emu_fast
