// Weight-only int4 GEMV on tensor cores, bf16 activations: y = x W^T with W in the int4 layout of
// quantized_gemv.cuh (blocks of 32 values in 16 bytes; byte i: value i low nibble, value i + 16
// high nibble, stored as q + 8; float32 scales per group of `group` inputs), group % 128 == 0.
//
// The CUDA-core kernel spends about 230 instructions on each 16 bytes of int4 (every value
// converted and multiplied on its own, once per batch row), several times what reading them at
// full bandwidth allows. Here the nibbles become exact bf16 pairs with two instructions a pair
// (a LOP3 into 128 + u, one bf16x2 FMA taking 136 off) and m16n8k16 mmas do the products, the
// batch (up to 8 rows) riding along as the mma's N at no extra cost.
//
// One block of kQMmaWarps warps per 16 output rows; warp w takes the steps w, w + kQMmaWarps, ...
// of 128 inputs. In a step, lane 4 g + t loads block 4 c + t (16 bytes) of row g and of row g + 8,
// and the 32 x values of batch row g at the same inputs; its 16 weight pairs per row and 16 x
// pairs feed 8 mmas. Which input an mma k-slot stands for does not change the sum, so each lane
// pairs values the way its registers hold them: word j of a block gives the pairs (4j, 4j+2),
// (16+4j, 16+4j+2), (4j+1, 4j+3), (16+4j+1, 16+4j+3), and x is permuted to match (PRMT). All
// 128 inputs of a step lie in one group (group % 128 == 0), so each step's fp32 tile is scaled
// by its rows' group scales and added to the running sums: the weight the mmas see is exactly
// q (bf16 holds q in [-8, 7]), the product is q * x in fp32, the scale multiplies in fp32 (the
// value is the scheme's q * scale, up to float32 rounding order). The warps' tiles are summed in
// shared memory; y is rounded to T once. No torch includes.
#pragma once
#include <type_traits>

#include "common.cuh"
#include "mma.cuh"

namespace emu_fast::cuda {

constexpr int kQMmaRows = 16;      // output rows per block (the mma's M)
constexpr int kQMmaWarps = 8;      // warps per block, splitting K
constexpr int kQMmaStep = 128;     // inputs per warp step: 4 blocks of 32, one per lane t
constexpr int kQMmaInFlight = 4;   // steps whose weights each lane has loaded ahead
constexpr int kQMmaMaxBatch = 8;   // batch rows per launch (the mma's N)

// Bytes of a and b (a: 0-3, b: 4-7) picked by the selector's nibbles, as CUDA's __byte_perm.
__device__ __forceinline__ uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t selector) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, selector);
#else
  const uint64_t both = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t out = 0;
  for (int i = 0; i < 4; ++i) out |= static_cast<uint32_t>((both >> (8 * ((selector >> (4 * i)) & 7))) & 0xFFu) << (8 * i);
  return out;
#endif
}

// The nibbles at bits s and s + 16 of word (stored as q + 8) as a bf16 pair (low half first)
// holding q exactly: 0x4300 | u is the bf16 128 + u; one bf16x2 FMA (times 1, minus 136) leaves
// u - 8, exact in bf16.
__device__ __forceinline__ uint32_t nibble_pair_bf16(uint32_t word, int s) {
  const uint32_t biased = ((word >> s) & 0x000F000Fu) | 0x43004300u;
#if defined(__CUDA_ARCH__)
  uint32_t out;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(out) : "r"(biased), "r"(0x3F803F80u), "r"(0xC308C308u));
  return out;
#else
  auto half = [](uint32_t bits) {  // 128 + u - 136, exact; the bf16 is the float's upper half
    return __float_as_uint(__uint_as_float(bits << 16) - 136.f) >> 16;
  };
  return half(biased & 0xFFFFu) | (half(biased >> 16) << 16);
#endif
}

// bf16 activations only (the caller sends others to the CUDA-core kernel). x rows 16-byte
// aligned and readable, zeros past K, up to the padded row (as the CUDA-core kernel needs);
// q 16-byte aligned; batch <= kQMmaMaxBatch (columns g >= batch read nothing and are not
// written); rows past n_rows read the last row and are not written.
template <typename T>
__global__ void __launch_bounds__(kQMmaWarps * 32)
int4_mma_gemv_kernel(const uint8_t* __restrict__ q, const float* __restrict__ scales, int64_t scale_ld, int group,
                     const T* __restrict__ x, int64_t ldx, T* __restrict__ y, int64_t ldy, int batch, int k_dim,
                     int n_rows) {
  static_assert(std::is_same_v<T, __nv_bfloat16>, "int4_mma_gemv_kernel takes bf16 activations");
  __shared__ float tile[kQMmaWarps][kQMmaRows][8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * kQMmaRows;
  const int r_lo = min(row0 + g, n_rows - 1), r_hi = min(row0 + g + 8, n_rows - 1);
  const int blocks = (k_dim + 31) / 32;  // 16-byte blocks a row
  const uint4* w_lo = reinterpret_cast<const uint4*>(q) + static_cast<int64_t>(r_lo) * blocks;
  const uint4* w_hi = reinterpret_cast<const uint4*>(q) + static_cast<int64_t>(r_hi) * blocks;
  const bool x_live = g < batch;
  const uint4* xr = reinterpret_cast<const uint4*>(x + (x_live ? g : 0) * ldx);  // 8 values a uint4
  const int steps = (blocks + 3) / 4;

  uint4 lo[kQMmaInFlight], hi[kQMmaInFlight];
  auto load = [&](int c0) {
#pragma unroll
    for (int u = 0; u < kQMmaInFlight; ++u) {
      const int blk = 4 * (c0 + u * kQMmaWarps) + t;
      const bool in = blk < blocks;  // past the row's last block: value 0 (x is zero there too)
      lo[u] = in ? __ldcs(w_lo + blk) : make_uint4(0x88888888u, 0x88888888u, 0x88888888u, 0x88888888u);
      hi[u] = in ? __ldcs(w_hi + blk) : make_uint4(0x88888888u, 0x88888888u, 0x88888888u, 0x88888888u);
    }
  };
  int c = warp;
  bool full = c + (kQMmaInFlight - 1) * kQMmaWarps < steps;
  if (full) load(c);  // weights: no kernel of the step writes them, so before the wait (PDL)
  wait_for_prior_grid();
  allow_dependent_launch();

  float acc[4] = {0.f, 0.f, 0.f, 0.f};  // D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1]
  auto step = [&](const uint4& wl, const uint4& wh, int c_step) {
    const int blk = 4 * c_step + t;
    uint4 xv[4] = {};  // x[32 blk .. 32 blk + 31] of batch row g
    if (x_live && blk < blocks) {
#pragma unroll
      for (int m = 0; m < 4; ++m) xv[m] = __ldg(xr + 4 * blk + m);
    }
    const uint32_t lw[4] = {wl.x, wl.y, wl.z, wl.w}, hw[4] = {wh.x, wh.y, wh.z, wh.w};
    const uint32_t xw[16] = {xv[0].x, xv[0].y, xv[0].z, xv[0].w, xv[1].x, xv[1].y, xv[1].z, xv[1].w,
                             xv[2].x, xv[2].y, xv[2].z, xv[2].w, xv[3].x, xv[3].y, xv[3].z, xv[3].w};
    float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // x words holding x[4j .. 4j+3] and x[16+4j .. 16+4j+3] (two values a word)
      const uint32_t x0 = xw[2 * j], x1 = xw[2 * j + 1], x2 = xw[8 + 2 * j], x3 = xw[8 + 2 * j + 1];
      // pairs (4j, 4j+2), (16+4j, 16+4j+2) | (4j+1, 4j+3), (16+4j+1, 16+4j+3)
      const uint32_t a1[4] = {nibble_pair_bf16(lw[j], 0), nibble_pair_bf16(hw[j], 0), nibble_pair_bf16(lw[j], 4),
                              nibble_pair_bf16(hw[j], 4)};
      const uint32_t b1[2] = {byte_perm(x0, x1, 0x5410), byte_perm(x2, x3, 0x5410)};
      const uint32_t a2[4] = {nibble_pair_bf16(lw[j], 8), nibble_pair_bf16(hw[j], 8), nibble_pair_bf16(lw[j], 12),
                              nibble_pair_bf16(hw[j], 12)};
      const uint32_t b2[2] = {byte_perm(x0, x1, 0x7632), byte_perm(x2, x3, 0x7632)};
      mma_16816<T>(d, a1, b1);
      mma_16816<T>(d, a2, b2);
    }
    // one group for all 128 inputs of the step: scale this step's tile by its rows' scales
    const int gi = c_step * kQMmaStep / group;
    const float s_lo = __ldg(scales + r_lo * scale_ld + gi), s_hi = __ldg(scales + r_hi * scale_ld + gi);
    acc[0] = fmaf(s_lo, d[0], acc[0]);
    acc[1] = fmaf(s_lo, d[1], acc[1]);
    acc[2] = fmaf(s_hi, d[2], acc[2]);
    acc[3] = fmaf(s_hi, d[3], acc[3]);
  };
  while (full) {
#pragma unroll
    for (int u = 0; u < kQMmaInFlight; ++u) step(lo[u], hi[u], c + u * kQMmaWarps);
    c += kQMmaInFlight * kQMmaWarps;
    full = c + (kQMmaInFlight - 1) * kQMmaWarps < steps;
    if (full) load(c);
  }
  for (; c < steps; c += kQMmaWarps) {  // the warp's last steps, fewer than kQMmaInFlight
    const int blk = 4 * c + t;
    const uint4 zero = make_uint4(0x88888888u, 0x88888888u, 0x88888888u, 0x88888888u);
    step(blk < blocks ? __ldcs(w_lo + blk) : zero, blk < blocks ? __ldcs(w_hi + blk) : zero, c);
  }

  tile[warp][g][2 * t] = acc[0];
  tile[warp][g][2 * t + 1] = acc[1];
  tile[warp][g + 8][2 * t] = acc[2];
  tile[warp][g + 8][2 * t + 1] = acc[3];
  __syncthreads();
  for (int i = threadIdx.x; i < kQMmaRows * 8; i += blockDim.x) {
    const int m = i / 8, b = i % 8;
    if (b >= batch || row0 + m >= n_rows) continue;
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < kQMmaWarps; ++v) sum += tile[v][m][b];
    y[b * ldy + row0 + m] = from_f<T>(sum);
  }
}

}  // namespace emu_fast::cuda
