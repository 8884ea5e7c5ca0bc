// CPU stand-in for <cuda_fp16.h> (kernel emulator only): IEEE half storage via GCC's _Float16,
// whose conversions round to nearest even as the device does.
#pragma once

struct __half {
  _Float16 value;
};

inline float __half2float(__half h) { return static_cast<float>(h.value); }
inline __half __float2half_rn(float f) { return {static_cast<_Float16>(f)}; }
