// convnet_step.h -- the loss gradient of a ConvNet-D training batch on the CPU in one call: every
// pass's forward, softmax cross-entropy and first-order backward, float32, no autograd graph.
//
// The network is ConvNet-D with instance norm, ReLU and 2x2 average pooling (or none) after each
// 3x3 convolution: block 0 on the image's few channels runs fused (norm_act_pool.h, its
// convolution recomputed in the backward), blocks 1.. are Winograd F(4x4, 3x3) convolutions
// (winograd.h; the batched GEMMs by the caller's cblas_sgemm_batch, else a plain loop) followed by
// the fused norm block; then the linear classifier. The batch goes through in passes of `chunk`
// images (forward and backward of one pass back to back, so its activations stay in cache), each
// Winograd layer in chunks of about `tiles_per_chunk` tiles with every chunk's input transform
// kept for the filters' gradient. Gradients are added (+=) to the caller's buffers: this is the
// gradient of loss_scale * (sum of the per-image cross-entropies), accumulated like autograd's.
// src/splatdd/convnet_step.py checks and allocates everything and holds the PyTorch twin (the
// modules under autograd) that the tests compare with. Plain argument structs of raw pointers and
// sizes (nvdiffrast style). Deterministic for a given thread count and GEMM.
#pragma once

#include <cstdint>

namespace splatdd {

// MKL's cblas_sgemm_batch (LP64: 32-bit ints; the CBLAS enums as ints), found by Python in the
// torch build's BLAS; null: the plain loop.
using SgemmBatchFn = void (*)(int layout, const int* transa, const int* transb, const int* m,
                              const int* n, const int* k, const float* alpha, const float** a,
                              const int* lda, const float** b, const int* ldb, const float* beta,
                              float** c, const int* ldc, int group_count, const int* group_size);

struct ConvNetLayer {
  const float* conv_w = nullptr;  // (K, C_l, 3, 3): C_0 = the image's channels, C_l = K after
  const float* conv_b = nullptr;  // (K) or null
  const float* norm_w = nullptr;  // (K) or null (ones)
  const float* norm_b = nullptr;  // (K) or null (zeros)
  float eps = 1e-5f;
  int64_t pad = 1;                // the convolution's zero padding: block 0 any, blocks 1.. 0..2
  const float* u = nullptr;       // blocks 1..: (36, K, K) winograd_weight(conv_w)
  const float* uf = nullptr;      // blocks 1..: (36, K, K) the same of conv_w turned 180 degrees
                                  // (channels not swapped: the GEMM transposes each point's)
  float* g_conv_w = nullptr;      // gradients, added to: conv_w's shape
  float* g_conv_b = nullptr;      // (K); null when conv_b is
  float* g_norm_w = nullptr;      // (K); null when norm_w is
  float* g_norm_b = nullptr;      // (K); null when norm_b is
};

struct ConvNetStepArgs {
  const float* x = nullptr;        // (B, Cin, H, W) contiguous: the batch
  const int64_t* labels = nullptr;  // (B) class indices in [0, classes)
  int64_t B = 0, Cin = 0, H = 0, W = 0;
  int64_t classes = 0;
  float loss_scale = 1.f;          // the loss is loss_scale * sum of the images' cross-entropies
  int64_t chunk = 16;              // images per pass
  int64_t tiles_per_chunk = 256;   // Winograd tiles per GEMM (splatdd.winograd.TILES_PER_CHUNK)
  int64_t depth = 0, width = 0;    // blocks; K, every block's channels
  bool pool = true;                // 2x2 average pool after each block (floor), else none
  const ConvNetLayer* layers = nullptr;  // depth of them
  const float* fc_w = nullptr;     // (classes, F), F = K * (last block's output plane)
  const float* fc_b = nullptr;     // (classes) or null
  float* g_fc_w = nullptr;         // gradients, added to
  float* g_fc_b = nullptr;         // null when fc_b is
  float* loss = nullptr;           // out (or null): the loss above
  float* workspace = nullptr;      // convnet_step_workspace_floats(args) floats
  int64_t workspace_floats = 0;
  SgemmBatchFn gemm = nullptr;
  int num_threads = 1;             // the compiled kernels' workers (the GEMM: the BLAS's own)
};

// Floats of workspace the step needs (checks the shapes; throws std::invalid_argument).
int64_t convnet_step_workspace_floats(const ConvNetStepArgs& a);
// The step (throws std::invalid_argument on inconsistent arguments, before writing anything).
void convnet_step_cpu(const ConvNetStepArgs& a);

}  // namespace splatdd
