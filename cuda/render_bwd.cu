// render_bwd.cu -- backward of the CUDA backend. Reuses the forward's Binning; never syncs the host.
//
//   1. render_bwd_kernel: one block per global tile again, thread = sample. Each thread holds its
//      sample's dL/d(sample) = dL/d(pixel) / s^2 for the C channels. For each staged Gaussian every
//      thread computes its local contribution with splat_math.h's accumulate_sample into a SplatGrad
//      (type T); warps where no lane is inside the ellipse are skipped (__any_sync). The 6 + C values
//      (swu, swy, swuu, swuy, swyy, sc[C], sa) are all-reduced across the warp in T (xor butterfly of
//      __shfl_xor_sync), then lane f issues ONE fp64 atomicAdd for value f into the per-Gaussian
//      accumulator row acc[g] (total, 6 + C), so a warp pays one atomic instruction per Gaussian.
//   2. finish_kernel: one thread per Gaussian recomputes its geometry in double (make_splat<double>),
//      applies finish_grad<double> to the moments (chain rule to u, v, l11, l21, l22), and adds the
//      whole row to grad_params (which the caller zero-initialised) in the params' accumulation type.
//
// Precision mirrors the CPU backend (render_cpu.inc: backward_gaussian): per-sample maths in T,
// Gaussian-level sums and the chain rule in double (for fp32 params this spares the cancellation in
// finish_grad's cancellations and the drift of summing many tiles in fp32; fp64 atomics are native since
// sm_60 and there is one per warp per Gaussian, not per sample).
//
// Determinism: the atomics make the summation order vary from run to run, so gradients are
// reproducible only up to the rounding of that order (fp64 sums of T-rounded warp partials, then
// rounded to T: in practice the fp32 results are almost always bitwise stable, but not guaranteed).
//
// Resource usage (nvcc 13.0, -arch=sm_90, -Xptxas -v; no spills; static shared memory only):
//   render_bwd_kernel<float, C>   C=1: 32 regs, 8192 B;  C=3: 34 regs, 10240 B; C=8: 53 regs, 15360 B
//   render_bwd_kernel<double, C>  C=1: 48 regs, 15360 B; C=3: 60 regs, 19456 B; C=8: 76 regs, 29696 B
//   finish_kernel<float / double> 40 / 46 regs
// (Full table and the command: docs/cuda_backend.md.)

#include <cstdint>
#include <stdexcept>
#include <string>

#include "binning.cuh"
#include "cuda_check.cuh"

namespace splatdd {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T, int C>
__global__ void __launch_bounds__(kBlock) render_bwd_kernel(const TileParams<T> p,
                                                            double* __restrict__ acc_rows) {
  constexpr int F = kPackedGeom + C;  // staged fields; also the number of reduced values (5 + C + 1)
  static_assert(F <= 32, "one lane per reduced value");
  __shared__ T sh[F * kBlock];
  __shared__ int32_t sh_id[kBlock];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int lx = tid % kTile, ly = tid / kTile;
  const int s = p.ssaa;
  const T inv = T(1) / T(s * s);

  for (int64_t gid = blockIdx.x; gid < p.num_tiles; gid += gridDim.x) {
    const int64_t start = p.ranges[2 * gid], end = p.ranges[2 * gid + 1];
    if (start == end) continue;  // block-uniform
    const TileCoord tc = tile_coord(p, gid);
    const int sx = tc.tx * kTile + lx, sy = tc.ty * kTile + ly;
    const bool inside = sx < p.Ws && sy < p.Hs;
    const T px = T(sx) + T(0.5), py = T(sy) + T(0.5);

    T gout[C];
#pragma unroll
    for (int ch = 0; ch < C; ++ch) gout[ch] = T(0);
    if (inside) {
      const int gx = sx / s, gy = sy / s;  // the output pixel of this sample
#pragma unroll
      for (int ch = 0; ch < C; ++ch)
        gout[ch] = p.grad_out[((tc.image * C + ch) * p.H + gy) * static_cast<int64_t>(p.W) + gx] * inv;
    }

    for (int64_t base = start; base < end; base += kBlock) {
      const int n = static_cast<int>(end - base < kBlock ? end - base : kBlock);
      __syncthreads();  // the previous batch (or tile) is consumed
      stage_batch<T, C>(p, base, n, sh, sh_id);
      __syncthreads();
      for (int j = 0; j < n; ++j) {  // uniform over the block: every lane reaches __any_sync
        const Splat<T> g = staged_splat(sh, j);
        const T dx = px - g.mx, dy = py - g.my;
        T e;
        const T k = kernel_value<T>(mahalanobis2<T>(g, dx, dy), e);
        const bool hit = inside && k > T(0);  // k > 0 <=> e > 0 (kernel_value zeroes e with k)
        if (!__any_sync(kFullMask, hit)) continue;  // warp-uniform skip

        SplatGrad<T> sg;
        zero_grad<T>(sg, C);
        if (hit) {
          T col[C];
#pragma unroll
          for (int ch = 0; ch < C; ++ch) col[ch] = sh[(kPackedGeom + ch) * kBlock + j];
          accumulate_sample<T>(sg, g, dx, dy, k, e, gout, col, C);
        }
        // Values in grad_params column order after the 5 moments: sc[0..C-1] then sa (alpha).
        T v[F];
        v[0] = sg.swu;
        v[1] = sg.swy;
        v[2] = sg.swuu;
        v[3] = sg.swuy;
        v[4] = sg.swyy;
#pragma unroll
        for (int ch = 0; ch < C; ++ch) v[5 + ch] = sg.sc[ch];
        v[5 + C] = sg.sa;
#pragma unroll
        for (int f = 0; f < F; ++f) {
#pragma unroll
          for (int off = 16; off > 0; off >>= 1) v[f] += __shfl_xor_sync(kFullMask, v[f], off);
        }
        // Every lane now holds all F sums; lane f adds value f (select without dynamic indexing,
        // which would put v[] in local memory).
        T mine = T(0);
#pragma unroll
        for (int f = 0; f < F; ++f) mine = (lane == f) ? v[f] : mine;
        if (lane < F) atomicAdd(acc_rows + static_cast<int64_t>(sh_id[j]) * F + lane,
                                static_cast<double>(mine));
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(256)
    finish_kernel(const void* __restrict__ params, int dtype, int C, int64_t total,
                  const int64_t* __restrict__ counts, const double* __restrict__ acc_rows, int Ws,
                  int Hs, bool prefilter, T* __restrict__ grad_params) {
  const int F = kPackedGeom + C;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (counts[i] == 0) continue;  // touches no tile, hence no sample: the gradient is 0
    const int64_t r = i * F;
    const double* acc = acc_rows + r;
    // Geometry in double from the T-rounded parameters, exactly as the preprocess computed it.
    double geo[5];
#pragma unroll
    for (int q = 0; q < 5; ++q) geo[q] = static_cast<double>(load_param<T>(params, r + q, dtype));
    const double alpha = static_cast<double>(load_param<T>(params, r + 5 + C, dtype));
    const Splat<double> sd =
        make_splat<double>(geo[0], geo[1], geo[2], geo[3], geo[4], alpha, Ws, Hs, prefilter);
    SplatGrad<double> sg{};
    sg.swu = acc[0];
    sg.swy = acc[1];
    sg.swuu = acc[2];
    sg.swuy = acc[3];
    sg.swyy = acc[4];
    double out[5];
    finish_grad<double>(sg, sd, geo[2], geo[3], geo[4], Ws, Hs, out);
    T* gp = grad_params + r;
#pragma unroll
    for (int q = 0; q < 5; ++q) gp[q] += static_cast<T>(out[q]);
    for (int f = 5; f < F; ++f) gp[f] += static_cast<T>(acc[f]);  // colours, then alpha
  }
}

template <typename T>
void launch_backward(const BackwardArgs& args, const Binning& bin, cudaStream_t stream) {
  const int F = kPackedGeom + bin.C;
  const size_t acc_bytes = static_cast<size_t>(bin.total) * F * sizeof(double);
  detail::DeviceBuffer acc(acc_bytes, stream);
  SPLATDD_CUDA_CHECK(cudaMemsetAsync(acc.get(), 0, acc_bytes, stream));

  TileParams<T> p = tile_params<T>(bin);
  p.grad_out = static_cast<const T*>(args.grad_out);
  dispatch_channels(bin.C, [&](auto cc) {
    constexpr int C = decltype(cc)::value;
    render_bwd_kernel<T, C><<<raster_grid(bin.num_tiles), kBlock, 0, stream>>>(p, acc.as<double>());
  });
  SPLATDD_CUDA_CHECK_LAUNCH("render_bwd_kernel");

  finish_kernel<T><<<detail::grid_for(bin.total, 256), 256, 0, stream>>>(
      args.fwd.params, bin.dtype, bin.C, bin.total, bin.counts, acc.as<double>(), bin.Ws, bin.Hs,
      bin.prefilter, static_cast<T*>(args.grad_params));
  SPLATDD_CUDA_CHECK_LAUNCH("finish_kernel");
}  // `acc` is freed here, stream-ordered after finish_kernel

[[noreturn]] void bad_arg(const std::string& msg) {
  throw std::invalid_argument("splatdd CUDA backend (backward): " + msg);
}

}  // namespace

void render_backward(const BackwardArgs& args, const Binning* bin, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const RenderArgs& a = args.fwd;
  if (bin == nullptr) {
    // Nothing to differentiate without Gaussians or samples; anything else needs the forward's state.
    if (a.total == 0 || a.B == 0 || a.H == 0 || a.W == 0) return;
    bad_arg("no binning state (run the CUDA forward first and pass its returned state)");
  }
  if (a.dtype != bin->dtype || a.C != bin->C || a.B != bin->B || a.H != bin->H ||
      a.W != bin->W || a.ssaa != bin->ssaa || a.prefilter != bin->prefilter ||
      a.total != bin->total)
    bad_arg("arguments differ from the forward's that built the binning state");
  if (bin->n_keys == 0) return;  // no Gaussian reaches any sample: every gradient is 0
  if (a.params == nullptr || args.grad_out == nullptr || args.grad_params == nullptr)
    bad_arg("null params, grad_out or grad_params");
  const int dev = detail::current_device();
  if (dev != bin->device)
    bad_arg("current device " + std::to_string(dev) + " is not the forward's device " +
            std::to_string(bin->device));
  // Free the binning after this backward's kernels (stream order), wherever it is freed from.
  bin->free_stream = stream;
  if (a.dtype == kFloat64) {
    launch_backward<double>(args, *bin, stream);
  } else {
    launch_backward<float>(args, *bin, stream);
  }
}

}  // namespace cuda
}  // namespace splatdd
