// winograd.cpp -- Winograd F(4x4, 3x3) input and output transforms on the CPU (see the header).
//
// Tasks are (image, row of tiles), in contiguous ranges, one range per
// worker, with a small scratch buffer per worker. The loops (winograd.inc) are compiled for
// baseline x86-64, AVX2+FMA and AVX-512 and chosen at run time by the CPU's features.
#include "winograd.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "cpu_isa.h"
#include "cpu_parallel.h"

namespace splatdd {

namespace wino_generic {
#include "winograd.inc"
}  // namespace wino_generic

#if defined(SPLATDD_CPU_X86)
SPLATDD_TARGET_AVX2_BEGIN
namespace wino_avx2 {
#include "winograd.inc"
}  // namespace wino_avx2
SPLATDD_TARGET_END
SPLATDD_TARGET_AVX512_BEGIN
namespace wino_avx512 {
#include "winograd.inc"
}  // namespace wino_avx512
SPLATDD_TARGET_END
#endif

namespace {

enum class Isa { kGeneric, kAvx2, kAvx512 };

Isa pick_isa() {
  if (cpu_has_avx512()) return Isa::kAvx512;
  return cpu_has_avx2() ? Isa::kAvx2 : Isa::kGeneric;
}

void check(bool ok, const char* msg) {
  if (!ok) throw std::invalid_argument(msg);
}

constexpr int64_t kMaxElements = int64_t{1} << 40;
constexpr int64_t kMaxSide = int64_t{1} << 20;
constexpr int kBlock = wino_generic::kLanes;
using wino_generic::input_segment_scratch;
using wino_generic::output_segment_scratch;

// Values (floats written) per worker below which a call stays on the caller's thread: a ConvNet
// layer of a few images is a fraction of a millisecond, less than starting a thread costs.
constexpr int64_t kMinValuesPerWorker = int64_t{1} << 20;

// Splits `tasks` tasks of `values_per_task` values into one contiguous range per worker and runs
// body(begin, end, scratch) with `scratch_floats` floats of scratch per worker.
template <class F>
void for_tasks(int64_t tasks, int64_t values_per_task, int requested, size_t scratch_floats,
               const F& body) {
  if (tasks == 0) return;
  const int64_t by_work = std::max<int64_t>(1, tasks * values_per_task / kMinValuesPerWorker);
  const int n = resolve_threads(requested, std::min(tasks, by_work));
  std::vector<float> scratch(static_cast<size_t>(n) * scratch_floats);
  run_parallel(n, [&](int t) {
    const int64_t begin = tasks * t / n, end = tasks * (t + 1) / n;
    body(begin, end, scratch.data() + static_cast<size_t>(t) * scratch_floats);
  });
}

}  // namespace

void winograd_input_transform_cpu(const WinogradInputArgs& a) {
  check(a.N >= 0 && a.C >= 1 && a.H >= 1 && a.W >= 1, "N must be >= 0 and C, H, W >= 1");
  check(a.pad >= 0 && a.pad <= kMaxSide && a.H <= kMaxSide && a.W <= kMaxSide,
        "pad, H and W must be in 0..2^20");
  const int64_t Ho = a.H + 2 * a.pad - 2, Wo = a.W + 2 * a.pad - 2;
  check(Ho >= 1 && Wo >= 1, "the padded input must be at least 3 x 3");
  const int64_t T = winograd_tiles(Ho, Wo);
  check(a.rows >= a.N * T, "rows must be >= N * tiles per image");
  check(a.N * a.C * a.H * a.W < kMaxElements && 36 * a.rows * a.C < kMaxElements,
        "tensor too large");
  check(a.N == 0 || (a.x != nullptr && a.v != nullptr), "null x or v pointer");
  const int64_t th = (Ho + 3) / 4, tw = (Wo + 3) / 4;
  const int64_t ncb = (a.C + kBlock - 1) / kBlock, tasks = a.N * th;
  const size_t scratch = static_cast<size_t>(input_segment_scratch(a.C, tw));
  for (int64_t xi = 0; xi < 36 && a.N > 0; ++xi)  // the padding rows: zeros for the GEMM
    std::memset(a.v + (xi * a.rows + a.N * T) * a.C, 0,
                sizeof(float) * static_cast<size_t>((a.rows - a.N * T) * a.C));
  const Isa isa = pick_isa();
  for_tasks(tasks, 36 * tw * ncb * kBlock, a.num_threads, scratch,
            [&](int64_t begin, int64_t end, float* s) {
#if defined(SPLATDD_CPU_X86)
              if (isa == Isa::kAvx512) return wino_avx512::input_tasks(a, begin, end, s);
              if (isa == Isa::kAvx2) return wino_avx2::input_tasks(a, begin, end, s);
#endif
              (void)isa;
              wino_generic::input_tasks(a, begin, end, s);
            });
}

void winograd_output_transform_cpu(const WinogradOutputArgs& a) {
  check(a.N >= 0 && a.K >= 1 && a.Ho >= 1 && a.Wo >= 1, "N must be >= 0 and K, Ho, Wo >= 1");
  check(a.Ho <= kMaxSide && a.Wo <= kMaxSide, "Ho and Wo must be at most 2^20");
  const int64_t T = winograd_tiles(a.Ho, a.Wo);
  check(a.rows >= a.N * T, "rows must be >= N * tiles per image");
  check(a.N * a.K * a.Ho * a.Wo < kMaxElements && 36 * a.rows * a.K < kMaxElements,
        "tensor too large");
  check(a.N == 0 || (a.m != nullptr && a.y != nullptr), "null m or y pointer");
  const int64_t th = (a.Ho + 3) / 4, tw = (a.Wo + 3) / 4;
  const int64_t nkb = (a.K + kBlock - 1) / kBlock, tasks = a.N * th;
  const size_t scratch = static_cast<size_t>(output_segment_scratch(a.K, tw));
  const Isa isa = pick_isa();
  for_tasks(tasks, 16 * tw * nkb * kBlock, a.num_threads, scratch,
            [&](int64_t begin, int64_t end, float* s) {
#if defined(SPLATDD_CPU_X86)
              if (isa == Isa::kAvx512) return wino_avx512::output_tasks(a, begin, end, s);
              if (isa == Isa::kAvx2) return wino_avx2::output_tasks(a, begin, end, s);
#endif
              (void)isa;
              wino_generic::output_tasks(a, begin, end, s);
            });
}

}  // namespace splatdd
