// cpu_isa.h -- compiling loops for several x86 instruction sets in one file, and choosing at run
// time: shared by the renderer (render_cpu.cpp) and the fused network blocks (norm_act_pool.cpp).
//
//   SPLATDD_TARGET_AVX2_BEGIN   ... code compiled for AVX2+FMA ...     SPLATDD_TARGET_END
//   SPLATDD_TARGET_AVX512_BEGIN ... code compiled for AVX-512 ...      SPLATDD_TARGET_END
//
// SPLATDD_CPU_X86 is defined where these targets exist (x86-64 with GCC or Clang); elsewhere the
// macros are empty and only the baseline build of the loops is used.
#pragma once

#include <stdexcept>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPLATDD_CPU_X86 1
#endif

#if defined(SPLATDD_CPU_X86) && defined(__clang__)
#define SPLATDD_TARGET_AVX2_BEGIN \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma\"))), apply_to = function)")
#define SPLATDD_TARGET_AVX512_BEGIN                                                            \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512vl,avx512dq,avx512bw," \
          "avx2,fma\"))), apply_to = function)")
#define SPLATDD_TARGET_END _Pragma("clang attribute pop")
#elif defined(SPLATDD_CPU_X86)
#define SPLATDD_TARGET_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define SPLATDD_TARGET_AVX512_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512vl,avx512dq,avx512bw,avx2,fma\")")
#define SPLATDD_TARGET_END _Pragma("GCC pop_options")
#else
#define SPLATDD_TARGET_AVX2_BEGIN
#define SPLATDD_TARGET_AVX512_BEGIN
#define SPLATDD_TARGET_END
#endif

namespace splatdd {

// Whether this CPU runs the AVX2+FMA / AVX-512 (F, VL, DQ, BW) builds (false off x86-64).
inline bool cpu_has_avx2() {
#if defined(SPLATDD_CPU_X86)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

inline bool cpu_has_avx512() {
#if defined(SPLATDD_CPU_X86)
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bw");
  return has;
#else
  return false;
#endif
}

// The instruction set a compiled kernel family runs with: the best this CPU has (the .inc bodies
// are compiled once per entry, each in its own namespace, and chosen at run time).
enum class Isa { kGeneric, kAvx2, kAvx512 };

inline Isa pick_isa() {
  if (cpu_has_avx512()) return Isa::kAvx512;
  return cpu_has_avx2() ? Isa::kAvx2 : Isa::kGeneric;
}

// The codes the ops' `isa` argument takes: 0 the best this CPU has, 1 generic, 2 AVX2, 3 AVX-512
// (tests force each build this CPU runs). cpu_isas(): bit i set when code i runs here.
inline int cpu_isas() { return 2 | (cpu_has_avx2() ? 4 : 0) | (cpu_has_avx512() ? 8 : 0); }

inline Isa choose_isa(int requested) {
  if (requested < 0 || requested > 3)
    throw std::invalid_argument("isa must be 0 (best), 1 (generic), 2 (avx2) or 3 (avx512)");
  if (requested == 0) return pick_isa();
  if (!(cpu_isas() & (1 << requested)))
    throw std::invalid_argument(requested == 2 ? "this CPU has no AVX2+FMA" : "this CPU has no AVX-512");
  return requested == 1 ? Isa::kGeneric : requested == 2 ? Isa::kAvx2 : Isa::kAvx512;
}

}  // namespace splatdd
