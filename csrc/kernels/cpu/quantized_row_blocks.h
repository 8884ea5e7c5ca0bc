// Reading R quantized weight rows block by block, for the integer-input GEMVs
// (quantized_gemv_avx2.cpp, quantized_gemv_avx512.inc).
// No intrinsics (gcc's __builtin_prefetch is prefetcht0 on x86), so the AVX-512 kernels' emulated
// build (tests/avx512_emulation) reads their rows with it too.
#pragma once
#include <cstdint>
#include <cstring>


namespace emu_fast::kernels {

// R weight rows from row n, block by block (kBytes bytes a block of inputs): the whole blocks
// straight from the rows, the last, partial one from a zero-padded copy so that no load passes a
// row's end.
template <typename Q, int R, int64_t kBytes>
struct RowBlocks {
  const Q* rows[R];
  alignas(64) Q tail[R][kBytes];
  int64_t whole;  // blocks read from the rows

  RowBlocks(const Q* q, int64_t n, int64_t row_bytes) : whole(row_bytes / kBytes) {
    for (int i = 0; i < R; ++i) {
      rows[i] = q + (n + i) * row_bytes;
      if (whole * kBytes < row_bytes) {
        std::memset(tail[i], 0, kBytes);
        std::memcpy(tail[i], rows[i] + whole * kBytes, row_bytes - whole * kBytes);
      }
    }
  }
  // Block j of each row, their line of a later block prefetched first when asked.
  void get(int64_t j, bool prefetch, int64_t distance, const Q** w) const {
    for (int i = 0; i < R; ++i) w[i] = j < whole ? rows[i] + j * kBytes : tail[i];
    if (prefetch)
      for (int i = 0; i < R; ++i) __builtin_prefetch(w[i] + distance, 0, 3);
  }
};

}  // namespace emu_fast::kernels
