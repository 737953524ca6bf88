// winograd.h -- Winograd F(4x4, 3x3) transforms for a 3x3, stride-1 convolution on the CPU
// (float32): the input and output transforms around a batched GEMM done by the caller, and the
// output transform's adjoint and the filter transform's adjoint for the filters' gradient
// (src/splatdd/winograd.py, torch.bmm).
//
// Points 0, +-1, +-2, infinity (Lavin & Gray 2015): for a 6x6 input patch d and a 3x3 filter g the
// 4x4 output tile is A^T [(G g G^T) . (B^T d B)] A. With T = ceil(Ho/4) * ceil(Wo/4) tiles per
// image (Ho = H + 2 pad - 2, Wo = W + 2 pad - 2), P = N * T tiles in all, tile
// p = n*T + ty*tw + tx, and R >= P columns (a multiple of 16), the layouts are
//   V (36, C, R)   input transform, V[xi, c, p] = (B^T d B)[xi / 6, xi % 6]; zero for p >= P
//   U (36, K, C)   weight transform (Python: G g G^T, one float32 GEMM with G kron G)
//   M (36, K, R)   M = U @ V, one (K x C) @ (C x R) GEMM per transform point xi
//   y (N, K, Ho, Wo) = A^T m A + bias, only the valid pixels of the edge tiles written.
// Plain argument structs of raw pointers and sizes (nvdiffrast style; aggregates, brace-initialised
// in field order by their callers); Python checks and allocates.
// Deterministic: every output value is computed by one task in a fixed order, whatever the thread
// count.
#pragma once

#include <cstdint>

namespace splatdd {

struct WinogradInputArgs {
  const float* x = nullptr;  // (N, C, H, W) contiguous
  int64_t N = 0, C = 0, H = 0, W = 0;
  int64_t pad = 0;           // zero padding on every side
  int64_t rows = 0;          // R >= N * T, a multiple of 16
  float* v = nullptr;        // (36, C, R)
  int num_threads = 0;       // 0 = hardware concurrency
  int isa = 0;               // 0 best available, 1 baseline, 2 AVX2, 3 AVX-512 (tests)
};

struct WinogradOutputArgs {
  const float* m = nullptr;     // (36, K, R)
  int64_t rows = 0;             // R >= N * T, a multiple of 16
  const float* bias = nullptr;  // (K) or null (zeros)
  int64_t N = 0, K = 0, Ho = 0, Wo = 0;
  float* y = nullptr;           // (N, K, Ho, Wo) contiguous
  int num_threads = 0;
  int isa = 0;                  // as WinogradInputArgs::isa
};

// The output transform's adjoint, for the filters' gradient: dM = A dY A^T of every 4x4 tile of dy
// (pixels outside the Ho x Wo plane read as zero; columns p >= N * T of dm are zero). Then
// dU = dM @ V^T per transform point, and d(filter) = G^T dU G (Python).
struct WinogradGradArgs {
  const float* dy = nullptr;  // (N, K, Ho, Wo) contiguous: the output's gradient
  int64_t N = 0, K = 0, Ho = 0, Wo = 0;
  int64_t rows = 0;           // R >= N * T, a multiple of 16
  float* dm = nullptr;        // (36, K, R)
  int num_threads = 0;
  int isa = 0;                // as WinogradInputArgs::isa
};

// The filters' gradient from its transform: g (K, C, 3, 3) = G^T dU G per (output, input) channel
// pair, dU (36, K, C) from the GEMMs dU = dM @ V^T (the filter transform's adjoint).
struct WinogradFilterGradArgs {
  const float* du = nullptr;  // (36, pairs) contiguous, pairs = K * C
  int64_t pairs = 0;
  float* g = nullptr;         // (pairs, 9) contiguous
  int num_threads = 0;
  int isa = 0;                // as WinogradInputArgs::isa
};

// The instruction sets this CPU runs the transforms with (1 baseline, 2 AVX2, 3 AVX-512), and the
// one used by default (isa 0).
int winograd_isas();  // bit i set: isa i available
int winograd_default_isa();

// Throw std::invalid_argument on inconsistent arguments (never read or write out of range).
void winograd_input_transform_cpu(const WinogradInputArgs& a);
void winograd_output_transform_cpu(const WinogradOutputArgs& a);
void winograd_grad_transform_cpu(const WinogradGradArgs& a);
void winograd_filter_grad_cpu(const WinogradFilterGradArgs& a);

}  // namespace splatdd
