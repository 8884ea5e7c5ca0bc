// Vectorizable float math for the CPU kernels (std::exp does not vectorize without -ffast-math).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/cpu/isa.h"

namespace emu_fast::kernels {

// mask ? a : b for a mask of all ones or all zeros, in integer bits. gcc vectorizes no loop
// around a float select whose value feeds arithmetic or whose arm multiplies (under its
// default trapping math it turns them into branches); an integer blend it does.
EMU_ALWAYS_INLINE float select_bits(uint32_t mask, float a, float b) {
  uint32_t ua, ub;
  std::memcpy(&ua, &a, sizeof ua);
  std::memcpy(&ub, &b, sizeof ub);
  const uint32_t u = (ua & mask) | (ub & ~mask);
  float out;
  std::memcpy(&out, &u, sizeof out);
  return out;
}

// exp(x) for x <= 0 (softmax after subtracting the max), to about 2 ulp, written so the loop
// around it vectorizes (std::exp does not without -ffast-math): x = n ln2 + r with |r| <= ln2/2,
// exp(r) by its degree-6 Taylor-like minimax polynomial, 2^n put into the exponent bits.
EMU_ALWAYS_INLINE float exp_nonpositive(float x_in) {
  // Below -87 exp leaves float's normal range: evaluate at -87 (keeps 2^n a normal float) and
  // return 0, which is what exp rounds to at the extremes (silu(-1e30) must be -0, not
  // -1e30 * 1.6e-38; a softmax weight there is 0 anyway).
  const uint32_t below = x_in < -87.0f ? ~0u : 0u;  // NaN: false, and NaN flows through
  const float x = select_bits(below, -87.0f, x_in);
  // Round to nearest by adding and subtracting 1.5 * 2^23 (std::floor only vectorizes under
  // -fno-trapping-math); exact for |x * log2(e)| < 2^22.
  constexpr float kRound = 12582912.0f;
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split in two for accuracy
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return select_bits(below, 0.0f, er * scale);
}

// silu(x) = x * sigmoid(x), with the exponential always of a non-positive argument.
EMU_ALWAYS_INLINE float silu(float x) {
  const float e = exp_nonpositive(-std::fabs(x));
  const float num = select_bits(x >= 0.f ? ~0u : 0u, 1.f, e);  // sigmoid(x) = num / (1 + e), no overflow
  return x * num / (1.f + e);
}

}  // namespace emu_fast::kernels
