// bindings.cpp -- the only pybind11 file: module splatdd._C.
//
// The module never links libtorch. Python (src/splatdd/render.py) checks dtypes, devices, shapes
// and contiguity, allocates every buffer with torch and passes raw addresses as integers; this file
// checks the integer arguments (a bad one raises ValueError, never crashes), releases the GIL and
// calls the CPU backend or, when compiled with SPLATDD_WITH_CUDA, the CUDA backend.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "convnet_step.h"
#include "cpu_parallel.h"
#include "cpu_isa.h"
#include "norm_act_pool.h"
#include "render_cpu.h"
#include "render_params.h"
#include "splat_math.h"
#include "winograd.h"

#ifdef SPLATDD_WITH_CUDA
#include "render_cuda.h"
#endif

namespace py = pybind11;
using splatdd::BackwardArgs;
using splatdd::RenderArgs;

namespace {

constexpr const char* kNoCuda = "splatdd was built without the CUDA backend";
constexpr int64_t kMaxSide = 1 << 16;              // H, W
constexpr int64_t kMaxSamplesPerImage = 1LL << 28;  // H * W * ssaa^2

#ifdef SPLATDD_WITH_CUDA
// Owns the CUDA binning state between forward and backward; freed when Python drops it.
struct CudaBinning {
  splatdd::cuda::Binning* ptr = nullptr;
  explicit CudaBinning(splatdd::cuda::Binning* p) : ptr(p) {}
  CudaBinning(const CudaBinning&) = delete;
  CudaBinning& operator=(const CudaBinning&) = delete;
  ~CudaBinning() {
    if (ptr != nullptr) splatdd::cuda::free_binning(ptr);
  }
};
#endif

enum class Device { kCpu, kCuda };

Device parse_device(const std::string& device) {
  if (device == "cpu") return Device::kCpu;
  if (device == "cuda") {
#ifdef SPLATDD_WITH_CUDA
    return Device::kCuda;
#else
    throw std::runtime_error(kNoCuda);
#endif
  }
  throw py::value_error("device must be \"cpu\" or \"cuda\", got \"" + device + "\"");
}

void require(bool ok, const std::string& msg) {
  if (!ok) throw py::value_error(msg);
}

RenderArgs make_args(uintptr_t params, int64_t dtype, uintptr_t offsets, int64_t B, int64_t total,
                     int64_t C, int64_t H, int64_t W, int64_t ssaa, bool prefilter,
                     int64_t num_threads) {
  require(dtype == splatdd::kFloat32 || dtype == splatdd::kBFloat16 || dtype == splatdd::kFloat64,
          "dtype must be 0 (float32), 1 (bfloat16) or 2 (float64), got " + std::to_string(dtype));
  require(C >= 1 && C <= splatdd::kMaxChannels,
          "C must be in 1.." + std::to_string(splatdd::kMaxChannels) + ", got " + std::to_string(C));
  require(ssaa == 1 || ssaa == 2 || ssaa == 4,
          "ssaa must be 1, 2 or 4, got " + std::to_string(ssaa));
  require(B >= 0 && B <= INT32_MAX, "B must be in 0..2^31-1, got " + std::to_string(B));
  require(total >= 0, "total must be >= 0, got " + std::to_string(total));
  require(H > 0 && H <= kMaxSide, "H must be in 1.." + std::to_string(kMaxSide) + ", got " + std::to_string(H));
  require(W > 0 && W <= kMaxSide, "W must be in 1.." + std::to_string(kMaxSide) + ", got " + std::to_string(W));
  require(H * W * ssaa * ssaa <= kMaxSamplesPerImage, "H * W * ssaa^2 must be <= 2^28");
  require(num_threads >= 0 && num_threads <= 4096, "num_threads must be in 0..4096");
  require(B == 0 || offsets != 0, "offsets must not be null");
  require(total == 0 || params != 0, "params must not be null");
  RenderArgs a;
  a.params = reinterpret_cast<const void*>(params);
  a.dtype = static_cast<int>(dtype);
  a.total = total;
  a.C = static_cast<int>(C);
  a.offsets = reinterpret_cast<const int64_t*>(offsets);
  a.B = static_cast<int>(B);
  a.H = static_cast<int>(H);
  a.W = static_cast<int>(W);
  a.ssaa = static_cast<int>(ssaa);
  a.prefilter = prefilter;
  a.num_threads = static_cast<int>(num_threads);
  return a;
}

py::object render_batch(const std::string& device, uintptr_t params, int64_t dtype,
                        uintptr_t offsets, int64_t B, int64_t total, int64_t C, int64_t H,
                        int64_t W, int64_t ssaa, bool prefilter, uintptr_t out,
                        int64_t num_threads, uintptr_t stream) {
  const Device dev = parse_device(device);
  RenderArgs a = make_args(params, dtype, offsets, B, total, C, H, W, ssaa, prefilter, num_threads);
  require(B == 0 || out != 0, "out must not be null");
  a.out = reinterpret_cast<void*>(out);
  if (dev == Device::kCpu) {
    py::gil_scoped_release release;
    splatdd::render_forward_cpu(a);
    return py::none();
  }
#ifdef SPLATDD_WITH_CUDA
  splatdd::cuda::Binning* binning = nullptr;
  {
    py::gil_scoped_release release;
    binning = splatdd::cuda::render_forward(a, reinterpret_cast<void*>(stream));
  }
  if (binning == nullptr) return py::none();
  return py::cast(std::make_unique<CudaBinning>(binning));
#else
  (void)stream;
  throw std::runtime_error(kNoCuda);
#endif
}

void render_batch_backward(const std::string& device, uintptr_t params, int64_t dtype,
                           uintptr_t offsets, int64_t B, int64_t total, int64_t C, int64_t H,
                           int64_t W, int64_t ssaa, bool prefilter, uintptr_t grad_out,
                           uintptr_t grad_params, int64_t num_threads, uintptr_t stream,
                           py::object state) {
  const Device dev = parse_device(device);
  BackwardArgs ba;
  ba.fwd = make_args(params, dtype, offsets, B, total, C, H, W, ssaa, prefilter, num_threads);
  require(B == 0 || grad_out != 0, "grad_out must not be null");
  require(total == 0 || grad_params != 0, "grad_params must not be null");
  ba.grad_out = reinterpret_cast<const void*>(grad_out);
  ba.grad_params = reinterpret_cast<void*>(grad_params);
  if (dev == Device::kCpu) {
    py::gil_scoped_release release;
    splatdd::render_backward_cpu(ba);
    return;
  }
#ifdef SPLATDD_WITH_CUDA
  const splatdd::cuda::Binning* binning = nullptr;
  if (!state.is_none()) {
    if (!py::isinstance<CudaBinning>(state))
      throw py::type_error("state must be the object returned by render_batch(\"cuda\", ...)");
    binning = state.cast<CudaBinning&>().ptr;
  }
  if (binning == nullptr && B > 0 && total > 0)
    throw py::value_error("the CUDA backward needs the state returned by the CUDA forward");
  py::gil_scoped_release release;
  splatdd::cuda::render_backward(ba, binning, reinterpret_cast<void*>(stream));
#else
  (void)stream;
  (void)state;
  throw std::runtime_error(kNoCuda);
#endif
}

splatdd::NormActPoolArgs make_nap_args(uintptr_t x, int64_t dtype, uintptr_t weight,
                                       uintptr_t bias, int64_t N, int64_t C, int64_t H, int64_t W,
                                       double eps, bool relu, bool pool, uintptr_t out,
                                       uintptr_t mean, uintptr_t rstd, int64_t num_threads,
                                       int64_t isa = 0) {
  require(isa >= 0 && isa <= 3, "isa must be 0 (best), 1 (generic), 2 (avx2) or 3 (avx512)");
  require(dtype == splatdd::kFloat32 || dtype == splatdd::kBFloat16,
          "dtype must be 0 (float32) or 1 (bfloat16), got " + std::to_string(dtype));
  require(N >= 0 && N <= INT32_MAX, "N must be in 0..2^31-1, got " + std::to_string(N));
  require(C >= 1 && C <= (1 << 20), "C must be in 1..2^20, got " + std::to_string(C));
  require(H >= 1 && H <= kMaxSide && W >= 1 && W <= kMaxSide,
          "H and W must be in 1.." + std::to_string(kMaxSide));
  require(!pool || (H >= 2 && W >= 2), "pooling needs H >= 2 and W >= 2");
  require(eps > 0 && eps < 1e30, "eps must be > 0");
  require(num_threads >= 0 && num_threads <= 4096, "num_threads must be in 0..4096");
  require(N == 0 || x != 0, "x must not be null");
  splatdd::NormActPoolArgs a;
  a.x = reinterpret_cast<const void*>(x);
  a.dtype = static_cast<int>(dtype);
  a.weight = reinterpret_cast<const float*>(weight);
  a.bias = reinterpret_cast<const float*>(bias);
  a.N = N;
  a.C = C;
  a.H = H;
  a.W = W;
  a.eps = static_cast<float>(eps);
  a.relu = relu;
  a.pool = pool;
  a.out = reinterpret_cast<void*>(out);
  a.mean = reinterpret_cast<float*>(mean);
  a.rstd = reinterpret_cast<float*>(rstd);
  a.num_threads = static_cast<int>(num_threads);
  a.isa = static_cast<int>(isa);
  return a;
}

void norm_act_pool_forward(uintptr_t x, int64_t dtype, uintptr_t weight, uintptr_t bias,
                           int64_t N, int64_t C, int64_t H, int64_t W, double eps, bool relu,
                           bool pool, uintptr_t out, uintptr_t mean, uintptr_t rstd,
                           int64_t num_threads, int64_t isa) {
  const splatdd::NormActPoolArgs a = make_nap_args(x, dtype, weight, bias, N, C, H, W, eps, relu,
                                                   pool, out, mean, rstd, num_threads, isa);
  require(N == 0 || out != 0, "out must not be null");
  py::gil_scoped_release release;
  splatdd::norm_act_pool_forward_cpu(a);
}

splatdd::ConvNormActPoolArgs make_conv_nap_args(uintptr_t x, uintptr_t conv_weight,
                                                uintptr_t conv_bias, int64_t Cin, int64_t Hin,
                                                int64_t Win, int64_t pad, uintptr_t weight,
                                                uintptr_t bias, int64_t N, int64_t C, double eps,
                                                bool relu, bool pool, uintptr_t out,
                                                int64_t num_threads, int64_t isa) {
  require(Cin >= 1 && Cin <= 64, "Cin must be in 1..64, got " + std::to_string(Cin));
  require(pad >= 0 && pad <= 16, "pad must be in 0..16, got " + std::to_string(pad));
  require(Hin >= 1 && Hin <= kMaxSide && Win >= 1 && Win <= kMaxSide,
          "Hin and Win must be in 1.." + std::to_string(kMaxSide));
  require(Hin + 2 * pad >= 3 && Win + 2 * pad >= 3, "the padded input must be at least 3 x 3");
  require(N == 0 || conv_weight != 0, "conv_weight must not be null");
  splatdd::ConvNormActPoolArgs c;
  // nap.x is unused by the fused convolution; the input's address keeps make_nap_args' check
  c.nap = make_nap_args(x, splatdd::kFloat32, weight, bias, N, C, Hin + 2 * pad - 2,
                        Win + 2 * pad - 2, eps, relu, pool, out, 0, 0, num_threads, isa);
  c.conv_x = reinterpret_cast<const float*>(x);
  c.conv_weight = reinterpret_cast<const float*>(conv_weight);
  c.conv_bias = reinterpret_cast<const float*>(conv_bias);
  c.Cin = Cin;
  c.Hin = Hin;
  c.Win = Win;
  c.pad = pad;
  return c;
}

void conv_norm_act_pool_forward(uintptr_t x, uintptr_t conv_weight, uintptr_t conv_bias,
                                int64_t Cin, int64_t Hin, int64_t Win, int64_t pad,
                                uintptr_t weight, uintptr_t bias, int64_t N, int64_t C, double eps,
                                bool relu, bool pool, uintptr_t out, uintptr_t mean,
                                uintptr_t rstd, int64_t num_threads, int64_t isa) {
  require(N == 0 || out != 0, "out must not be null");
  splatdd::ConvNormActPoolArgs c = make_conv_nap_args(
      x, conv_weight, conv_bias, Cin, Hin, Win, pad, weight, bias, N, C, eps, relu, pool, out,
      num_threads, isa);
  c.nap.mean = reinterpret_cast<float*>(mean);
  c.nap.rstd = reinterpret_cast<float*>(rstd);
  py::gil_scoped_release release;
  splatdd::conv_norm_act_pool_forward_cpu(c);
}

void conv_norm_act_pool_backward(uintptr_t x, uintptr_t conv_weight, uintptr_t conv_bias,
                                 int64_t Cin, int64_t Hin, int64_t Win, int64_t pad,
                                 uintptr_t weight, uintptr_t bias, int64_t N, int64_t C,
                                 double eps, bool relu, bool pool, uintptr_t mean, uintptr_t rstd,
                                 uintptr_t grad_out, uintptr_t grad_x, uintptr_t grad_conv_weight,
                                 uintptr_t grad_conv_bias, uintptr_t grad_weight,
                                 uintptr_t grad_bias, int64_t num_threads, int64_t isa) {
  splatdd::ConvNormActPoolBackwardArgs b;
  b.fwd = make_conv_nap_args(x, conv_weight, conv_bias, Cin, Hin, Win, pad, weight, bias, N, C,
                             eps, relu, pool, 0, num_threads, isa);
  require(N == 0 || (mean != 0 && rstd != 0 && grad_out != 0 && grad_conv_weight != 0 &&
                     grad_weight != 0 && grad_bias != 0),
          "mean, rstd, grad_out, grad_conv_weight, grad_weight and grad_bias must not be null");
  b.fwd.nap.mean = reinterpret_cast<float*>(mean);
  b.fwd.nap.rstd = reinterpret_cast<float*>(rstd);
  b.grad_out = reinterpret_cast<const float*>(grad_out);
  b.grad_x = reinterpret_cast<float*>(grad_x);
  b.grad_conv_weight = reinterpret_cast<float*>(grad_conv_weight);
  b.grad_conv_bias = reinterpret_cast<float*>(grad_conv_bias);
  b.grad_weight = reinterpret_cast<float*>(grad_weight);
  b.grad_bias = reinterpret_cast<float*>(grad_bias);
  py::gil_scoped_release release;
  splatdd::conv_norm_act_pool_backward_cpu(b);
}

void norm_act_pool_backward(uintptr_t x, uintptr_t weight, uintptr_t bias, int64_t N, int64_t C,
                            int64_t H, int64_t W, double eps, bool relu, bool pool,
                            uintptr_t mean, uintptr_t rstd, uintptr_t grad_out, uintptr_t grad_x,
                            uintptr_t grad_weight, uintptr_t grad_bias, int64_t num_threads,
                            int64_t isa) {
  splatdd::NormActPoolBackwardArgs b;
  b.fwd = make_nap_args(x, splatdd::kFloat32, weight, bias, N, C, H, W, eps, relu, pool, 0, mean,
                        rstd, num_threads, isa);             // the backward writes no `out`
  require(N == 0 || (mean != 0 && rstd != 0 && grad_out != 0 && grad_x != 0 && grad_weight != 0 &&
                     grad_bias != 0),
          "mean, rstd, grad_out, grad_x, grad_weight and grad_bias must not be null");
  b.grad_out = reinterpret_cast<const float*>(grad_out);
  b.grad_x = reinterpret_cast<float*>(grad_x);
  b.grad_weight = reinterpret_cast<float*>(grad_weight);
  b.grad_bias = reinterpret_cast<float*>(grad_bias);
  py::gil_scoped_release release;
  splatdd::norm_act_pool_backward_cpu(b);
}

void winograd_input_transform(uintptr_t x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t pad,
                              int64_t rows, uintptr_t v, int64_t num_threads, int64_t isa) {
  require(isa >= 0 && isa <= 3, "isa must be 0 (best), 1 (generic), 2 (avx2) or 3 (avx512)");
  require(num_threads >= 0 && num_threads <= 4096, "num_threads must be in 0..4096");
  require(N == 0 || (x != 0 && v != 0), "x and v must not be null");
  const splatdd::WinogradInputArgs a{
      reinterpret_cast<const float*>(x), N, C, H, W, pad, rows, reinterpret_cast<float*>(v),
      static_cast<int>(num_threads), static_cast<int>(isa)};
  py::gil_scoped_release release;
  splatdd::winograd_input_transform_cpu(a);
}

void winograd_output_transform(uintptr_t m, int64_t rows, uintptr_t bias, int64_t N, int64_t K,
                               int64_t Ho, int64_t Wo, uintptr_t y, int64_t num_threads,
                               int64_t isa) {
  require(isa >= 0 && isa <= 3, "isa must be 0 (best), 1 (generic), 2 (avx2) or 3 (avx512)");
  require(num_threads >= 0 && num_threads <= 4096, "num_threads must be in 0..4096");
  require(N == 0 || (m != 0 && y != 0), "m and y must not be null");
  const splatdd::WinogradOutputArgs a{
      reinterpret_cast<const float*>(m), rows, reinterpret_cast<const float*>(bias), N, K, Ho,
      Wo, reinterpret_cast<float*>(y), static_cast<int>(num_threads), static_cast<int>(isa)};
  py::gil_scoped_release release;
  splatdd::winograd_output_transform_cpu(a);
}

void winograd_grad_transform(uintptr_t dy, int64_t N, int64_t K, int64_t Ho, int64_t Wo,
                             int64_t rows, uintptr_t dm, int64_t num_threads, int64_t isa) {
  require(isa >= 0 && isa <= 3, "isa must be 0 (best), 1 (generic), 2 (avx2) or 3 (avx512)");
  require(num_threads >= 0 && num_threads <= 4096, "num_threads must be in 0..4096");
  require(N == 0 || (dy != 0 && dm != 0), "dy and dm must not be null");
  const splatdd::WinogradGradArgs a{
      reinterpret_cast<const float*>(dy), N, K, Ho, Wo, rows, reinterpret_cast<float*>(dm),
      static_cast<int>(num_threads), static_cast<int>(isa)};
  py::gil_scoped_release release;
  splatdd::winograd_grad_transform_cpu(a);
}

void winograd_filter_grad_transform(uintptr_t du, int64_t pairs, uintptr_t g,
                                    int64_t num_threads, int64_t isa) {
  require(isa >= 0 && isa <= 3, "isa must be 0 (best), 1 (generic), 2 (avx2) or 3 (avx512)");
  require(num_threads >= 0 && num_threads <= 4096, "num_threads must be in 0..4096");
  require(pairs >= 0, "pairs must be >= 0");
  require(pairs == 0 || (du != 0 && g != 0), "du and g must not be null");
  const splatdd::WinogradFilterGradArgs a{reinterpret_cast<const float*>(du), pairs,
                                           reinterpret_cast<float*>(g),
                                           static_cast<int>(num_threads), static_cast<int>(isa)};
  py::gil_scoped_release release;
  splatdd::winograd_filter_grad_cpu(a);
}

// layer_ptrs: per block conv_w, conv_b, norm_w, norm_b, u, uf, g_conv_w, g_conv_b, g_norm_w,
// g_norm_b (0 for null). workspace 0: only returns the floats of workspace needed.
int64_t convnet_step(uintptr_t x, uintptr_t labels, int64_t B, int64_t Cin, int64_t H, int64_t W,
                     int64_t classes, double loss_scale, int64_t chunk, int64_t tiles_per_chunk,
                     int64_t width, bool pool, const std::vector<uintptr_t>& layer_ptrs,
                     const std::vector<double>& layer_eps, const std::vector<int64_t>& layer_pad,
                     uintptr_t fc_w, uintptr_t fc_b, uintptr_t g_fc_w, uintptr_t g_fc_b,
                     uintptr_t loss, uintptr_t workspace, int64_t workspace_floats,
                     uintptr_t gemm, int64_t num_threads) {
  require(num_threads >= 0 && num_threads <= 4096, "num_threads must be in 0..4096");
  const size_t depth = layer_pad.size();
  require(depth >= 1 && layer_ptrs.size() == 10 * depth && layer_eps.size() == depth,
          "layer_ptrs, layer_eps and layer_pad must hold 10, 1 and 1 entries per block");
  std::vector<splatdd::ConvNetLayer> layers(depth);
  for (size_t l = 0; l < depth; ++l) {
    const uintptr_t* q = layer_ptrs.data() + 10 * l;
    splatdd::ConvNetLayer& L = layers[l];
    L.conv_w = reinterpret_cast<const float*>(q[0]);
    L.conv_b = reinterpret_cast<const float*>(q[1]);
    L.norm_w = reinterpret_cast<const float*>(q[2]);
    L.norm_b = reinterpret_cast<const float*>(q[3]);
    L.u = reinterpret_cast<const float*>(q[4]);
    L.uf = reinterpret_cast<const float*>(q[5]);
    L.g_conv_w = reinterpret_cast<float*>(q[6]);
    L.g_conv_b = reinterpret_cast<float*>(q[7]);
    L.g_norm_w = reinterpret_cast<float*>(q[8]);
    L.g_norm_b = reinterpret_cast<float*>(q[9]);
    L.eps = static_cast<float>(layer_eps[l]);
    L.pad = layer_pad[l];
  }
  splatdd::ConvNetStepArgs a;
  a.x = reinterpret_cast<const float*>(x);
  a.labels = reinterpret_cast<const int64_t*>(labels);
  a.B = B;
  a.Cin = Cin;
  a.H = H;
  a.W = W;
  a.classes = classes;
  a.loss_scale = static_cast<float>(loss_scale);
  a.chunk = chunk;
  a.tiles_per_chunk = tiles_per_chunk;
  a.depth = static_cast<int64_t>(depth);
  a.width = width;
  a.pool = pool;
  a.layers = layers.data();
  a.fc_w = reinterpret_cast<const float*>(fc_w);
  a.fc_b = reinterpret_cast<const float*>(fc_b);
  a.g_fc_w = reinterpret_cast<float*>(g_fc_w);
  a.g_fc_b = reinterpret_cast<float*>(g_fc_b);
  a.loss = reinterpret_cast<float*>(loss);
  a.workspace = reinterpret_cast<float*>(workspace);
  a.workspace_floats = workspace_floats;
  a.gemm = reinterpret_cast<splatdd::SgemmBatchFn>(gemm);
  a.num_threads = static_cast<int>(num_threads);
  const int64_t need = splatdd::convnet_step_workspace_floats(a);
  if (workspace == 0) return need;
  py::gil_scoped_release release;
  splatdd::convnet_step_cpu(a);
  return need;
}

std::vector<std::string> backends() {
  std::vector<std::string> b{"cpu"};
#ifdef SPLATDD_WITH_CUDA
  b.emplace_back("cuda");
#endif
  return b;
}

int cuda_device_count() {
#ifdef SPLATDD_WITH_CUDA
  return splatdd::cuda::device_count();
#else
  return 0;
#endif
}

// The worker pool's contract, testable from Python: n workers each count themselves; worker
// `throw_worker` (-1: none) throws after counting. Returns the count (every worker ran and was
// joined), or raises the worker's RuntimeError on the calling thread after all were joined.
int run_parallel_probe(int n, int throw_worker) {
  if (n < 1 || n > 1024) throw std::invalid_argument("n must be in 1..1024, got " + std::to_string(n));
  std::atomic<int> ran{0};
  splatdd::run_parallel(n, [&](int t) {
    ran.fetch_add(1);
    if (t == throw_worker) throw std::runtime_error("worker " + std::to_string(t) + " failed");
  });
  return ran.load();
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "splatdd compiled renderer backends (raw-pointer interface; use splatdd.render)";

#ifdef SPLATDD_WITH_CUDA
  py::class_<CudaBinning>(m, "CudaBinning",
                          "Opaque CUDA binning state kept from the forward for the backward.");
#endif

  m.def("render_batch", &render_batch, py::arg("device"), py::arg("params"), py::arg("dtype"),
        py::arg("offsets"), py::arg("B"), py::arg("total"), py::arg("C"), py::arg("H"),
        py::arg("W"), py::arg("ssaa"), py::arg("prefilter"), py::arg("out"),
        py::arg("num_threads") = 0, py::arg("stream") = 0,
        "Render a batch into `out` (B, C, H, W). Addresses are ints. Returns the CUDA binning "
        "state (for render_batch_backward) or None on CPU.");
  m.def("render_batch_backward", &render_batch_backward, py::arg("device"), py::arg("params"),
        py::arg("dtype"), py::arg("offsets"), py::arg("B"), py::arg("total"), py::arg("C"),
        py::arg("H"), py::arg("W"), py::arg("ssaa"), py::arg("prefilter"), py::arg("grad_out"),
        py::arg("grad_params"), py::arg("num_threads") = 0, py::arg("stream") = 0,
        py::arg("state") = py::none(),
        "Add dL/dparams to the zero-initialised `grad_params` (total, 6 + C).");
  m.def("norm_act_pool_forward", &norm_act_pool_forward, py::arg("x"), py::arg("dtype"),
        py::arg("weight"), py::arg("bias"), py::arg("N"), py::arg("C"), py::arg("H"), py::arg("W"),
        py::arg("eps"), py::arg("relu"), py::arg("pool"), py::arg("out"), py::arg("mean"),
        py::arg("rstd"), py::arg("num_threads") = 0, py::arg("isa") = 0,
        "CPU: out = avgpool2x2(relu(instance_norm(x) * weight + bias)) (pool/relu optional); "
        "mean/rstd (N, C) float32 are written when non-zero. Addresses are ints; use "
        "splatdd.norm_act_pool.");
  m.def("conv_norm_act_pool_forward", &conv_norm_act_pool_forward, py::arg("x"),
        py::arg("conv_weight"), py::arg("conv_bias"), py::arg("Cin"), py::arg("Hin"),
        py::arg("Win"), py::arg("pad"), py::arg("weight"), py::arg("bias"), py::arg("N"),
        py::arg("C"), py::arg("eps"), py::arg("relu"), py::arg("pool"), py::arg("out"),
        py::arg("mean"), py::arg("rstd"), py::arg("num_threads") = 0, py::arg("isa") = 0,
        "CPU float32: out = avgpool2x2(relu(instance_norm(conv3x3(x, conv_weight, conv_bias, "
        "padding=pad)) * weight + bias)) without storing the convolution's output; mean/rstd "
        "(N, C) written when non-zero. Addresses are ints; use "
        "splatdd.norm_act_pool.conv_instance_norm_act_pool.");
  m.def("conv_norm_act_pool_backward", &conv_norm_act_pool_backward, py::arg("x"),
        py::arg("conv_weight"), py::arg("conv_bias"), py::arg("Cin"), py::arg("Hin"),
        py::arg("Win"), py::arg("pad"), py::arg("weight"), py::arg("bias"), py::arg("N"),
        py::arg("C"), py::arg("eps"), py::arg("relu"), py::arg("pool"), py::arg("mean"),
        py::arg("rstd"), py::arg("grad_out"), py::arg("grad_x"), py::arg("grad_conv_weight"),
        py::arg("grad_conv_bias"), py::arg("grad_weight"), py::arg("grad_bias"),
        py::arg("num_threads") = 0, py::arg("isa") = 0,
        "CPU float32 backward of conv_norm_act_pool_forward: grad_x (or 0), per-sample partial "
        "grad_conv_weight (N, C, Cin, 3, 3), grad_conv_bias (N, C) (or 0), grad_weight and "
        "grad_bias (N, C).");
  m.def("norm_act_pool_backward", &norm_act_pool_backward, py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("N"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("eps"),
        py::arg("relu"), py::arg("pool"), py::arg("mean"), py::arg("rstd"), py::arg("grad_out"),
        py::arg("grad_x"), py::arg("grad_weight"), py::arg("grad_bias"),
        py::arg("num_threads") = 0, py::arg("isa") = 0,
        "CPU, float32: grad_x (N, C, H, W) and per-sample grad_weight / grad_bias (N, C).");
  m.def("winograd_input_transform", &winograd_input_transform, py::arg("x"), py::arg("N"),
        py::arg("C"), py::arg("H"), py::arg("W"), py::arg("pad"), py::arg("rows"), py::arg("v"),
        py::arg("num_threads") = 0, py::arg("isa") = 0,
        "CPU, float32: Winograd F(4x4, 3x3) input transform of x (N, C, H, W) into v (36, C, rows), "
        "rows >= N * T (T tiles per image) a multiple of 16; isa 0 best, 1 generic, 2 avx2, "
        "3 avx512. "
        "Addresses are ints; use splatdd.winograd.");
  m.def("winograd_output_transform", &winograd_output_transform, py::arg("m"), py::arg("rows"),
        py::arg("bias"), py::arg("N"), py::arg("K"), py::arg("Ho"), py::arg("Wo"), py::arg("y"),
        py::arg("num_threads") = 0, py::arg("isa") = 0,
        "CPU, float32: Winograd F(4x4, 3x3) output transform of m (36, K, rows) into y (N, K, Ho, "
        "Wo) plus bias (K) when non-zero. Addresses are ints; use splatdd.winograd.");
  m.def("cpu_isas", &splatdd::cpu_isas,
        "Bit i set when the CPU ops' isa code i runs here (1 generic, 2 AVX2, 3 AVX-512).");
  m.def("winograd_grad_transform", &winograd_grad_transform, py::arg("dy"), py::arg("N"),
        py::arg("K"), py::arg("Ho"), py::arg("Wo"), py::arg("rows"), py::arg("dm"),
        py::arg("num_threads") = 0, py::arg("isa") = 0,
        "CPU float32 Winograd F(4x4, 3x3) output transform's adjoint: dm (36, K, rows) = A dy A^T "
        "of every 4x4 tile of dy (N, K, Ho, Wo), for the filters' gradient. Addresses are ints; "
        "use splatdd.winograd.");
  m.def("winograd_filter_grad_transform", &winograd_filter_grad_transform, py::arg("du"),
        py::arg("pairs"), py::arg("g"), py::arg("num_threads") = 0, py::arg("isa") = 0,
        "CPU float32 Winograd F(4x4, 3x3) filter transform's adjoint: g (pairs, 3, 3) = G^T dU G "
        "for dU (36, pairs). Addresses are ints; use splatdd.winograd.");
  m.def("convnet_step", &convnet_step, py::arg("x"), py::arg("labels"), py::arg("B"),
        py::arg("Cin"), py::arg("H"), py::arg("W"), py::arg("classes"), py::arg("loss_scale"),
        py::arg("chunk"), py::arg("tiles_per_chunk"), py::arg("width"), py::arg("pool"),
        py::arg("layer_ptrs"), py::arg("layer_eps"), py::arg("layer_pad"), py::arg("fc_w"),
        py::arg("fc_b"), py::arg("g_fc_w"), py::arg("g_fc_b"), py::arg("loss"),
        py::arg("workspace"), py::arg("workspace_floats"), py::arg("gemm"),
        py::arg("num_threads") = 1,
        "CPU float32 loss gradient of a ConvNet-D batch (instance norm, ReLU, average pool), "
        "added to the gradient buffers; returns the workspace floats needed (workspace 0: only "
        "that). Addresses are ints; use splatdd.convnet_step.");
  m.def("winograd_isas", &splatdd::winograd_isas,
        "Bit mask of the instruction sets the Winograd transforms can use here (bit 1 generic, "
        "bit 2 avx2, bit 3 avx512).");
  m.def("winograd_default_isa", &splatdd::winograd_default_isa,
        "The instruction set the Winograd transforms use by default: 1 generic, 2 avx2, 3 avx512.");
  m.def("_run_parallel_probe", &run_parallel_probe, py::arg("n"), py::arg("throw_worker") = -1,
        "Test hook for the CPU worker pool: n workers count themselves, worker throw_worker "
        "throws; returns the count or raises that worker's error after joining every worker.");
  m.def("backends", &backends, "Compiled backends: [\"cpu\"] or [\"cpu\", \"cuda\"].");
  m.def("cpu_kernel_name", &splatdd::cpu_kernel_name,
        "The CPU backend's inner loops on this machine: \"avx512\", \"avx2\" or \"generic\" "
        "(\"simple\" with SPLATDD_CPU_KERNEL=simple; SPLATDD_CPU_KERNEL=avx2|generic forces those).");
  m.def("cuda_device_count", &cuda_device_count,
        "Visible CUDA devices (0 without the CUDA backend, a driver or a device).");
  m.attr("MAX_CHANNELS") = splatdd::kMaxChannels;
  m.attr("CUTOFF_RADIUS") = splatdd::kCutoffRadius;
  m.attr("TAIL_VALUE") = splatdd::kTailValue;
}
