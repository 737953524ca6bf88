// render_fwd.cu -- forward rasterisation of the CUDA backend.
//
// One block of kBlock = 256 threads per global tile (a 1D grid over every tile of every image, GSDD
// appendix C); thread t owns sample (t % 16, t / 16) of the tile's 16 x 16 samples. The tile's
// Gaussians (sorted by Gaussian index by the binning) are staged through shared memory in batches of
// kBlock, with NO cap on their number: the block loops over all batches. Each thread accumulates its
// sample's C channels in the accumulation type T (float for fp32/bf16 params, double for fp64) with
// splat_math.h's kernel_value. Then the s*s samples of each output pixel are averaged in shared
// memory in a fixed order and the pixel is written directly: no atomics, the forward is
// deterministic (same bits every run). Tiles without Gaussians write zeros, so `out` need not be
// initialised.
//
// Resource usage (nvcc 13.0, -arch=sm_90, -Xptxas -v; no spills; static shared memory only):
//   render_fwd_kernel<float, C>   C=1: 48 regs, 7168 B;  C=3: 48 regs, 9216 B;  C=8: 55 regs, 14336 B
//   render_fwd_kernel<double, C>  C=1: 58 regs, 14336 B; C=3: 54 regs, 18432 B; C=8: 72 regs, 28672 B
// __launch_bounds__(256, 2): without the min-blocks hint ptxas chose 48 registers for <double, 8>
// and spilled 24 bytes; with it no instantiation spills on sm_75/86/90. (Full table and the
// command: docs/cuda_backend.md.)

#include <cstdint>
#include <memory>
#include <stdexcept>

#include "binning.cuh"
#include "cuda_check.cuh"

namespace splatdd {
namespace cuda {
namespace {

template <typename T, int C>
__global__ void __launch_bounds__(kBlock, 2) render_fwd_kernel(const TileParams<T> p) {
  constexpr int F = kPackedGeom + C;
  // Staging area of one batch (structure of arrays), reused for the per-pixel reduction at the end
  // of each tile (C * kBlock <= F * kBlock values).
  __shared__ T sh[F * kBlock];
  const int tid = threadIdx.x;
  const int lx = tid % kTile, ly = tid / kTile;
  const int s = p.ssaa;
  const int P = kTile / s;  // pixels per tile side

  for (int64_t gid = blockIdx.x; gid < p.num_tiles; gid += gridDim.x) {
    const TileCoord tc = tile_coord(p, gid);
    const int sx = tc.tx * kTile + lx, sy = tc.ty * kTile + ly;  // this thread's sample
    const bool inside = sx < p.Ws && sy < p.Hs;                  // idle in a partial last tile
    const T px = T(sx) + T(0.5), py = T(sy) + T(0.5);            // sample centre
    const int64_t start = p.ranges[2 * gid], end = p.ranges[2 * gid + 1];

    T acc[C];
#pragma unroll
    for (int ch = 0; ch < C; ++ch) acc[ch] = T(0);

    for (int64_t base = start; base < end; base += kBlock) {
      const int n = static_cast<int>(end - base < kBlock ? end - base : kBlock);
      __syncthreads();  // the previous batch is consumed
      stage_batch<T, C>(p, base, n, sh, nullptr);
      __syncthreads();
      if (inside) {
        for (int j = 0; j < n; ++j) {
          const Splat<T> g = staged_splat(sh, j);
          const T dx = px - g.mx, dy = py - g.my;
          T e;
          const T k = kernel_value<T>(mahalanobis2<T>(g, dx, dy), e);
          if (k > T(0)) {
            const T w = g.alpha * k;
#pragma unroll
            for (int ch = 0; ch < C; ++ch) acc[ch] += w * sh[(kPackedGeom + ch) * kBlock + j];
          }
        }
      }
    }

    // Box-filter the s x s samples of each pixel. Tiles hold whole pixels since 16 % s == 0.
    __syncthreads();  // staging area free
#pragma unroll
    for (int ch = 0; ch < C; ++ch) sh[ch * kBlock + tid] = acc[ch];
    __syncthreads();
    const T inv = T(1) / T(s * s);  // exact: s*s is a power of two
    const int PP = P * P;
    for (int idx = tid; idx < C * PP; idx += kBlock) {
      const int ch = idx / PP, q = idx - ch * PP;
      const int qy = q / P, qx = q - qy * P;
      const int gx = tc.tx * P + qx, gy = tc.ty * P + qy;  // output pixel
      if (gx < p.W && gy < p.H) {
        const T* src = sh + ch * kBlock + (qy * s) * kTile + qx * s;
        T sum = T(0);
        for (int a = 0; a < s; ++a)
          for (int b = 0; b < s; ++b) sum += src[a * kTile + b];
        p.out[((tc.image * C + ch) * p.H + gy) * static_cast<int64_t>(p.W) + gx] = sum * inv;
      }
    }
    __syncthreads();  // before the next tile of this block (block-stride loop) reuses `sh`
  }
}

template <typename T>
void launch_forward(const Binning& bin, void* out, cudaStream_t stream) {
  TileParams<T> p = tile_params<T>(bin);
  p.out = static_cast<T*>(out);
  dispatch_channels(bin.C, [&](auto cc) {
    constexpr int C = decltype(cc)::value;
    render_fwd_kernel<T, C><<<raster_grid(bin.num_tiles), kBlock, 0, stream>>>(p);
  });
  SPLATDD_CUDA_CHECK_LAUNCH("render_fwd_kernel");
}

}  // namespace

Binning* render_forward(const RenderArgs& args, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  std::unique_ptr<Binning, BinningDeleter> bin(build_binning(args, stream));  // validates args
  const size_t elem = args.dtype == kFloat64 ? sizeof(double) : sizeof(float);
  const size_t out_bytes = static_cast<size_t>(args.B) * args.C * args.H * args.W * elem;
  if (out_bytes == 0) return bin.release();
  if (bin->n_keys == 0) {
    // No Gaussian reaches any sample (including total == 0): the image is all zeros, and no
    // zero-size grid is ever launched.
    SPLATDD_CUDA_CHECK(cudaMemsetAsync(args.out, 0, out_bytes, stream));
  } else if (args.dtype == kFloat64) {
    launch_forward<double>(*bin, args.out, stream);
  } else {
    launch_forward<float>(*bin, args.out, stream);
  }
  return bin.release();
}

}  // namespace cuda
}  // namespace splatdd
