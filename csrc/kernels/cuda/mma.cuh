// One warp-wide tensor-core multiply-accumulate, D[16x8] += A[16x16] B[16x8] in float32 with
// 16-bit inputs (mma.sync.m16n8k16, sm_80 and later), and the same arithmetic from warp shuffles
// where there is no tensor core to call (the CPU emulator in tests/cuda_emulation), so kernels
// built on it run in `make test`. No torch includes.
//
// Fragments as the PTX ISA lays them out (lane = 4 g + t, g = lane / 4, t = lane % 4; a .b32
// register holds two 16-bit elements, the lower index in the low half):
//   a[0] = A[g][2t, 2t+1]    a[1] = A[g+8][2t, 2t+1]    a[2] = A[g][2t+8, 2t+9]    a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]    b[1] = B[2t+8, 2t+9][g]
//   d[0] = D[g][2t]   d[1] = D[g][2t+1]   d[2] = D[g+8][2t]   d[3] = D[g+8][2t+1]
#pragma once
#include <type_traits>

#include "common.cuh"

namespace emu_fast::cuda {

// The two 16-bit elements of a packed pair, as floats (low half first).
template <typename T>
__device__ __forceinline__ void unpack2(uint32_t pair, float& lo, float& hi) {
  const T* e = reinterpret_cast<const T*>(&pair);
  lo = to_f(e[0]);
  hi = to_f(e[1]);
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "mma_16816 takes bf16 or half");
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  // The emulator: gather, for this lane's rows g, g+8 and columns 2t, 2t+1, every k from the
  // lanes holding it (k pairs 2s, 2s+1 and 2s+8, 2s+9 live in lane 4 g' + s), in k order.
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  for (int s = 0; s < 4; ++s) {
    const int row_lane = 4 * g + s, col0 = 4 * (2 * t) + s, col1 = 4 * (2 * t + 1) + s;
    const uint32_t a_lo = __shfl_sync(0xffffffffu, a[0], row_lane), a_hi = __shfl_sync(0xffffffffu, a[1], row_lane);
    const uint32_t a_lo8 = __shfl_sync(0xffffffffu, a[2], row_lane), a_hi8 = __shfl_sync(0xffffffffu, a[3], row_lane);
    const uint32_t b00 = __shfl_sync(0xffffffffu, b[0], col0), b01 = __shfl_sync(0xffffffffu, b[1], col0);
    const uint32_t b10 = __shfl_sync(0xffffffffu, b[0], col1), b11 = __shfl_sync(0xffffffffu, b[1], col1);
    float a0[2], a1[2], a2[2], a3[2], c0[2], c1[2], c0_8[2], c1_8[2];
    unpack2<T>(a_lo, a0[0], a0[1]);   // A[g][2s, 2s+1]
    unpack2<T>(a_hi, a1[0], a1[1]);   // A[g+8][2s, 2s+1]
    unpack2<T>(a_lo8, a2[0], a2[1]);  // A[g][2s+8, 2s+9]
    unpack2<T>(a_hi8, a3[0], a3[1]);  // A[g+8][2s+8, 2s+9]
    unpack2<T>(b00, c0[0], c0[1]);    // B[2s, 2s+1][2t]
    unpack2<T>(b01, c0_8[0], c0_8[1]);  // B[2s+8, 2s+9][2t]
    unpack2<T>(b10, c1[0], c1[1]);    // B[2s, 2s+1][2t+1]
    unpack2<T>(b11, c1_8[0], c1_8[1]);  // B[2s+8, 2s+9][2t+1]
    for (int i = 0; i < 2; ++i) {
      d[0] += a0[i] * c0[i] + a2[i] * c0_8[i];
      d[1] += a0[i] * c1[i] + a2[i] * c1_8[i];
      d[2] += a1[i] * c0[i] + a3[i] * c0_8[i];
      d[3] += a1[i] * c1[i] + a3[i] * c1_8[i];
    }
  }
#endif
}

}  // namespace emu_fast::cuda
