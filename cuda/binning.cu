// binning.cu -- the tiled pipeline's binning stage (GSDD appendix C), plus free_binning and
// device_count.
//
//   1. preprocess  (one thread per Gaussian): image id by binary search over offsets[B+1]; make_splat
//                  in sample space; packed row (mx, my, conic, alpha, colours) in the accumulation
//                  type; sample bounding box; number of 16x16-sample tiles whose rectangle the
//                  cut-off ellipse actually reaches (tiles_touched).
//   2. inclusive scan of tiles_touched (cub::DeviceScan) -> write offsets, and the key count, read
//      back to the host: THE ONE device->host read and stream sync per forward (8 bytes). It is
//      needed to size the key/value arrays and the radix sort; the backward reuses this Binning and
//      never syncs.
//   3. emit  (one thread per Gaussian): one (key = global tile id, value = Gaussian index) pair per
//      touched tile, in tile row-major order.
//   4. cub::DeviceRadixSort::SortPairs (DoubleBuffer, stable) over only the bits needed for
//      num_tiles (+1 sentinel): keys are uint32 when they fit, uint64 otherwise.
//   5. ranges (one thread per key): [start, end) of every global tile in the sorted list.
//
// Resource usage (nvcc 13.0, -arch=sm_90, -Xptxas -v; float / double; no spills, no shared memory):
//   preprocess_kernel        64 / 109 registers
//   emit_kernel<uint32 key>  46 / 73 registers  (uint64 keys: 49 / 75)
//   ranges_kernel            28 (uint32) / 32 (uint64) registers
// (docs/cuda_backend.md has the command and the full table.)

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <climits>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "binning.cuh"
#include "cuda_check.cuh"

namespace splatdd {
namespace cuda {
namespace {

using detail::DeviceBuffer;
using detail::grid_for;

constexpr int kThreads1D = 256;
// Relative slack of the tile/ellipse test: a tile is kept when min d2 over its sample rectangle is
// <= kCutoffD2 * (1 + kHitSlack). The test is conservative in exact arithmetic; the slack absorbs
// rounding differences against the per-sample d2 of the raster kernels, so a sample with d2 <= r^2
// is never lost to the culling (and a sample at d2 ~ r^2 contributes ~0 anyway: the kernel is
// continuous at the cut-off).
constexpr double kHitSlack = 1e-2;

// Does the cut-off ellipse {d2 <= r^2} of (mx, my, A, beta, gamma) reach the rectangle of sample
// CENTRES [xa, xb] x [ya, yb]? d2 = A (dx + beta dy)^2 + gamma dy^2 (the raster kernels' form,
// splat_math.h: mahalanobis2). Exact min of this convex quadratic over the rectangle: 0 when the
// mean is inside, else the min over the four edges (on an edge the 1D minimiser is clamped to the
// edge: dy = -A beta dx / (A beta^2 + gamma) on a vertical edge, dx = -beta dy on a horizontal one).
// __noinline__ so that the counting pass (preprocess) and the emitting pass (emit) run the very
// same machine code and always agree on the count; emit is still defensive about it.
// (__host__ too, so that it can be unit-tested on a machine without a GPU.)
template <typename T>
__host__ __device__ __noinline__ bool tile_hit(T mx, T my, T A, T beta, T gamma, T xa, T xb, T ya,
                                               T yb) {
  const T x_lo = xa - mx, x_hi = xb - mx, y_lo = ya - my, y_hi = yb - my;
  if (x_lo <= T(0) && x_hi >= T(0) && y_lo <= T(0) && y_hi >= T(0)) return true;
  T best = static_cast<T>(kCutoffD2) * T(4);  // anything above the threshold
  const T xs[2] = {x_lo, x_hi}, ys[2] = {y_lo, y_hi};
  for (int e = 0; e < 2; ++e) {  // (a 2-trip loop: unrolled by the compiler; no #pragma unroll,
                                 // which the host compiler would warn about)
    {  // vertical edge x = xs[e]: minimise over dy
      const T dx = xs[e];
      const T dy = clamp_to<T>(-A * beta * dx / (A * beta * beta + gamma), y_lo, y_hi);
      const T uu = dx + beta * dy;
      const T d2 = A * uu * uu + gamma * dy * dy;
      best = d2 < best ? d2 : best;
    }
    {  // horizontal edge y = ys[e]: minimise over dx
      const T dy = ys[e];
      const T dx = clamp_to<T>(-beta * dy, x_lo, x_hi);
      const T uu = dx + beta * dy;
      const T d2 = A * uu * uu + gamma * dy * dy;
      best = d2 < best ? d2 : best;
    }
  }
  // NaN-safe: a NaN conic never "hits" (such a Gaussian touches no tile and gets zero gradient).
  return best <= static_cast<T>(kCutoffD2 * (1.0 + kHitSlack));
}

// Sample rectangle of tile (tx, ty) clipped to the Gaussian's bounding box (x0..x1, y0..y1), as
// sample-centre coordinates.
template <typename T>
__host__ __device__ __forceinline__ bool gauss_tile_hit(const T* row, int4 box, int tx, int ty) {
  const int tx0 = tx * kTile, tx1 = tx0 + kTile - 1, ty0 = ty * kTile, ty1 = ty0 + kTile - 1;
  const int sx0 = tx0 > box.x ? tx0 : box.x, sx1 = tx1 < box.y ? tx1 : box.y;
  const int sy0 = ty0 > box.z ? ty0 : box.z, sy1 = ty1 < box.w ? ty1 : box.w;
  return tile_hit<T>(row[0], row[1], row[2], row[3], row[4], T(sx0) + T(0.5), T(sx1) + T(0.5),
                     T(sy0) + T(0.5), T(sy1) + T(0.5));
}

// 1. preprocess ----------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads1D)
    preprocess_kernel(const void* __restrict__ params, int dtype, int C,
                      const int64_t* __restrict__ offsets, int B, int64_t total, int Ws, int Hs,
                      bool prefilter, T* __restrict__ packed, int64_t* __restrict__ counts,
                      int4* __restrict__ boxes, int32_t* __restrict__ image_of) {
  const int F = kPackedGeom + C;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // Image id: the largest b in [0, B) with offsets[b] <= i (empty images share an offset with
    // their successor, so the last of equal offsets is the non-empty one); valid iff
    // offsets[b] <= i < offsets[b+1]. A malformed `offsets` only drops Gaussians, never faults.
    int lo = 0, hi = B;
    while (hi - lo > 1) {
      const int mid = lo + (hi - lo) / 2;
      if (offsets[mid] <= i) lo = mid; else hi = mid;
    }
    const bool valid = offsets[lo] <= i && i < offsets[lo + 1];
    image_of[i] = lo;

    // The geometry (mean, conic, bounding box) is computed in double and rounded once to T, as the
    // CPU backend does (render_cpu.inc: forward_task): per Gaussian, so cheap even where fp64 is
    // slow, and the conic's rounding is a bias shared by all samples of the Gaussian, so it is
    // worth avoiding. Loading as T first then widening gives the CPU's exact inputs.
    const int64_t r = i * F;
    const double u = static_cast<double>(load_param<T>(params, r + 0, dtype));
    const double v = static_cast<double>(load_param<T>(params, r + 1, dtype));
    const double l11 = static_cast<double>(load_param<T>(params, r + 2, dtype));
    const double l21 = static_cast<double>(load_param<T>(params, r + 3, dtype));
    const double l22 = static_cast<double>(load_param<T>(params, r + 4, dtype));
    const T alpha = load_param<T>(params, r + 5 + C, dtype);
    const Splat<double> s = make_splat<double>(u, v, l11, l21, l22, static_cast<double>(alpha), Ws,
                                               Hs, prefilter);
    T* row = packed + r;
    row[0] = static_cast<T>(s.mx);
    row[1] = static_cast<T>(s.my);
    row[2] = static_cast<T>(s.A);
    row[3] = static_cast<T>(s.beta);
    row[4] = static_cast<T>(s.gamma);
    row[5] = alpha;
    for (int ch = 0; ch < C; ++ch) row[kPackedGeom + ch] = load_param<T>(params, r + 5 + ch, dtype);

    const int4 box = make_int4(s.x0, s.x1, s.y0, s.y1);
    boxes[i] = box;
    int64_t count = 0;
    if (valid && s.x0 <= s.x1 && s.y0 <= s.y1) {
      // Note: never cull on alpha or colour: a zero-opacity Gaussian still has dL/dalpha != 0.
      for (int ty = s.y0 / kTile; ty <= s.y1 / kTile; ++ty)
        for (int tx = s.x0 / kTile; tx <= s.x1 / kTile; ++tx)
          count += gauss_tile_hit<T>(row, box, tx, ty) ? 1 : 0;
    }
    counts[i] = count;
  }
}

// 3. emit ----------------------------------------------------------------------------------------
template <typename T, typename KeyT>
__global__ void __launch_bounds__(kThreads1D)
    emit_kernel(const T* __restrict__ packed, int C, int64_t total,
                const int64_t* __restrict__ counts, const int64_t* __restrict__ incl,
                const int4* __restrict__ boxes, const int32_t* __restrict__ image_of, int tiles_x,
                int64_t tiles_per_image, KeyT sentinel, KeyT* __restrict__ keys,
                int32_t* __restrict__ values) {
  const int F = kPackedGeom + C;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t count = counts[i];
    if (count == 0) continue;
    const int64_t base = incl[i] - count;  // exclusive offset
    const T* row = packed + i * F;
    const int4 box = boxes[i];
    const int64_t tile0 = static_cast<int64_t>(image_of[i]) * tiles_per_image;
    int64_t w = 0;
    for (int ty = box.z / kTile; ty <= box.w / kTile; ++ty)
      for (int tx = box.x / kTile; tx <= box.y / kTile; ++tx)
        if (gauss_tile_hit<T>(row, box, tx, ty)) {
          if (w < count) {  // defensive: never write past this Gaussian's slots
            keys[base + w] = static_cast<KeyT>(tile0 + static_cast<int64_t>(ty) * tiles_x + tx);
            values[base + w] = static_cast<int32_t>(i);
          }
          ++w;
        }
    for (; w < count; ++w) {  // defensive: unused slots sort last and belong to no tile
      keys[base + w] = sentinel;
      values[base + w] = static_cast<int32_t>(i);
    }
  }
}

// 5. tile ranges ---------------------------------------------------------------------------------
template <typename KeyT>
__global__ void __launch_bounds__(kThreads1D)
    ranges_kernel(const KeyT* __restrict__ keys, int64_t n, uint64_t num_tiles,
                  int64_t* __restrict__ ranges) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const KeyT k = keys[i];
    if (static_cast<uint64_t>(k) >= num_tiles) continue;  // sentinel
    if (i == 0 || keys[i - 1] != k) ranges[2 * static_cast<int64_t>(k)] = i;
    if (i == n - 1 || keys[i + 1] != k) ranges[2 * static_cast<int64_t>(k) + 1] = i + 1;
  }
}

// Host helpers -----------------------------------------------------------------------------------

[[noreturn]] void bad_arg(const std::string& msg) {
  throw std::invalid_argument("splatdd CUDA backend: " + msg);
}

void check_render_args(const RenderArgs& a) {
  if (a.dtype != kFloat32 && a.dtype != kBFloat16 && a.dtype != kFloat64)
    bad_arg("unknown params dtype code " + std::to_string(a.dtype));
  if (a.C < 1 || a.C > kMaxChannels)
    bad_arg("C must be in [1, " + std::to_string(kMaxChannels) + "], got " + std::to_string(a.C));
  if (a.ssaa < 1 || kTile % a.ssaa != 0)
    bad_arg("ssaa must divide " + std::to_string(kTile) + " (1, 2, 4, ...), got " +
            std::to_string(a.ssaa));
  if (a.B < 0 || a.H < 0 || a.W < 0 || a.total < 0) bad_arg("negative size");
  if (a.total > INT32_MAX) bad_arg("more than 2^31 - 1 Gaussians in one call");
  if (static_cast<int64_t>(a.H) * a.ssaa > INT32_MAX / 2 ||
      static_cast<int64_t>(a.W) * a.ssaa > INT32_MAX / 2)
    bad_arg("H * ssaa or W * ssaa too large");
  if (a.B > 0 && a.offsets == nullptr) bad_arg("offsets is null");
  if (a.total > 0 && a.params == nullptr) bad_arg("params is null");
  if (static_cast<int64_t>(a.B) * a.C * a.H * a.W > 0 && a.out == nullptr) bad_arg("out is null");
}

int bit_width(uint64_t v) {
  int n = 0;
  while (v) { ++n; v >>= 1; }
  return n;
}

template <typename KeyT, typename ValueT>
void radix_sort(void* temp, size_t& temp_bytes, cub::DoubleBuffer<KeyT>& keys,
                cub::DoubleBuffer<ValueT>& values, int64_t n, int end_bit, cudaStream_t stream) {
  if (n <= INT32_MAX) {
    SPLATDD_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys, values,
                                                       static_cast<int>(n), 0, end_bit, stream));
  } else {
#if CUB_VERSION >= 200500
    SPLATDD_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys, values, n, 0,
                                                       end_bit, stream));
#else
    (void)temp;
    (void)temp_bytes;
    bad_arg("more than 2^31 - 1 (Gaussian, tile) pairs needs CUB >= 2.5 (CUDA >= 12.4)");
#endif
  }
}

// Steps 3-5 for a key type.
template <typename T, typename KeyT>
void emit_sort_ranges(Binning& bin, const DeviceBuffer& boxes, const DeviceBuffer& image_of,
                      const DeviceBuffer& incl, cudaStream_t stream) {
  const int64_t n = bin.n_keys;
  const KeyT sentinel = static_cast<KeyT>(bin.num_tiles);
  DeviceBuffer keys0(n * sizeof(KeyT), stream), keys1(n * sizeof(KeyT), stream);
  DeviceBuffer vals0(n * sizeof(int32_t), stream), vals1(n * sizeof(int32_t), stream);

  emit_kernel<T, KeyT><<<grid_for(bin.total, kThreads1D), kThreads1D, 0, stream>>>(
      static_cast<const T*>(bin.packed), bin.C, bin.total, bin.counts, incl.as<int64_t>(),
      boxes.as<int4>(), image_of.as<int32_t>(), bin.tiles_x, bin.tiles_per_image, sentinel,
      keys0.as<KeyT>(), vals0.as<int32_t>());
  SPLATDD_CUDA_CHECK_LAUNCH("emit_kernel");

  // Sort only the bits that can be set: keys are <= num_tiles (the sentinel).
  const int end_bit = bit_width(static_cast<uint64_t>(bin.num_tiles));
  cub::DoubleBuffer<KeyT> dkeys(keys0.as<KeyT>(), keys1.as<KeyT>());
  cub::DoubleBuffer<int32_t> dvals(vals0.as<int32_t>(), vals1.as<int32_t>());
  size_t temp_bytes = 0;
  radix_sort(nullptr, temp_bytes, dkeys, dvals, n, end_bit, stream);
  {
    DeviceBuffer temp(temp_bytes, stream);
    radix_sort(temp.get(), temp_bytes, dkeys, dvals, n, end_bit, stream);
  }

  bin.ranges = static_cast<int64_t*>(
      detail::device_alloc(static_cast<size_t>(bin.num_tiles) * 2 * sizeof(int64_t), stream));
  SPLATDD_CUDA_CHECK(cudaMemsetAsync(bin.ranges, 0,
                                     static_cast<size_t>(bin.num_tiles) * 2 * sizeof(int64_t), stream));
  ranges_kernel<KeyT><<<grid_for(n, kThreads1D), kThreads1D, 0, stream>>>(
      dkeys.Current(), n, static_cast<uint64_t>(bin.num_tiles), bin.ranges);
  SPLATDD_CUDA_CHECK_LAUNCH("ranges_kernel");

  // Keep the sorted values; the other value buffer and both key buffers are freed (stream-ordered,
  // after the kernels above) when they go out of scope.
  if (dvals.Current() == vals0.as<int32_t>()) {
    bin.gauss = static_cast<int32_t*>(vals0.release());
  } else {
    bin.gauss = static_cast<int32_t*>(vals1.release());
  }
}

template <typename T>
void build(Binning& bin, const RenderArgs& a, cudaStream_t stream) {
  const int64_t total = bin.total;
  const int F = kPackedGeom + a.C;
  bin.packed = detail::device_alloc(static_cast<size_t>(total) * F * sizeof(T), stream);
  bin.counts = static_cast<int64_t*>(detail::device_alloc(total * sizeof(int64_t), stream));
  DeviceBuffer boxes(total * sizeof(int4), stream);
  DeviceBuffer image_of(total * sizeof(int32_t), stream);
  DeviceBuffer incl(total * sizeof(int64_t), stream);

  preprocess_kernel<T><<<grid_for(total, kThreads1D), kThreads1D, 0, stream>>>(
      a.params, a.dtype, a.C, a.offsets, a.B, total, bin.Ws, bin.Hs, a.prefilter,
      static_cast<T*>(bin.packed), bin.counts, boxes.as<int4>(), image_of.as<int32_t>());
  SPLATDD_CUDA_CHECK_LAUNCH("preprocess_kernel");

  size_t temp_bytes = 0;
  SPLATDD_CUDA_CHECK(cub::DeviceScan::InclusiveSum(nullptr, temp_bytes, bin.counts,
                                                   incl.as<int64_t>(), static_cast<int>(total),
                                                   stream));
  {
    DeviceBuffer temp(temp_bytes, stream);
    SPLATDD_CUDA_CHECK(cub::DeviceScan::InclusiveSum(temp.get(), temp_bytes, bin.counts,
                                                     incl.as<int64_t>(), static_cast<int>(total),
                                                     stream));
  }

  // THE host sync of the forward: the number of (Gaussian, tile) pairs sizes the key/value arrays
  // and the radix sort, so it must be known on the host. 8 bytes, once per forward; the backward
  // reuses this Binning and never syncs.
  int64_t n_keys = 0;
  SPLATDD_CUDA_CHECK(cudaMemcpyAsync(&n_keys, incl.as<int64_t>() + (total - 1), sizeof(int64_t),
                                     cudaMemcpyDeviceToHost, stream));
  SPLATDD_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (n_keys < 0) throw std::runtime_error("splatdd CUDA backend: negative key count (corrupt scan)");
  bin.n_keys = n_keys;
  if (n_keys == 0) return;

  if (static_cast<uint64_t>(bin.num_tiles) <= UINT32_MAX) {
    emit_sort_ranges<T, uint32_t>(bin, boxes, image_of, incl, stream);
  } else {
    emit_sort_ranges<T, uint64_t>(bin, boxes, image_of, incl, stream);
  }
}

}  // namespace

Binning* build_binning(const RenderArgs& a, cudaStream_t stream) {
  check_render_args(a);
  std::unique_ptr<Binning, BinningDeleter> bin(new Binning());
  bin->device = detail::current_device();
  bin->stream = stream;
  bin->free_stream = stream;
  bin->params = a.params;
  bin->dtype = a.dtype;
  bin->C = a.C;
  bin->B = a.B;
  bin->H = a.H;
  bin->W = a.W;
  bin->ssaa = a.ssaa;
  bin->prefilter = a.prefilter;
  bin->total = a.total;
  bin->Hs = a.H * a.ssaa;
  bin->Ws = a.W * a.ssaa;
  bin->tiles_x = (bin->Ws + kTile - 1) / kTile;
  bin->tiles_y = (bin->Hs + kTile - 1) / kTile;
  bin->tiles_per_image = static_cast<int64_t>(bin->tiles_x) * bin->tiles_y;
  if (bin->tiles_per_image > 0 && a.B > (INT64_MAX - 1) / bin->tiles_per_image)
    bad_arg("B * tiles_per_image overflows 64 bits");
  bin->num_tiles = static_cast<int64_t>(a.B) * bin->tiles_per_image;
  if (bin->num_tiles == 0 || bin->total == 0) return bin.release();  // nothing to bin

  if (a.dtype == kFloat64) {
    build<double>(*bin, a, stream);
  } else {
    build<float>(*bin, a, stream);
  }
  return bin.release();
}

void free_binning(Binning* b) {
  if (b == nullptr) return;
  // Free on the device the buffers live on, on the stream of their last use (stream order then
  // guarantees no kernel still reads them), and restore the caller's device. Never throws.
  int prev = -1;
  const bool have_prev = cudaGetDevice(&prev) == cudaSuccess;
  const bool switched = have_prev && prev != b->device && cudaSetDevice(b->device) == cudaSuccess;
  detail::device_free(b->packed, b->free_stream);
  detail::device_free(b->counts, b->free_stream);
  detail::device_free(b->gauss, b->free_stream);
  detail::device_free(b->ranges, b->free_stream);
  if (switched) (void)cudaSetDevice(prev);
  delete b;
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace cuda
}  // namespace splatdd
