// winograd.cpp -- Winograd F(4x4, 3x3) input and output transforms on the CPU (see the header).
//
// Each call first computes, for every block of 16 tiles, where each lane's patch elements (input)
// or output pixels lie relative to channel 0 and which lie inside the image; then the channels are
// split into one contiguous range per worker. The loops (winograd.inc) are compiled for baseline
// x86-64, AVX2+FMA (gathers) and AVX-512 (gathers and scatters) and chosen at run time.
#include "winograd.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "cpu_isa.h"
#include "cpu_parallel.h"

#if defined(SPLATDD_CPU_X86)
#include <immintrin.h>
#endif

namespace splatdd {

#define WINO_ISA 1
namespace wino_generic {
#include "winograd.inc"
}  // namespace wino_generic
#undef WINO_ISA

#if defined(SPLATDD_CPU_X86)
#define WINO_ISA 2
SPLATDD_TARGET_AVX2_BEGIN
namespace wino_avx2 {
#include "winograd.inc"
}  // namespace wino_avx2
SPLATDD_TARGET_END
#undef WINO_ISA
#define WINO_ISA 3
SPLATDD_TARGET_AVX512_BEGIN
namespace wino_avx512 {
#include "winograd.inc"
}  // namespace wino_avx512
SPLATDD_TARGET_END
#undef WINO_ISA
#endif

namespace {

constexpr int kLanes = wino_generic::kLanes;

void check(bool ok, const char* msg) {
  if (!ok) throw std::invalid_argument(msg);
}

constexpr int64_t kMaxSide = int64_t{1} << 20;
constexpr int64_t kMaxOffset = (int64_t{1} << 31) - 1;  // the gathers' offsets are int32
constexpr int64_t kMaxElements = int64_t{1} << 40;

// Values (floats written) per worker below which a call stays on the caller's thread: a ConvNet
// layer of a few images is a fraction of a millisecond, less than starting a thread costs.
constexpr int64_t kMinValuesPerWorker = int64_t{1} << 20;

// Splits channels [0, channels) into one contiguous range per worker: body(begin, end).
template <class F>
void for_channels(int64_t channels, int64_t values_per_channel, int requested, const F& body) {
  if (channels == 0) return;
  const int64_t by_work =
      std::max<int64_t>(1, channels * values_per_channel / kMinValuesPerWorker);
  const int n = resolve_threads(requested, std::min(channels, by_work));
  run_parallel(n, [&](int t) { body(channels * t / n, channels * (t + 1) / n); });
}

struct Tiling {
  int64_t th = 0, tw = 0, T = 0, P = 0, blocks = 0;
};

Tiling tiling(int64_t N, int64_t Ho, int64_t Wo, int64_t rows) {
  Tiling g;
  g.th = (Ho + 3) / 4;
  g.tw = (Wo + 3) / 4;
  g.T = g.th * g.tw;
  g.P = N * g.T;
  check(rows >= g.P && rows % kLanes == 0,
        "rows must be >= N * tiles per image and a multiple of 16");
  g.blocks = rows / kLanes;
  return g;
}

}  // namespace

int winograd_isas() { return cpu_isas(); }

int winograd_default_isa() {
  const Isa isa = pick_isa();
  return isa == Isa::kAvx512 ? 3 : isa == Isa::kAvx2 ? 2 : 1;
}

// For every block of 16 tiles and every one of a tile's side x side pixels (a tile's first pixel
// at (4 ty - pad, 4 tx - pad) of an (N, Ch, Hh, Ww) tensor): each lane's offset from channel 0 of
// its image, and a lane mask of the pixels inside the tensor (tiles >= P: none).
static void tile_offsets(const Tiling& g, int side, int64_t pad, int64_t Ch, int64_t Hh, int64_t Ww,
                         std::vector<int32_t>* off, std::vector<uint32_t>* mask) {
  const int64_t sq = int64_t{side} * side;
  off->assign(static_cast<size_t>(g.blocks * sq * kLanes), 0);
  mask->assign(static_cast<size_t>(g.blocks * sq), 0u);
  for (int64_t b = 0; b < g.blocks; ++b)
    for (int l = 0; l < kLanes; ++l) {
      const int64_t p = b * kLanes + l;
      if (p >= g.P) continue;
      const int64_t n = p / g.T, t = p % g.T, ty = t / g.tw, tx = t % g.tw;
      for (int r = 0; r < side; ++r)
        for (int c = 0; c < side; ++c) {
          const int64_t row = 4 * ty - pad + r, col = 4 * tx - pad + c;
          if (row < 0 || row >= Hh || col < 0 || col >= Ww) continue;
          (*off)[(b * sq + r * side + c) * kLanes + l] =
              static_cast<int32_t>((n * Ch * Hh + row) * Ww + col);
          (*mask)[b * sq + r * side + c] |= 1u << l;
        }
    }
}

void winograd_input_transform_cpu(const WinogradInputArgs& a) {
  check(a.N >= 0 && a.C >= 1 && a.H >= 1 && a.W >= 1, "N must be >= 0 and C, H, W >= 1");
  check(a.pad >= 0 && a.pad <= kMaxSide && a.H <= kMaxSide && a.W <= kMaxSide,
        "pad, H and W must be in 0..2^20");
  const int64_t Ho = a.H + 2 * a.pad - 2, Wo = a.W + 2 * a.pad - 2;
  check(Ho >= 1 && Wo >= 1, "the padded input must be at least 3 x 3");
  const Tiling g = tiling(a.N, Ho, Wo, a.rows);
  check(a.N * a.C * a.H * a.W <= kMaxOffset, "N * C * H * W must be < 2^31 (split the batch)");
  check(36 * a.rows * a.C < kMaxElements, "tensor too large");
  check(a.N == 0 || (a.x != nullptr && a.v != nullptr), "null x or v pointer");
  if (a.rows == 0) return;
  // per block of 16 tiles: the 36 patch elements' offsets from channel 0, and masks (in image)
  std::vector<int32_t> off;
  std::vector<uint32_t> mask;
  tile_offsets(g, 6, a.pad, a.C, a.H, a.W, &off, &mask);
  const Isa isa = choose_isa(a.isa);
  for_channels(a.C, 36 * a.rows, a.num_threads, [&](int64_t begin, int64_t end) {
#if defined(SPLATDD_CPU_X86)
    if (isa == Isa::kAvx512)
      return wino_avx512::input_channels(a, off.data(), mask.data(), g.blocks, begin, end);
    if (isa == Isa::kAvx2)
      return wino_avx2::input_channels(a, off.data(), mask.data(), g.blocks, begin, end);
#endif
    (void)isa;
    wino_generic::input_channels(a, off.data(), mask.data(), g.blocks, begin, end);
  });
}

// The output side shared by the output transform and its adjoint: checks the sizes and returns
// the tiling; `off` / `mask` get, per block of 16 tiles, the 16 output pixels' offsets from
// channel 0 and masks (in image). False when there is nothing to do (no rows).
static bool output_tiles(int64_t N, int64_t K, int64_t Ho, int64_t Wo, int64_t rows, bool ptrs_ok,
                         Tiling* g, std::vector<int32_t>* off, std::vector<uint32_t>* mask) {
  check(N >= 0 && K >= 1 && Ho >= 1 && Wo >= 1, "N must be >= 0 and K, Ho, Wo >= 1");
  check(Ho <= kMaxSide && Wo <= kMaxSide, "Ho and Wo must be at most 2^20");
  *g = tiling(N, Ho, Wo, rows);
  check(N * K * Ho * Wo <= kMaxOffset, "N * K * Ho * Wo must be < 2^31 (split the batch)");
  check(36 * rows * K < kMaxElements, "tensor too large");
  check(N == 0 || ptrs_ok, "null data pointer");
  if (rows == 0) return false;
  tile_offsets(*g, 4, 0, K, Ho, Wo, off, mask);
  return true;
}

void winograd_output_transform_cpu(const WinogradOutputArgs& a) {
  Tiling g;
  std::vector<int32_t> off;
  std::vector<uint32_t> mask;
  if (!output_tiles(a.N, a.K, a.Ho, a.Wo, a.rows, a.m != nullptr && a.y != nullptr, &g, &off,
                    &mask))
    return;
  const Isa isa = choose_isa(a.isa);
  for_channels(a.K, 16 * a.rows, a.num_threads, [&](int64_t begin, int64_t end) {
#if defined(SPLATDD_CPU_X86)
    if (isa == Isa::kAvx512)
      return wino_avx512::output_channels(a, off.data(), mask.data(), g.blocks, begin, end);
    if (isa == Isa::kAvx2)
      return wino_avx2::output_channels(a, off.data(), mask.data(), g.blocks, begin, end);
#endif
    (void)isa;
    wino_generic::output_channels(a, off.data(), mask.data(), g.blocks, begin, end);
  });
}

void winograd_grad_transform_cpu(const WinogradGradArgs& a) {
  Tiling g;
  std::vector<int32_t> off;
  std::vector<uint32_t> mask;
  if (!output_tiles(a.N, a.K, a.Ho, a.Wo, a.rows, a.dy != nullptr && a.dm != nullptr, &g, &off,
                    &mask))
    return;
  const Isa isa = choose_isa(a.isa);
  for_channels(a.K, 36 * a.rows, a.num_threads, [&](int64_t begin, int64_t end) {
#if defined(SPLATDD_CPU_X86)
    if (isa == Isa::kAvx512)
      return wino_avx512::grad_channels(a, off.data(), mask.data(), g.blocks, begin, end);
    if (isa == Isa::kAvx2)
      return wino_avx2::grad_channels(a, off.data(), mask.data(), g.blocks, begin, end);
#endif
    (void)isa;
    wino_generic::grad_channels(a, off.data(), mask.data(), g.blocks, begin, end);
  });
}

void winograd_filter_grad_cpu(const WinogradFilterGradArgs& a) {
  check(a.pairs >= 0 && 36 * a.pairs < kMaxElements, "pairs must be >= 0 and not too large");
  check(a.pairs == 0 || (a.du != nullptr && a.g != nullptr), "null du or g pointer");
  const Isa isa = choose_isa(a.isa);
  // one range of whole 16-pair blocks per worker (the last range takes the partial block)
  const int64_t blocks = (a.pairs + kLanes - 1) / kLanes;
  for_channels(blocks, 36 * kLanes, a.num_threads, [&](int64_t begin, int64_t end) {
    const int64_t b = begin * kLanes, e = std::min(end * kLanes, a.pairs);
#if defined(SPLATDD_CPU_X86)
    if (isa == Isa::kAvx512) return wino_avx512::filter_grad_pairs(a, b, e);
    if (isa == Isa::kAvx2) return wino_avx2::filter_grad_pairs(a, b, e);
#endif
    (void)isa;
    wino_generic::filter_grad_pairs(a, b, e);
  });
}

}  // namespace splatdd
