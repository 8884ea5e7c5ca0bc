// The x86 instruction-set levels of the CPU kernels, chosen at run time so that the build needs
// no -march flag: the levels, their compiler targets, the processor's level, the one test
// override (active_isa), run_best, and the horizontal reductions the levels' loops share.
// (gcc's target_clones("arch=x86-64-v4") resolves by CPU model name and falls back to the
// baseline on processors it does not know, so the features are tested here.)
//
// A new level: its `Isa` value and name, its EMU_TARGET_* attribute, its test in cpu_isa(), its
// case in run_best, and its quantized GEMV table (quantized_gemv_<level>.cpp, listed in
// quantized_gemv.cpp). Kernels written as EMU_ALWAYS_INLINE templates need nothing more.
#pragma once
#include <atomic>

#if defined(__x86_64__) && defined(__GNUC__)
#define EMU_X86 1
#define EMU_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define EMU_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#include <immintrin.h>
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

// Ordered: a level includes every level below it. kIsaNames: their names, in the same order (the
// test hook's and the tests' names for them).
enum class Isa { kPortable, kAvx2, kAvx512 };
inline constexpr const char* kIsaNames[] = {"portable", "avx2", "avx512"};
inline constexpr int kIsaLevels = sizeof(kIsaNames) / sizeof(kIsaNames[0]);

// The best level this processor has.
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

namespace detail {
inline std::atomic<int> g_isa_limit{-1};
}

// The level every CPU kernel runs: cpu_isa(), or a lower one set by set_isa_limit (a test hook:
// each level's loops run on a processor that has a better one).
inline Isa active_isa() {
  const int limit = detail::g_isa_limit.load(std::memory_order_relaxed);
  return limit < 0 ? cpu_isa() : static_cast<Isa>(limit);
}

// Returns false, changing nothing, for a level this processor lacks; cpu_isa() lifts the limit.
inline bool set_isa_limit(Isa isa) {
  if (static_cast<int>(isa) > static_cast<int>(cpu_isa())) return false;
  detail::g_isa_limit.store(isa == cpu_isa() ? -1 : static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

// Whether this processor multiplies bfloat16 natively (AVX512-BF16 or AMX): where it does not,
// ATen's bfloat16 GEMM is several times slower than its float32 one, and prefill widens.
inline bool cpu_has_bf16_dot() {
#ifdef EMU_X86
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
  }();
  return has;
#else
  return true;
#endif
}

// Runs `body` compiled for the active level. The body must be an EMU_LAMBDA_INLINE lambda calling
// EMU_ALWAYS_INLINE kernels, so that all of it is compiled into each EMU_TARGET_* copy below.
#ifdef EMU_X86
template <typename F>
EMU_TARGET_AVX512 void run_avx512(const F& body) { body(); }
template <typename F>
EMU_TARGET_AVX2 void run_avx2(const F& body) { body(); }
#endif

template <typename F>
void run_best(const F& body) {
  switch (active_isa()) {
#ifdef EMU_X86
    case Isa::kAvx512: return run_avx512(body);
    case Isa::kAvx2: return run_avx2(body);
#endif
    default: return body();
  }
}

#ifdef EMU_X86
// The sum of the 8 floats of v: an AVX2 loop's row total.
__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

}  // namespace emu_fast::kernels
