// render_cpu.cpp -- CPU backend: task scheduling, ISA dispatch and the plain reference loops.
//
// Forward: tasks = (image, band of output rows); a task zeroes its rows, then visits that image's
// Gaussians in order and splats each into the band. Every output pixel belongs to one task and its
// sum is always formed in the same order, so the bits do not depend on the thread count.
// Backward: parallel over Gaussians, claimed in chunks from an atomic counter; each Gaussian gathers
// the output gradient over its samples and writes its own gradient row. No atomics on data.
// Scratch memory is allocated once per call, before the threads start; the hot loops never allocate.
//
// Loops: fp32/bf16 parameters run render_cpu_fast.inc (explicit SIMD through vector extensions),
// compiled three times (baseline x86-64, AVX2+FMA, AVX-512) and chosen at run time by the CPU's
// features; fp64 parameters (gradcheck, not speed) run render_cpu.inc's auto-vectorised loops.
// While a float kernel runs, each worker sets flush-to-zero / denormals-are-zero in its MXCSR and
// restores the previous value afterwards (the caller's thread included).
#include "render_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_isa.h"
#include "cpu_parallel.h"
#include "splat_math.h"

#if defined(SPLATDD_CPU_X86)
#include <immintrin.h>  // _mm_getcsr / _mm_setcsr; the AVX2 / AVX-512 copies use a few intrinsics
#endif

// 32- and 64-byte vector arguments of always-inline helpers in the baseline build: no ABI issue.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace splatdd {

namespace cpu_generic {
#include "render_cpu.inc"
}  // namespace cpu_generic

namespace cpu_fast_generic {  // 16-byte vectors: SSE2 has no wider ones
#define SPLATDD_VL 4
#include "render_cpu_fast.inc"
#undef SPLATDD_VL
}  // namespace cpu_fast_generic

#if defined(SPLATDD_CPU_X86)
SPLATDD_TARGET_AVX2_BEGIN
namespace cpu_avx2 {
#include "render_cpu.inc"
}  // namespace cpu_avx2
namespace cpu_fast_avx2 {
#define SPLATDD_VL 8
#include "render_cpu_fast.inc"
#undef SPLATDD_VL
}  // namespace cpu_fast_avx2
SPLATDD_TARGET_END
#endif

#if defined(SPLATDD_CPU_X86)
SPLATDD_TARGET_AVX512_BEGIN
namespace cpu_fast_avx512 {
#define SPLATDD_VL 16
#include "render_cpu_fast.inc"
#undef SPLATDD_VL
}  // namespace cpu_fast_avx512
SPLATDD_TARGET_END
#endif

// ---------------------------------------------------------------------------------------------
// The plain per-sample implementation, straight on splat_math.h (kernel_value, accumulate_sample).
namespace cpu_simple {

template <typename T>
void forward_task(const RenderArgs& a, int b, int r0, int r1, T* /*scratch*/) {
  const int C = a.C, H = a.H, W = a.W, S = a.ssaa, Ws = W * S, Hs = H * S;
  T* out = static_cast<T*>(a.out);
  for (int ch = 0; ch < C; ++ch) {
    T* o = out + ((static_cast<int64_t>(b) * C + ch) * H + r0) * W;
    std::fill(o, o + static_cast<int64_t>(r1 - r0) * W, T(0));
  }
  const T inv_s2 = T(1) / static_cast<T>(S * S);
  T geo[5], col[kMaxChannels], alpha;
  for (int64_t g = a.offsets[b]; g < a.offsets[b + 1]; ++g) {
    cpu_generic::load_gaussian<T>(a.params, a.dtype, g, C, geo, col, alpha);
    const Splat<T> sp = make_splat<T>(geo[0], geo[1], geo[2], geo[3], geo[4], alpha, Ws, Hs,
                                      a.prefilter);
    const int i0 = std::max(sp.y0, r0 * S), i1 = std::min(sp.y1, r1 * S - 1);
    for (int i = i0; i <= i1; ++i) {
      const T dy = static_cast<T>(i) + T(0.5) - sp.my;
      for (int j = sp.x0; j <= sp.x1; ++j) {
        const T dx = static_cast<T>(j) + T(0.5) - sp.mx;
        T e;
        const T k = kernel_value<T>(mahalanobis2<T>(sp, dx, dy), e);
        if (!(k > T(0))) continue;
        for (int ch = 0; ch < C; ++ch)
          out[((static_cast<int64_t>(b) * C + ch) * H + i / S) * W + j / S] +=
              alpha * k * col[ch] * inv_s2;
      }
    }
  }
}

template <typename T>
void backward_gaussian(const BackwardArgs& ba, int b, int64_t g, T* /*scratch*/) {
  const RenderArgs& a = ba.fwd;
  const int C = a.C, H = a.H, W = a.W, S = a.ssaa, Ws = W * S, Hs = H * S;
  const T* gout = static_cast<const T*>(ba.grad_out);
  const T inv_s2 = T(1) / static_cast<T>(S * S);
  T geo[5], col[kMaxChannels], alpha, gs[kMaxChannels];
  cpu_generic::load_gaussian<T>(a.params, a.dtype, g, C, geo, col, alpha);
  const Splat<T> sp = make_splat<T>(geo[0], geo[1], geo[2], geo[3], geo[4], alpha, Ws, Hs,
                                    a.prefilter);
  SplatGrad<T> sg;
  zero_grad<T>(sg, C);
  for (int i = sp.y0; i <= sp.y1; ++i) {
    const T dy = static_cast<T>(i) + T(0.5) - sp.my;
    for (int j = sp.x0; j <= sp.x1; ++j) {
      const T dx = static_cast<T>(j) + T(0.5) - sp.mx;
      T e;
      const T k = kernel_value<T>(mahalanobis2<T>(sp, dx, dy), e);
      if (!(k > T(0))) continue;
      for (int ch = 0; ch < C; ++ch)
        gs[ch] = gout[((static_cast<int64_t>(b) * C + ch) * H + i / S) * W + j / S] * inv_s2;
      accumulate_sample<T>(sg, sp, dx, dy, k, e, gs, col, C);
    }
  }
  T geo_grad[5];
  finish_grad<T>(sg, sp, geo[2], geo[3], geo[4], Ws, Hs, geo_grad);
  T* gp = static_cast<T*>(ba.grad_params) + g * static_cast<int64_t>(6 + C);
  for (int q = 0; q < 5; ++q) gp[q] += geo_grad[q];
  for (int ch = 0; ch < C; ++ch) gp[5 + ch] += sg.sc[ch];
  gp[5 + C] += sg.sa;
}

}  // namespace cpu_simple

// ---------------------------------------------------------------------------------------------
namespace {

enum class Kernel { kSimple, kGeneric, kAvx2, kAvx512 };

// SPLATDD_CPU_KERNEL=simple|generic|avx2|avx512 overrides the automatic choice (tests,
// benchmarks); a choice the CPU cannot run falls back to the best it can.
Kernel choose_kernel() {
  const char* env = std::getenv("SPLATDD_CPU_KERNEL");
  if (env != nullptr) {
    if (std::strcmp(env, "simple") == 0) return Kernel::kSimple;
    if (std::strcmp(env, "generic") == 0) return Kernel::kGeneric;
    if (std::strcmp(env, "avx2") == 0 && cpu_has_avx2()) return Kernel::kAvx2;
  }
  if (cpu_has_avx512()) return Kernel::kAvx512;
  return cpu_has_avx2() ? Kernel::kAvx2 : Kernel::kGeneric;
}

// Flush-to-zero and denormals-are-zero for the duration of a float kernel on this thread; the
// previous MXCSR (the caller's rounding mode and flags) is restored on exit.
class FlushDenormals {
 public:
#if defined(SPLATDD_CPU_X86)
  explicit FlushDenormals(bool on) : on_(on), saved_(on ? _mm_getcsr() : 0u) {
    if (on_) _mm_setcsr(saved_ | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
  }
  ~FlushDenormals() {
    if (on_) _mm_setcsr(saved_);
  }
#else
  explicit FlushDenormals(bool) {}
#endif
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
#if defined(SPLATDD_CPU_X86)
  bool on_;
  unsigned saved_;
#endif
};

void validate(const RenderArgs& a, bool need_out) {
  if (a.C < 1 || a.C > kMaxChannels)
    throw std::invalid_argument("C must be in 1.." + std::to_string(kMaxChannels));
  if (a.ssaa != 1 && a.ssaa != 2 && a.ssaa != 4)
    throw std::invalid_argument("ssaa must be 1, 2 or 4");
  if (a.B < 0 || a.H <= 0 || a.W <= 0 || a.total < 0)
    throw std::invalid_argument("B, total must be >= 0 and H, W > 0");
  if (static_cast<int64_t>(a.H) * a.ssaa > (1 << 28) || static_cast<int64_t>(a.W) * a.ssaa > (1 << 28))
    throw std::invalid_argument("H * ssaa and W * ssaa must be < 2^28");
  if (a.dtype != kFloat32 && a.dtype != kBFloat16 && a.dtype != kFloat64)
    throw std::invalid_argument("dtype must be 0 (float32), 1 (bfloat16) or 2 (float64)");
  if (a.B > 0 && a.offsets == nullptr) throw std::invalid_argument("null offsets pointer");
  if (need_out && a.B > 0 && a.out == nullptr) throw std::invalid_argument("null output pointer");
  if (a.total > 0 && a.params == nullptr) throw std::invalid_argument("null params pointer");
  if (a.B > 0) {
    if (a.offsets[0] != 0 || a.offsets[a.B] != a.total)
      throw std::invalid_argument("offsets must run from 0 to total");
    for (int b = 0; b < a.B; ++b)
      if (a.offsets[b + 1] < a.offsets[b])
        throw std::invalid_argument("offsets must be non-decreasing");
  }
}

// Scratch floats per worker of the fast float loops (their per-Gaussian row table), for any ISA.
int64_t fast_scratch_floats(int Hs) {
  int64_t n = cpu_fast_generic::row_table_floats(Hs);
#if defined(SPLATDD_CPU_X86)
  n = std::max<int64_t>(n, cpu_fast_avx512::row_table_floats(Hs));
#endif
  return n;
}

template <typename T>
using ForwardFn = void (*)(const RenderArgs&, int, int, int, T*);
template <typename T>
using BackwardFn = void (*)(const BackwardArgs&, int, int64_t, T*);

// The instantiation of a kernel template for supersampling factor s (1, 2 or 4), chosen once per
// call (not in the pixel loops): inst maps std::integral_constant<int, S> to the kernel for S.
template <class Fn, class Inst>
Fn pick_ssaa(int s, const Inst& inst) {
  if (s == 1) return inst(std::integral_constant<int, 1>{});
  if (s == 2) return inst(std::integral_constant<int, 2>{});
  return inst(std::integral_constant<int, 4>{});
}

// fp64: render_cpu.inc's loops (AVX2 where available; the AVX-512 choice uses them too).
template <typename T>
ForwardFn<T> pick_forward(Kernel k, int s) {
  if (k == Kernel::kSimple) return &cpu_simple::forward_task<T>;
  if constexpr (std::is_same<T, float>::value) {
#if defined(SPLATDD_CPU_X86)
    if (k == Kernel::kAvx512)
      return pick_ssaa<ForwardFn<T>>(
          s, [](auto S) { return &cpu_fast_avx512::forward_task<decltype(S)::value>; });
#endif
#if defined(SPLATDD_CPU_X86)
    if (k == Kernel::kAvx2)
      return pick_ssaa<ForwardFn<T>>(
          s, [](auto S) { return &cpu_fast_avx2::forward_task<decltype(S)::value>; });
#endif
    return pick_ssaa<ForwardFn<T>>(
        s, [](auto S) { return &cpu_fast_generic::forward_task<decltype(S)::value>; });
  } else {
#if defined(SPLATDD_CPU_X86)
    if (k == Kernel::kAvx2 || k == Kernel::kAvx512)
      return pick_ssaa<ForwardFn<T>>(
          s, [](auto S) { return &cpu_avx2::forward_task<T, decltype(S)::value>; });
#endif
    return pick_ssaa<ForwardFn<T>>(
        s, [](auto S) { return &cpu_generic::forward_task<T, decltype(S)::value>; });
  }
}

template <typename T>
BackwardFn<T> pick_backward(Kernel k, int s) {
  if (k == Kernel::kSimple) return &cpu_simple::backward_gaussian<T>;
  if constexpr (std::is_same<T, float>::value) {
#if defined(SPLATDD_CPU_X86)
    if (k == Kernel::kAvx512)
      return pick_ssaa<BackwardFn<T>>(
          s, [](auto S) { return &cpu_fast_avx512::backward_gaussian<decltype(S)::value>; });
#endif
#if defined(SPLATDD_CPU_X86)
    if (k == Kernel::kAvx2)
      return pick_ssaa<BackwardFn<T>>(
          s, [](auto S) { return &cpu_fast_avx2::backward_gaussian<decltype(S)::value>; });
#endif
    return pick_ssaa<BackwardFn<T>>(
        s, [](auto S) { return &cpu_fast_generic::backward_gaussian<decltype(S)::value>; });
  } else {
#if defined(SPLATDD_CPU_X86)
    if (k == Kernel::kAvx2 || k == Kernel::kAvx512)
      return pick_ssaa<BackwardFn<T>>(
          s, [](auto S) { return &cpu_avx2::backward_gaussian<T, decltype(S)::value>; });
#endif
    return pick_ssaa<BackwardFn<T>>(
        s, [](auto S) { return &cpu_generic::backward_gaussian<T, decltype(S)::value>; });
  }
}

template <typename T>
void forward_impl(const RenderArgs& a) {
  if (a.B == 0) return;
  const Kernel kern = choose_kernel();
  const ForwardFn<T> fn = pick_forward<T>(kern, a.ssaa);
  const bool ftz = std::is_same<T, float>::value && kern != Kernel::kSimple;
  // Bands: enough tasks to balance the threads, never thinner than 8 rows unless H is smaller.
  const int want = resolve_threads(a.num_threads, INT64_MAX);
  int bands = 1;
  if (want > 1 && static_cast<int64_t>(a.B) < 4LL * want) {
    bands = static_cast<int>((4LL * want + a.B - 1) / a.B);
    bands = std::max(1, std::min(bands, (a.H + 7) / 8));
  }
  const int band_h = (a.H + bands - 1) / bands;
  bands = (a.H + band_h - 1) / band_h;
  const int64_t ntasks = static_cast<int64_t>(a.B) * bands;
  const int n = resolve_threads(a.num_threads, ntasks);
  const int64_t stride = std::max<int64_t>(cpu_generic::scratch_stride(a.W),
                                           fast_scratch_floats(a.H * a.ssaa));
  std::vector<T> scratch(static_cast<size_t>(stride) * n);
  std::atomic<int64_t> next{0};
  run_parallel(n, [&](int worker) {
    const FlushDenormals flush(ftz);
    T* wpix = scratch.data() + static_cast<size_t>(stride) * worker;
    for (;;) {
      const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
      if (t >= ntasks) break;
      const int b = static_cast<int>(t / bands), band = static_cast<int>(t % bands);
      const int r0 = band * band_h, r1 = std::min(a.H, r0 + band_h);
      fn(a, b, r0, r1, wpix);
    }
  });
}

template <typename T>
void backward_impl(const BackwardArgs& ba) {
  const RenderArgs& a = ba.fwd;
  if (a.B == 0 || a.total == 0) return;
  const Kernel kern = choose_kernel();
  const BackwardFn<T> fn = pick_backward<T>(kern, a.ssaa);
  const bool ftz = std::is_same<T, float>::value && kern != Kernel::kSimple;
  constexpr int64_t kChunk = 8;
  const int64_t nchunks = (a.total + kChunk - 1) / kChunk;
  const int n = resolve_threads(a.num_threads, nchunks);
  const int64_t stride = std::max<int64_t>(6 * cpu_generic::scratch_stride(a.W),
                                           fast_scratch_floats(a.H * a.ssaa));
  std::vector<T> scratch(static_cast<size_t>(stride) * n);
  std::atomic<int64_t> next{0};
  run_parallel(n, [&](int worker) {
    const FlushDenormals flush(ftz);
    T* buf = scratch.data() + static_cast<size_t>(stride) * worker;
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= nchunks) break;
      const int64_t g0 = c * kChunk, g1 = std::min(a.total, g0 + kChunk);
      // image of g0: last b with offsets[b] <= g0 (skips empty images)
      int b = static_cast<int>(std::upper_bound(a.offsets, a.offsets + a.B + 1, g0) - a.offsets) - 1;
      for (int64_t g = g0; g < g1; ++g) {
        while (g >= a.offsets[b + 1]) ++b;
        fn(ba, b, g, buf);
      }
    }
  });
}

}  // namespace

void render_forward_cpu(const RenderArgs& args) {
  validate(args, true);
  if (args.dtype == kFloat64)
    forward_impl<double>(args);
  else
    forward_impl<float>(args);
}

void render_backward_cpu(const BackwardArgs& args) {
  validate(args.fwd, false);
  if (args.fwd.B > 0 && (args.grad_out == nullptr || (args.fwd.total > 0 && args.grad_params == nullptr)))
    throw std::invalid_argument("null grad_out or grad_params pointer");
  if (args.fwd.dtype == kFloat64)
    backward_impl<double>(args);
  else
    backward_impl<float>(args);
}

const char* cpu_kernel_name() {
  switch (choose_kernel()) {
    case Kernel::kSimple:
      return "simple";
    case Kernel::kAvx2:
      return "avx2";
    case Kernel::kAvx512:
      return "avx512";
    default:
      return "generic";
  }
}

}  // namespace splatdd
