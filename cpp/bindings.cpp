// bindings.cpp -- the only pybind11 file: module splatdd._C.
//
// The module never links libtorch. Python (src/splatdd/render.py) checks dtypes, devices, shapes
// and contiguity, allocates every buffer with torch and passes raw addresses as integers; this file
// checks the integer arguments (a bad one raises ValueError, never crashes), releases the GIL and
// calls the CPU backend or, when compiled with SPLATDD_WITH_CUDA, the CUDA backend.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "render_cpu.h"
#include "render_params.h"
#include "splat_math.h"

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
