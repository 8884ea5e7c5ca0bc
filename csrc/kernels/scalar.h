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
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}

// Round a float to T's precision and back: how torch's eager ops in T would store it.
template <typename T> inline float round_to(float x) { return to_float(from_float<T>(x)); }

}  // namespace emu_fast::kernels
