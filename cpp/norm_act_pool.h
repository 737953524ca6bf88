// norm_act_pool.h -- fused instance norm -> ReLU -> 2x2 average pool, the block of ConvNet-D.
//
// One call normalises every (sample, channel) plane of x over its H x W values (GroupNorm(C, C):
// biased variance, eps inside the square root), applies the per-channel affine weight and bias,
// optionally ReLU, and optionally the 2x2 stride-2 average pool (floor: an odd last row/column is
// dropped, as nn.AvgPool2d(2, 2) does). Forward for float32 and bfloat16 x (bfloat16 out; the
// arithmetic is fp32), backward for float32. Plain argument structs of raw pointers and sizes
// (nvdiffrast style); Python (src/splatdd/norm_act_pool.py) checks and allocates everything.
// Deterministic: each plane is computed by one task in a fixed order, whatever the thread count.
#pragma once

#include <cstdint>

namespace splatdd {

struct NormActPoolArgs {
  const void* x = nullptr;         // (N, C, H, W) contiguous, dtype `dtype`
  int dtype = 0;                   // 0 float32, 1 bfloat16 (the renderer's codes)
  const float* weight = nullptr;   // (C) or null (ones)
  const float* bias = nullptr;     // (C) or null (zeros)
  int64_t N = 0, C = 0, H = 0, W = 0;
  float eps = 1e-5f;
  bool relu = true;
  bool pool = true;
  void* out = nullptr;             // (N, C, H/2, W/2) with pool, else (N, C, H, W); dtype `dtype`
  float* mean = nullptr;           // (N, C) or null: the planes' means (saved for backward)
  float* rstd = nullptr;           // (N, C) or null: 1 / sqrt(var + eps)
  int num_threads = 0;             // 0 = hardware concurrency
  int isa = 0;                     // 0 best available, 1 generic, 2 AVX2, 3 AVX-512 (cpu_isa.h)
};

struct NormActPoolBackwardArgs {
  NormActPoolArgs fwd;             // the forward's arguments (out unused); float32 x, mean, rstd
  const float* grad_out = nullptr;  // the shape of fwd.out
  float* grad_x = nullptr;          // (N, C, H, W)
  float* grad_weight = nullptr;     // (N, C): per-sample partial sums (the caller reduces over N)
  float* grad_bias = nullptr;       // (N, C)
};

// The first block of a ConvNet on few input channels, fused: a 3x3 stride-1 convolution of
// x (N, Cin, Hin, Win) with zero padding `pad` (Cin small: the image's channels), then the block
// above, without ever storing the convolution's (N, C, H, W) output (H = Hin + 2 pad - 2, likewise
// W): each plane is computed into scratch, normalised, activated and pooled. Forward only, float32.
struct ConvNormActPoolArgs {
  NormActPoolArgs nap;              // C, H, W of the convolution's output; nap.x unused; dtype 0
  const float* conv_x = nullptr;    // (N, Cin, Hin, Win) contiguous
  const float* conv_weight = nullptr;  // (C, Cin, 3, 3) contiguous
  const float* conv_bias = nullptr;    // (C) or null
  int64_t Cin = 0, Hin = 0, Win = 0, pad = 0;
};

// Its first-order backward (the convolution's output is recomputed, never stored): gradients of
// the input, the convolution's weight and bias and the norm's affine. Float32.
struct ConvNormActPoolBackwardArgs {
  ConvNormActPoolArgs fwd;          // the forward's arguments (out unused); nap.mean, nap.rstd set
  const float* grad_out = nullptr;  // the shape of the forward's out
  float* grad_x = nullptr;          // (N, Cin, Hin, Win) or null (not wanted)
  float* grad_conv_weight = nullptr;  // (N, C, Cin, 3, 3): per-sample partial sums
  float* grad_conv_bias = nullptr;    // (N, C) or null
  float* grad_weight = nullptr;       // (N, C)
  float* grad_bias = nullptr;         // (N, C)
};

// Throws std::invalid_argument on inconsistent arguments (never reads or writes out of range).
void norm_act_pool_forward_cpu(const NormActPoolArgs& a);
void norm_act_pool_backward_cpu(const NormActPoolBackwardArgs& a);
void conv_norm_act_pool_forward_cpu(const ConvNormActPoolArgs& a);
void conv_norm_act_pool_backward_cpu(const ConvNormActPoolBackwardArgs& a);

}  // namespace splatdd
