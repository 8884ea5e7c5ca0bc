// The CPU quantized GEMVs' entry points: the input choice (and its override), the lookup in the
// levels' tables (quantized_gemv_table.h) and the rounding of x into the layout the kernel found
// reads. The kernels are in quantized_gemv_{generic,avx2,avx512}.cpp.
#include "kernels/cpu/quantized_gemv.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cpu/isa.h"
#include "kernels/cpu/quantized_gemv_table.h"

namespace emu_fast::kernels {
namespace {

std::atomic<int> g_input_override{-1};
std::atomic<uint64_t> g_input_generation{0};

// Each level's table, best first down to the generic one. A new level adds its line here.
const QuantizedGemvTable* table_of(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return quantized_gemv_table_avx512();
    case Isa::kAvx2: return quantized_gemv_table_avx2();
    default: return quantized_gemv_table_generic();
  }
}

// The level whose kernel serves (weight, input, group) at `isa`: its own, else the next lower one.
Isa find_level(Isa isa, QuantizedWeight weight, QuantizedInput input, int64_t group) {
  for (int level = static_cast<int>(isa); level > 0; --level) {
    const QuantizedGemvTable* table = table_of(static_cast<Isa>(level));
    if (table != nullptr && table->at(weight, input).takes(group)) return static_cast<Isa>(level);
  }
  return Isa::kPortable;
}

const QuantizedGemvKernel& find_kernel(Isa isa, QuantizedWeight weight, QuantizedInput input, int64_t group) {
  return table_of(find_level(isa, weight, input, group))->at(weight, input);
}

// The float32-input products sum raw weights (int8 up to 127, int4 up to 8) times x before any
// scale is applied, so inputs near float32's top (|x| ~ 1e36) would overflow where the product
// itself does not. Such x (largest |x| at least 2^64, every input finite) is scaled down by a
// power of two first and the outputs up again: exact both ways, but for inputs below 2^-190 of
// the largest, which become subnormal (far below the sums' own rounding).
struct TamedInputs {
  const float* x;
  float up;  // 1, or the power of two the outputs are multiplied back by
  void restore(const OutputRows& o) const {
    if (up == 1.f) return;
    for (int64_t b = 0; b < o.batch; ++b)
      for (int64_t n = o.n_begin; n < o.n_end; ++n) o.y[b * o.ldy + n] *= up;
  }
};

TamedInputs tame_large_inputs(const float* x, int64_t n) {
  uint32_t top = 0;  // the largest |x| as bits (integer max: vectorizes, and NaN sorts above inf)
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, 4);
    top = std::max(top, bits & 0x7fffffffu);
  }
  constexpr uint32_t kTwoTo64 = (127u + 64u) << 23, kInf = 0x7f800000u;
  if (top < kTwoTo64 || top >= kInf) return {x, 1.f};  // the usual case; or NaN / inf flow through
  const int s = static_cast<int>(top >> 23) - 127 - 63;  // largest < 2^(e + 1): times 2^-s, < 2^64
  thread_local std::vector<float> scaled;
  scaled.resize(n);
  for (int64_t i = 0; i < n; ++i) scaled[i] = std::ldexp(x[i], -s);
  return {scaled.data(), std::ldexp(1.f, s)};
}

// The rounded inputs of one call (each thread rounds x for itself: K values against its rows'
// N/T times K weights; the buffers stay allocated between calls).
struct Scratch {
  Int16Input i16;
  Int8Input i8;
};
Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// x rounded as `input` asks, into the layout `kernel` reads; false when an input is not finite.
bool round_for(const QuantizedGemvKernel& kernel, QuantizedInput input, const float* x, int64_t batch, int64_t k,
               bool vector, PreparedInputs* in) {
  Scratch& s = scratch();
  const bool reads_int8 = kernel.reads == InputLayout::kInt8Int4Avx2 || kernel.reads == InputLayout::kInt8Int4Avx512;
  if (reads_int8) {
    in->i8 = &s.i8;
    return round_inputs_to_int8(x, batch, k, k, kernel.reads, vector, &s.i8);
  }
  in->i16 = &s.i16;
  if (input == QuantizedInput::kInt16) return round_inputs_to_int16(x, batch, k, k, kernel.reads, vector, &s.i16);
  // int8 inputs for a kernel that reads int16 ones (natural order): the same integers, widened
  if (!round_inputs_to_int8(x, batch, k, k, InputLayout::kInt16, vector, &s.i8)) return false;
  widen_int8_input(s.i8, batch, k, &s.i16);
  return true;
}

// One product: integer inputs where asked and possible, else (and for non-finite x) float32.
void run(QuantizedWeight weight, const QuantizedWeights& w, const float* x, int64_t x_cols, const OutputRows& o,
         QuantizedInput input) {
  if (o.n_begin >= o.n_end) return;
  const Isa isa = active_isa();
  if (weight == QuantizedWeight::kInt4 && !int4_group_takes_integer_inputs(w.group)) input = QuantizedInput::kFloat32;
  if (input != QuantizedInput::kFloat32) {
    const QuantizedGemvKernel& kernel = find_kernel(isa, weight, input, w.group);
    PreparedInputs in;
    if (round_for(kernel, input, x, o.batch, x_cols, isa != Isa::kPortable, &in)) return kernel.fn(w, in, o);
  }
  const TamedInputs tamed = tame_large_inputs(x, o.batch * x_cols);
  PreparedInputs in;
  in.x = tamed.x;
  find_kernel(isa, weight, QuantizedInput::kFloat32, w.group).fn(w, in, o);
  tamed.restore(o);
}

}  // namespace

Isa quantized_gemv_level(QuantizedWeight weight, QuantizedInput input, int64_t group) {
  return find_level(active_isa(), weight, input, group);
}

void set_quantized_input_override(std::optional<QuantizedInput> input) {
  g_input_override.store(input ? static_cast<int>(*input) : -1);
  g_input_generation.fetch_add(1);  // after the store: a reader that saw the old count rereads it
}

uint64_t quantized_input_generation() { return g_input_generation.load(); }

std::optional<QuantizedInput> quantized_input_override() {
  const int forced = g_input_override.load(std::memory_order_relaxed);
  return forced < 0 ? std::nullopt : std::optional<QuantizedInput>(static_cast<QuantizedInput>(forced));
}

void gemv_int8_rows(const int8_t* q, const float* scales, const float* x, float* y, int64_t batch, int64_t k_dim,
                    int64_t ldy, int64_t n_begin, int64_t n_end, QuantizedInput input) {
  run(QuantizedWeight::kInt8, {q, scales, 1, k_dim}, x, k_dim, {y, batch, ldy, n_begin, n_end}, input);
}

void gemv_int4_rows(const uint8_t* q, const float* scales, int64_t group, const float* x, float* y, int64_t batch,
                    int64_t k_dim, int64_t ldy, int64_t n_begin, int64_t n_end, QuantizedInput input) {
  run(QuantizedWeight::kInt4, {q, scales, group, k_dim}, x, int4_padded_k(k_dim), {y, batch, ldy, n_begin, n_end},
      input);
}

}  // namespace emu_fast::kernels
