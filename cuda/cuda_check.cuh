// cuda_check.cuh -- error checking and stream-ordered scratch memory for the CUDA backend.
//
// Every CUDA runtime call of the backend goes through SPLATDD_CUDA_CHECK, which turns a failure into
// a std::runtime_error carrying the CUDA error name and string (never an abort: the bindings turn
// the exception into a Python RuntimeError). Kernel launches are checked with
// SPLATDD_CUDA_CHECK_LAUNCH (cudaGetLastError right after the launch).
//
// Scratch memory is stream-ordered (cudaMallocAsync / cudaFreeAsync on the caller's stream). On
// the rare device/driver without memory-pool support (cudaDevAttrMemoryPoolsSupported == 0, e.g.
// some vGPU set-ups) we fall back to cudaMalloc / cudaFree, which are correct but synchronising.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

namespace splatdd {
namespace cuda {
namespace detail {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* what, const char* file,
                                          int line) {
  // A failed runtime call also leaves its (non-sticky) code in the per-thread "last error" slot;
  // clear it so that the next unrelated cudaGetLastError (ours or PyTorch's launch checks) does
  // not report our failure a second time. Sticky errors (a faulted context) cannot be cleared and
  // keep being reported, as they must.
  (void)cudaGetLastError();
  throw std::runtime_error(std::string("splatdd CUDA backend: ") + cudaGetErrorName(err) + ": " +
                           cudaGetErrorString(err) + " (in `" + what + "` at " + file + ":" +
                           std::to_string(line) + ")");
}

}  // namespace detail
}  // namespace cuda
}  // namespace splatdd

#define SPLATDD_CUDA_CHECK(expr)                                                        \
  do {                                                                                  \
    const cudaError_t splatdd_err_ = (expr);                                            \
    if (splatdd_err_ != cudaSuccess)                                                    \
      ::splatdd::cuda::detail::throw_cuda_error(splatdd_err_, #expr, __FILE__, __LINE__); \
  } while (0)

// Use right after a <<<...>>> launch.
#define SPLATDD_CUDA_CHECK_LAUNCH(name) \
  ::splatdd::cuda::detail::check_launch(name, __FILE__, __LINE__)

namespace splatdd {
namespace cuda {
namespace detail {

inline void check_launch(const char* name, const char* file, int line) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw_cuda_error(err, name, file, line);
}

// Whether `device` supports stream-ordered allocation (cached; races are benign: every thread
// computes the same answer).
inline bool mempools_supported(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};  // 0 unknown, 1 yes, 2 no
  if (device < 0 || device >= kMaxDevices) return false;
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    int attr = 0;
    if (cudaDeviceGetAttribute(&attr, cudaDevAttrMemoryPoolsSupported, device) != cudaSuccess) {
      (void)cudaGetLastError();
      attr = 0;
    }
    v = attr ? 1 : 2;
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v == 1;
}

inline int current_device() {
  int dev = 0;
  SPLATDD_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

// Stream-ordered allocation of `bytes` on the current device; nullptr for 0 bytes.
inline void* device_alloc(size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return nullptr;
  void* p = nullptr;
  if (mempools_supported(current_device())) {
    SPLATDD_CUDA_CHECK(cudaMallocAsync(&p, bytes, stream));
  } else {
    SPLATDD_CUDA_CHECK(cudaMalloc(&p, bytes));
  }
  return p;
}

// Stream-ordered free; never throws (used from destructors and free_binning). If the async free
// fails (for example the stream was destroyed meanwhile) we fall back to cudaFree, which
// synchronises the device and is always valid for cudaMallocAsync memory. Errors at interpreter
// shut-down (cudaErrorCudartUnloading) are ignored.
inline void device_free(void* p, cudaStream_t stream) noexcept {
  if (p == nullptr) return;
  int dev = 0;
  bool pools = false;
  if (cudaGetDevice(&dev) == cudaSuccess) pools = mempools_supported(dev);
  cudaError_t err = pools ? cudaFreeAsync(p, stream) : cudaFree(p);
  if (err != cudaSuccess && pools) err = cudaFree(p);
  if (err != cudaSuccess) (void)cudaGetLastError();
}

// Owning, move-only, stream-ordered scratch buffer (freed on its stream when it goes out of scope,
// including when an exception unwinds the host function that enqueued kernels using it: the free
// is ordered after them on the stream).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(size_t bytes, cudaStream_t stream) : ptr_(device_alloc(bytes, stream)), stream_(stream) {}
  ~DeviceBuffer() { device_free(ptr_, stream_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), stream_(o.stream_) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      device_free(ptr_, stream_);
      ptr_ = std::exchange(o.ptr_, nullptr);
      stream_ = o.stream_;
    }
    return *this;
  }
  template <typename U>
  U* as() const { return static_cast<U*>(ptr_); }
  void* get() const { return ptr_; }
  // Gives up ownership (the caller frees it).
  void* release() { return std::exchange(ptr_, nullptr); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

// Grid size for a grid-stride loop over n items with `threads` per block.
inline unsigned int grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

}  // namespace detail
}  // namespace cuda
}  // namespace splatdd
