// The CPU instantiations of the norm and SiLU kernels, one per instruction set.
#include "kernels/cpu/isa.h"
#include "kernels/cpu/norm.h"

namespace emu_fast::kernels {

#define EMU_NORM_INSTANTIATE(T)                                                                         \
  void rms_norm_row_cpu(const T* x, const T* w, float eps, int64_t n, T* y) {                          \
    run_best([&]() EMU_LAMBDA_INLINE { rms_norm_row(x, w, eps, n, y); });                               \
  }                                                                                                     \
  void add_rms_norm_row_cpu(const T* x, const T* r, const T* w, float eps, int64_t n, T* sum, T* y) {  \
    run_best([&]() EMU_LAMBDA_INLINE { add_rms_norm_row(x, r, w, eps, n, sum, y); });                  \
  }                                                                                                     \
  void silu_mul_cpu(const T* gate, const T* up, int64_t n, T* y) {                                     \
    run_best([&]() EMU_LAMBDA_INLINE { silu_mul(gate, up, n, y); });                                    \
  }

EMU_NORM_INSTANTIATE(float)
EMU_NORM_INSTANTIATE(bf16)

}  // namespace emu_fast::kernels
