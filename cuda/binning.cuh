// binning.cuh -- internal header of the CUDA backend: the Binning state that the forward builds and
// the backward reuses, the tile geometry, and device helpers shared by the raster kernels.
//
// See docs/cuda_backend.md for the whole pipeline. Summary:
//   * Sample space: image b is rendered on an Hs x Ws grid of samples (Hs = s*H, Ws = s*W).
//   * Tiles are kTile x kTile = 16 x 16 SAMPLES (not pixels). Because 16 % s == 0 for s in
//     {1, 2, 4, 8, 16}, every tile holds whole pixels: (16/s) x (16/s) of them, and tile (tx, ty)
//     covers pixels [tx*16/s, (tx+1)*16/s) x [ty*16/s, (ty+1)*16/s). The last tile of a row/column is
//     partial when Ws or Hs is not a multiple of 16; its samples with x >= Ws or y >= Hs are idle.
//   * Global tile id (GSDD appendix C, eq. 12): gid = image * tiles_per_image + ty * tiles_x + tx.
//   * After binning, gauss[ranges[2*gid] .. ranges[2*gid+1]) lists the Gaussians overlapping tile
//     gid in increasing Gaussian index (stable radix sort), so the forward is deterministic.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "../cpp/render_params.h"
#include "../cpp/splat_math.h"
#include "render_cuda.h"

namespace splatdd {
namespace cuda {

constexpr int kTile = 16;              // tile side, in samples
constexpr int kBlock = kTile * kTile;  // raster threads per block: one per sample of a tile
constexpr int kPackedGeom = 6;         // packed row: mx, my, A, beta, gamma, alpha, then c_1 .. c_C
static_assert(kTile % 4 == 0, "tiles must hold whole pixels for ssaa in {1, 2, 4}");

// The state built by the forward (binning.cu: build_binning) and reused by the backward. All
// device buffers are stream-ordered allocations owned by this object (free_binning).
struct Binning {
  // Where it lives.
  int device = 0;
  cudaStream_t stream = nullptr;              // the forward's stream (allocation stream)
  mutable cudaStream_t free_stream = nullptr;  // stream of the last use (the backward's, if any)
  // The forward's arguments it was built for (checked by the backward).
  const void* params = nullptr;
  int dtype = 0, C = 0, B = 0, H = 0, W = 0, ssaa = 1;
  bool prefilter = true;
  int64_t total = 0;
  // Geometry.
  int Hs = 0, Ws = 0, tiles_x = 0, tiles_y = 0;
  int64_t tiles_per_image = 0, num_tiles = 0;
  // Number of (Gaussian, tile) pairs, read back to the host once per forward (the one sync).
  int64_t n_keys = 0;
  // Device buffers (nullptr when empty).
  void* packed = nullptr;      // (total, 6 + C) of T (double for fp64 params, float otherwise):
                               // mx, my, A, beta, gamma, alpha, c_1 .. c_C in sample space
                               // (splat_math.h: d2 = A (dx + beta dy)^2 + gamma dy^2)
  int64_t* counts = nullptr;   // (total,) number of tiles each Gaussian was emitted to
  int32_t* gauss = nullptr;    // (n_keys,) Gaussian indices sorted by global tile id (stable)
  int64_t* ranges = nullptr;   // (num_tiles, 2) [start, end) into `gauss`; zeros for empty tiles
};

struct BinningDeleter {
  void operator()(Binning* b) const noexcept { free_binning(b); }
};

// Validates `args` (throws std::invalid_argument) and builds the binning on `stream`: preprocess,
// scan, the one 8-byte device-to-host read of the key count (+ stream sync), emit, radix sort,
// tile ranges. Defined in binning.cu.
Binning* build_binning(const RenderArgs& args, cudaStream_t stream);

// Raw kernel arguments of the two raster kernels (nvdiffrast-style params struct, by value).
template <typename T>
struct TileParams {
  const T* packed = nullptr;        // (total, 6 + C)
  const int32_t* gauss = nullptr;   // (n_keys,)
  const int64_t* ranges = nullptr;  // (num_tiles, 2)
  int C = 0, H = 0, W = 0, Hs = 0, Ws = 0, ssaa = 1, tiles_x = 0;
  int64_t tiles_per_image = 0, num_tiles = 0;
  T* out = nullptr;                 // forward: (B, C, H, W)
  const T* grad_out = nullptr;      // backward: (B, C, H, W)
};

template <typename T>
TileParams<T> tile_params(const Binning& b) {
  TileParams<T> p;
  p.packed = static_cast<const T*>(b.packed);
  p.gauss = b.gauss;
  p.ranges = b.ranges;
  p.C = b.C;
  p.H = b.H;
  p.W = b.W;
  p.Hs = b.Hs;
  p.Ws = b.Ws;
  p.ssaa = b.ssaa;
  p.tiles_x = b.tiles_x;
  p.tiles_per_image = b.tiles_per_image;
  p.num_tiles = b.num_tiles;
  return p;
}

// Raster grid: one block per global tile; a block-stride loop covers num_tiles > 2^31 - 1.
inline unsigned int raster_grid(int64_t num_tiles) {
  constexpr int64_t kMax = 0x7fffffff;
  return static_cast<unsigned int>(num_tiles > kMax ? kMax : num_tiles);
}

// Calls f(std::integral_constant<int, C>{}) for the runtime channel count C in [1, kMaxChannels].
// The raster kernels are templated on C so that the per-thread accumulators (C colour sums in the
// forward; SplatGrad's sc[C] and the 6 + C warp-reduced values in the backward) are fully unrolled
// register arrays instead of local memory indexed by a runtime bound.
template <typename F>
void dispatch_channels(int C, F&& f) {
  static_assert(kMaxChannels == 8, "update dispatch_channels");
  switch (C) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: break;  // rejected earlier by build_binning's argument checks
  }
}

#if defined(__CUDACC__)

// A tile's position: image, tile column/row, and this thread's sample.
struct TileCoord {
  int64_t image;
  int tx, ty;
};

template <typename T>
__device__ __forceinline__ TileCoord tile_coord(const TileParams<T>& p, int64_t gid) {
  TileCoord c;
  c.image = gid / p.tiles_per_image;
  const int64_t local = gid - c.image * p.tiles_per_image;
  c.ty = static_cast<int>(local / p.tiles_x);
  c.tx = static_cast<int>(local - static_cast<int64_t>(c.ty) * p.tiles_x);
  return c;
}

// Stages Gaussians gauss[base .. base + n) into shared memory, structure of arrays:
// sh[f * kBlock + j] is field f of the j-th staged Gaussian (f < 6 + C). Thread j loads Gaussian j.
// Reads in the raster loops are then broadcasts (every thread reads the same j).
template <typename T, int C>
__device__ __forceinline__ void stage_batch(const TileParams<T>& p, int64_t base, int n, T* sh,
                                            int32_t* sh_id) {
  constexpr int F = kPackedGeom + C;
  const int j = threadIdx.x;
  if (j < n) {
    const int32_t g = p.gauss[base + j];
    const T* row = p.packed + static_cast<int64_t>(g) * F;
#pragma unroll
    for (int f = 0; f < F; ++f) sh[f * kBlock + j] = row[f];
    if (sh_id != nullptr) sh_id[j] = g;
  }
}

// The Splat view of staged Gaussian j (only the fields the raster maths reads).
template <typename T>
__device__ __forceinline__ Splat<T> staged_splat(const T* sh, int j) {
  Splat<T> s;
  s.mx = sh[0 * kBlock + j];
  s.my = sh[1 * kBlock + j];
  s.A = sh[2 * kBlock + j];
  s.beta = sh[3 * kBlock + j];
  s.gamma = sh[4 * kBlock + j];
  s.B = s.Cc = s.invA = T(0);  // not read by the raster maths (mahalanobis2, accumulate_sample)
  s.alpha = sh[5 * kBlock + j];
  s.sxx = s.syy = T(0);
  s.x0 = s.y0 = 0;
  s.x1 = s.y1 = -1;
  return s;
}

#endif  // __CUDACC__

}  // namespace cuda
}  // namespace splatdd
