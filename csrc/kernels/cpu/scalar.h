// Scalar types the CPU kernels read and write, with no torch include.
// bf16 is stored as its upper 16 bits of a float32; at::BFloat16 has the same layout.
#pragma once
#include <cstdint>
#include <cstring>

namespace emu_fast::kernels {

struct bf16 {
  uint16_t bits;
};

inline float to_float(float x) { return x; }
inline float to_float(int8_t x) { return static_cast<float>(x); }
inline float to_float(bf16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T> T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
// Round to nearest even, as torch does; NaN stays a quiet NaN.
template <> inline bf16 from_float<bf16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  // A select, not a branch, so loops that store bf16 vectorize.
  return bf16{static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded)};
}

// Round a float to T's precision and back: how torch's eager ops in T would store it.
template <typename T> inline float round_to(float x) { return to_float(from_float<T>(x)); }

// A weight row (any type to_float widens) dotted with x in float32, as every portable loop sums
// it: 16 running partial sums the compiler vectorizes, then the tail, then the partial sums in
// order.
template <typename W>
inline float dot_portable(const W* row, const float* x, int64_t k_dim) {
  constexpr int kLanes = 16;
  float acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= k_dim; k += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += to_float(row[k + j]) * x[k + j];
  float s = 0.f;
  for (; k < k_dim; ++k) s += to_float(row[k]) * x[k];
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

}  // namespace emu_fast::kernels
