// render_params.h -- the plain argument structs shared by the CPU and CUDA backends.
//
// Framework-neutral (nvdiffrast style): raw pointers and sizes only. Python (src/splatdd/render.py)
// checks dtype, device, shape and contiguity, allocates every buffer with torch and passes the
// addresses as integers through cpp/bindings.cpp.
#pragma once

#include <cstdint>

namespace splatdd {

struct RenderArgs {
  const void* params = nullptr;    // (total, 6 + C) contiguous, dtype `dtype` (DType in splat_math.h)
  int dtype = 0;
  int64_t total = 0;               // number of Gaussians over the whole batch
  int C = 3;                       // channels, 1..kMaxChannels
  const int64_t* offsets = nullptr;  // (B + 1) prefix sums: image b owns Gaussians [offsets[b], offsets[b+1])
                                     // (host memory for the CPU backend, device memory for CUDA)
  int B = 0;
  int H = 0, W = 0;                // output resolution
  int ssaa = 2;                    // 1, 2 or 4 samples per pixel side
  bool prefilter = true;
  void* out = nullptr;             // (B, C, H, W) contiguous: double for fp64 params, float otherwise
  int num_threads = 0;             // CPU only; 0 = hardware concurrency
};

struct BackwardArgs {
  RenderArgs fwd;                  // the forward's arguments (out unused)
  const void* grad_out = nullptr;  // (B, C, H, W), same dtype as `out`
  void* grad_params = nullptr;     // (total, 6 + C), double for fp64 params, float otherwise;
                                   // ZERO-INITIALISED by the caller
};

}  // namespace splatdd
