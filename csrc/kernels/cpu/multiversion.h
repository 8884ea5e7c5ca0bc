// Run-time choice of the x86 instruction set for the CPU kernels, so the build needs no -march
// flag: each kernel is compiled once per level with EMU_TARGET_* and cpu_isa() picks one.
// (gcc's target_clones("arch=x86-64-v4") resolves by CPU model name and falls back to the
// baseline on processors it does not know, so we test features ourselves.)
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define EMU_X86 1
#define EMU_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define EMU_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

// Kernel templates called from the EMU_TARGET_* entry points must be inlined into them to be
// compiled for that instruction set; gcc otherwise keeps one baseline out-of-line copy.
#if defined(__GNUC__)
#define EMU_ALWAYS_INLINE inline __attribute__((always_inline))
#define EMU_LAMBDA_INLINE __attribute__((always_inline))
#else
#define EMU_ALWAYS_INLINE inline
#define EMU_LAMBDA_INLINE
#endif

namespace emu_fast::kernels {

enum class Isa { kPortable, kAvx2, kAvx512 };

inline Isa cpu_isa() {
#ifdef EMU_X86
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kPortable;
  }();
  return isa;
#else
  return Isa::kPortable;
#endif
}

// Runs `body` compiled for the best instruction set this processor has. The body must be an
// EMU_LAMBDA_INLINE lambda calling EMU_ALWAYS_INLINE kernels, so that all of it is compiled
// into each EMU_TARGET_* copy below.
#ifdef EMU_X86
template <typename F>
EMU_TARGET_AVX512 void run_avx512(const F& body) { body(); }
template <typename F>
EMU_TARGET_AVX2 void run_avx2(const F& body) { body(); }
#endif

template <typename F>
void run_best(const F& body) {
  switch (cpu_isa()) {
#ifdef EMU_X86
    case Isa::kAvx512: return run_avx512(body);
    case Isa::kAvx2: return run_avx2(body);
#endif
    default: return body();
  }
}

}  // namespace emu_fast::kernels
