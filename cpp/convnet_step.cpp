// convnet_step.cpp -- a ConvNet-D training batch's loss gradient in one call (see the header).
//
// Only orchestration lives here: the blocks are norm_act_pool.h's and winograd.h's kernels, the
// GEMMs the caller's BLAS. What this saves over the same kernels driven from Python under autograd
// is the framework's per-op cost (dispatch, tensor objects, graph nodes, gradient accumulation),
// which was about a quarter of an evaluation epoch of 110 images in passes of 16.
#include "convnet_step.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <utility>
#include <vector>

#include "norm_act_pool.h"
#include "winograd.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace splatdd {

namespace {

void check(bool ok, const char* msg) {
  if (!ok) throw std::invalid_argument(msg);
}

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // the CBLAS enums
constexpr int64_t kMaxSide = int64_t{1} << 16;
constexpr int64_t kMaxFloats = int64_t{1} << 40;

int64_t aligned(int64_t floats) { return (floats + 15) / 16 * 16 + 16; }  // 64 B, with slack
int64_t rows_for(int64_t n, int64_t tiles) { return (n * tiles + 15) / 16 * 16; }
int64_t tiles_of(int64_t h, int64_t w) { return ((h + 3) / 4) * ((w + 3) / 4); }

// count GEMMs c[i] = op(a[i]) op(b[i]) + beta c[i], row-major (i-th operands `s*` floats apart):
// op(a) is m x k, op(b) k x n, c m x n.
struct Gemm {
  SgemmBatchFn fn;
  void operator()(int64_t count, bool ta, bool tb, int64_t m, int64_t n, int64_t k,
                  const float* a, int64_t lda, int64_t sa, const float* b, int64_t ldb,
                  int64_t sb, float* c, int64_t ldc, int64_t sc, float beta) const {
    if (fn != nullptr) {
      std::vector<const float*> ap(count), bp(count);
      std::vector<float*> cp(count);
      for (int64_t i = 0; i < count; ++i) {
        ap[i] = a + i * sa;
        bp[i] = b + i * sb;
        cp[i] = c + i * sc;
      }
      const int tra = ta ? kTrans : kNoTrans, trb = tb ? kTrans : kNoTrans;
      const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
      const int ldai = static_cast<int>(lda), ldbi = static_cast<int>(ldb);
      const int ldci = static_cast<int>(ldc), size = static_cast<int>(count);
      const float alpha = 1.f;
      fn(kRowMajor, &tra, &trb, &mi, &ni, &ki, &alpha, ap.data(), &ldai, bp.data(), &ldbi, &beta,
         cp.data(), &ldci, 1, &size);
      return;
    }
    // the plain loop (no BLAS): rows of c built from rows of b, k in order
    for (int64_t i = 0; i < count; ++i) {
      const float* A = a + i * sa;
      const float* Bm = b + i * sb;
      float* Cm = c + i * sc;
      for (int64_t r = 0; r < m; ++r) {
        float* crow = Cm + r * ldc;
        for (int64_t j = 0; j < n; ++j) crow[j] = beta == 0.f ? 0.f : beta * crow[j];
        for (int64_t q = 0; q < k; ++q) {
          const float av = ta ? A[q * lda + r] : A[r * lda + q];
          if (tb) {
            for (int64_t j = 0; j < n; ++j) crow[j] += av * Bm[j * ldb + q];
          } else {
            const float* brow = Bm + q * ldb;
            for (int64_t j = 0; j < n; ++j) crow[j] += av * brow[j];
          }
        }
      }
    }
  }
};

// Sizes and workspace offsets of one call (every check before anything is written).
struct Plan {
  int64_t P = 0, K = 0, D = 0, F = 0;
  std::vector<int64_t> hc, wc, ho, wo;       // per block: convolution output, block output
  std::vector<int64_t> T, per, rows, nch;    // blocks 1..: the forward's tiling
  std::vector<int64_t> Tg, perg, rowsg;      // blocks 1..: the input gradient's
  std::vector<int64_t> out, y, v, mean, rstd, du;  // offsets (du: the filters' gradient's
                                                    // transform, summed over the passes)
  int64_t m = 0, v2 = 0, gy = 0, gh0 = 0, gh1 = 0, part = 0, gw = 0, logits = 0;
  int64_t total = 0;
};

Plan make_plan(const ConvNetStepArgs& a) {
  check(a.B >= 0 && a.Cin >= 1 && a.H >= 1 && a.W >= 1, "B must be >= 0 and Cin, H, W >= 1");
  check(a.H <= kMaxSide && a.W <= kMaxSide, "H and W must be at most 65536");
  check(a.classes >= 1 && a.chunk >= 1 && a.tiles_per_chunk >= 1,
        "classes, chunk and tiles_per_chunk must be >= 1");
  check(a.depth >= 1 && a.width >= 1 && a.layers != nullptr, "depth, width >= 1 and layers");
  check(std::isfinite(a.loss_scale), "loss_scale must be finite");
  check(a.num_threads >= 0, "num_threads must be >= 0");
  Plan p;
  p.K = a.width;
  p.D = a.depth;
  p.P = std::min(a.chunk, std::max<int64_t>(a.B, 1));
  const int64_t K = p.K, P = p.P, D = p.D;
  p.hc.resize(D); p.wc.resize(D); p.ho.resize(D); p.wo.resize(D);
  p.T.assign(D, 0); p.per.assign(D, 0); p.rows.assign(D, 0); p.nch.assign(D, 0);
  p.Tg.assign(D, 0); p.perg.assign(D, 0); p.rowsg.assign(D, 0);
  int64_t h = a.H, w = a.W;
  for (int64_t l = 0; l < D; ++l) {
    const ConvNetLayer& L = a.layers[l];
    check(L.conv_w != nullptr && L.g_conv_w != nullptr, "null conv weight or its gradient");
    check((L.conv_b == nullptr) == (L.g_conv_b == nullptr) &&
              (L.norm_w == nullptr) == (L.g_norm_w == nullptr) &&
              (L.norm_b == nullptr) == (L.g_norm_b == nullptr),
          "a parameter and its gradient must both be given or both be null");
    check(std::isfinite(L.eps) && L.eps > 0.f, "eps must be a positive finite number");
    if (l == 0) {
      check(L.pad >= 0 && L.pad <= 16, "block 0's padding must be in 0..16");
    } else {
      check(L.pad >= 0 && L.pad <= 2, "blocks 1..'s padding must be in 0..2");
      check(L.u != nullptr && L.uf != nullptr, "null transformed filters");
    }
    p.hc[l] = h + 2 * L.pad - 2;
    p.wc[l] = w + 2 * L.pad - 2;
    check(p.hc[l] >= 1 && p.wc[l] >= 1, "a block's input is smaller than its 3x3 kernel");
    p.ho[l] = a.pool ? p.hc[l] / 2 : p.hc[l];
    p.wo[l] = a.pool ? p.wc[l] / 2 : p.wc[l];
    check(p.ho[l] >= 1 && p.wo[l] >= 1, "a block's output is empty (too deep for the image)");
    if (l > 0) {
      p.T[l] = tiles_of(p.hc[l], p.wc[l]);
      p.per[l] = std::clamp<int64_t>(a.tiles_per_chunk / p.T[l], 1, P);
      p.rows[l] = rows_for(p.per[l], p.T[l]);
      p.nch[l] = (P + p.per[l] - 1) / p.per[l];
      p.Tg[l] = tiles_of(h, w);
      p.perg[l] = std::clamp<int64_t>(a.tiles_per_chunk / p.Tg[l], 1, P);
      p.rowsg[l] = rows_for(p.perg[l], p.Tg[l]);
    }
    h = p.ho[l];
    w = p.wo[l];
  }
  p.F = K * h * w;
  check(a.fc_w != nullptr && a.g_fc_w != nullptr, "null classifier weight or its gradient");
  check((a.fc_b == nullptr) == (a.g_fc_b == nullptr),
        "the classifier's bias and its gradient must both be given or both be null");
  check(P * std::max(p.F, a.classes) < (int64_t{1} << 31) && 36 * K * K < (int64_t{1} << 31),
        "sizes too large for 32-bit BLAS");
  int64_t off = 0;
  auto take = [&](int64_t floats) {
    check(floats >= 0 && floats < kMaxFloats, "workspace too large");
    const int64_t at = off;
    off += aligned(floats);
    check(off < kMaxFloats, "workspace too large");
    return at;
  };
  int64_t max_rows = 0, max_rowsg = 0, max_y = 0, max_out = 0;
  for (int64_t l = 0; l < D; ++l) {
    p.out.push_back(take(P * K * p.ho[l] * p.wo[l]));
    p.mean.push_back(take(P * K));
    p.rstd.push_back(take(P * K));
    max_out = std::max(max_out, P * K * p.ho[l] * p.wo[l]);
    if (l == 0) {
      p.y.push_back(0);
      p.v.push_back(0);
      p.du.push_back(0);
      continue;
    }
    p.y.push_back(take(P * K * p.hc[l] * p.wc[l]));
    p.du.push_back(take(36 * K * K));
    p.v.push_back(take(p.nch[l] * 36 * K * p.rows[l]));
    max_rows = std::max(max_rows, p.rows[l]);
    max_rowsg = std::max(max_rowsg, p.rowsg[l]);
    max_y = std::max(max_y, P * K * p.hc[l] * p.wc[l]);
  }
  check(36 * K * std::max(max_rows, max_rowsg) < (int64_t{1} << 31),
        "sizes too large for 32-bit BLAS");
  p.m = take(36 * K * std::max(max_rows, max_rowsg));
  p.v2 = take(36 * K * max_rowsg);
  p.gy = take(max_y);
  p.gh0 = take(max_out);
  p.gh1 = take(max_out);
  p.part = take(P * K * (a.Cin * 9 + 4));
  p.gw = take(K * K * 9);
  p.logits = take(P * a.classes);
  p.total = off;
  return p;
}

// out[k] += sum over i < n of part[i * K + k] (in order, in double)
void add_sums(const float* part, int64_t n, int64_t K, float* out) {
  if (out == nullptr) return;
  for (int64_t k = 0; k < K; ++k) {
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += part[i * K + k];
    out[k] += static_cast<float>(s);
  }
}

NormActPoolArgs nap_args(const ConvNetStepArgs& a, const Plan& p, int64_t l, int64_t n,
                         float* ws) {
  const ConvNetLayer& L = a.layers[l];
  NormActPoolArgs na;
  na.x = l > 0 ? ws + p.y[l] : nullptr;
  na.dtype = 0;
  na.weight = L.norm_w;
  na.bias = L.norm_b;
  na.N = n;
  na.C = p.K;
  na.H = p.hc[l];
  na.W = p.wc[l];
  na.eps = L.eps;
  na.relu = true;
  na.pool = a.pool;
  na.out = ws + p.out[l];
  na.mean = ws + p.mean[l];
  na.rstd = ws + p.rstd[l];
  na.num_threads = a.num_threads;
  return na;
}

ConvNormActPoolArgs block0_args(const ConvNetStepArgs& a, const Plan& p, int64_t b0, int64_t n,
                                float* ws) {
  const ConvNetLayer& L = a.layers[0];
  ConvNormActPoolArgs c;
  c.nap = nap_args(a, p, 0, n, ws);
  c.conv_x = a.x + b0 * a.Cin * a.H * a.W;
  c.nap.x = c.conv_x;   // unused by the fused block, checked non-null
  c.conv_weight = L.conv_w;
  c.conv_bias = L.conv_b;
  c.Cin = a.Cin;
  c.Hin = a.H;
  c.Win = a.W;
  c.pad = L.pad;
  return c;
}

// A Winograd convolution of n images x (n, K, h, w) with padding pad into y (n, K, ho, wo):
// chunks of `per` images, each chunk's input transform at v + j * vstride (kept when vstride > 0,
// else every chunk reuses v); u (36, K, K) the filters' transform, each point's matrix used
// transposed when u_transposed.
void winograd_conv(const ConvNetStepArgs& a, const Gemm& gemm, const float* x, int64_t n,
                   int64_t K, int64_t h, int64_t w, int64_t pad, int64_t ho, int64_t wo,
                   int64_t tiles, int64_t per, const float* u, bool u_transposed,
                   const float* bias, float* v, int64_t vstride, float* m, float* y) {
  for (int64_t i0 = 0, j = 0; i0 < n; i0 += per, ++j) {
    const int64_t nc = std::min(per, n - i0), rows = rows_for(nc, tiles);
    float* vj = v + j * vstride;
    winograd_input_transform_cpu(
        WinogradInputArgs{x + i0 * K * h * w, nc, K, h, w, pad, rows, vj, a.num_threads, 0});
    gemm(36, u_transposed, false, K, rows, K, u, K, K * K, vj, rows, K * rows, m, rows, K * rows,
         0.f);
    winograd_output_transform_cpu(WinogradOutputArgs{m, rows, bias, nc, K, ho, wo,
                                                     y + i0 * K * ho * wo, a.num_threads, 0});
  }
}

// One pass of n images from image b0 (first: the call's first pass, which starts the sums of the
// filters' gradient transforms). Returns the sum of its cross-entropies.
double run_pass(const ConvNetStepArgs& a, const Plan& p, const Gemm& gemm, int64_t b0, int64_t n,
                bool first, float* ws) {
  const int64_t K = p.K, D = p.D, C = a.classes;
  // ---- forward
  ConvNormActPoolArgs c0 = block0_args(a, p, b0, n, ws);
  conv_norm_act_pool_forward_cpu(c0);
  for (int64_t l = 1; l < D; ++l) {
    const ConvNetLayer& L = a.layers[l];
    winograd_conv(a, gemm, ws + p.out[l - 1], n, K, p.ho[l - 1], p.wo[l - 1], L.pad, p.hc[l],
                  p.wc[l], p.T[l], p.per[l], L.u, false, L.conv_b, ws + p.v[l], 36 * K * p.rows[l],
                  ws + p.m, ws + p.y[l]);
    norm_act_pool_forward_cpu(nap_args(a, p, l, n, ws));
  }
  // ---- classifier and softmax cross-entropy: g = loss_scale * (softmax - onehot)
  const float* h = ws + p.out[D - 1];
  float* z = ws + p.logits;
  gemm(1, false, true, n, C, p.F, h, p.F, 0, a.fc_w, p.F, 0, z, C, 0, 0.f);
  double loss = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    float* zi = z + i * C;
    double mx = -INFINITY;
    for (int64_t k = 0; k < C; ++k) {
      if (a.fc_b != nullptr) zi[k] += a.fc_b[k];
      mx = std::max(mx, static_cast<double>(zi[k]));
    }
    double s = 0.0;
    for (int64_t k = 0; k < C; ++k) s += std::exp(zi[k] - mx);
    const int64_t y = a.labels[b0 + i];
    loss += std::log(s) + mx - zi[y];
    for (int64_t k = 0; k < C; ++k)
      zi[k] = static_cast<float>(a.loss_scale * (std::exp(zi[k] - mx) / s - (k == y ? 1.0 : 0.0)));
  }
  gemm(1, true, false, C, p.F, n, z, C, 0, h, p.F, 0, a.g_fc_w, p.F, 0, 1.f);
  if (a.g_fc_b != nullptr)
    for (int64_t k = 0; k < C; ++k) {
      double s = 0.0;
      for (int64_t i = 0; i < n; ++i) s += z[i * C + k];
      a.g_fc_b[k] += static_cast<float>(s);
    }
  float* gh = ws + p.gh0;      // the gradient of the current block's output
  float* gprev = ws + p.gh1;   // of the block before
  gemm(1, false, false, n, p.F, C, z, C, 0, a.fc_w, p.F, 0, gh, p.F, 0, 0.f);
  // ---- backward through blocks D-1 .. 1
  float* part = ws + p.part;
  float* gy = ws + p.gy;
  float* m = ws + p.m;
  for (int64_t l = D - 1; l >= 1; --l) {
    const ConvNetLayer& L = a.layers[l];
    const int64_t hc = p.hc[l], wc = p.wc[l];
    NormActPoolBackwardArgs nb;
    nb.fwd = nap_args(a, p, l, n, ws);
    nb.fwd.out = nullptr;
    nb.grad_out = gh;
    nb.grad_x = gy;
    nb.grad_weight = part;
    nb.grad_bias = part + n * K;
    norm_act_pool_backward_cpu(nb);
    add_sums(part, n, K, L.g_norm_w);
    add_sums(part + n * K, n, K, L.g_norm_b);
    // the filters' gradient's transform: dU += (A dY A^T) V^T per chunk (G^T dU G after the
    // last pass)
    float* du = ws + p.du[l];
    for (int64_t i0 = 0, j = 0; i0 < n; i0 += p.per[l], ++j) {
      const int64_t nc = std::min(p.per[l], n - i0), rows = rows_for(nc, p.T[l]);
      winograd_grad_transform_cpu(
          WinogradGradArgs{gy + i0 * K * hc * wc, nc, K, hc, wc, rows, m, a.num_threads, 0});
      const float* vj = ws + p.v[l] + j * 36 * K * p.rows[l];
      gemm(36, false, true, K, K, rows, m, rows, K * rows, vj, rows, K * rows, du, K, K * K,
           first && j == 0 ? 0.f : 1.f);
      if (L.g_conv_b != nullptr)   // point (1, 1) of A dY A^T: each tile's pixel sum
        for (int64_t k = 0; k < K; ++k) {
          const float* r = m + (7 * K + k) * rows;
          double s = 0.0;
          for (int64_t q = 0; q < rows; ++q) s += r[q];
          L.g_conv_b[k] += static_cast<float>(s);
        }
    }
    // the input's gradient: gy convolved with the turned filters (their channels swapped: each
    // point's matrix of uf transposed), padding 2 - pad
    winograd_conv(a, gemm, gy, n, K, hc, wc, 2 - L.pad, p.ho[l - 1], p.wo[l - 1], p.Tg[l],
                  p.perg[l], L.uf, true, nullptr, ws + p.v2, 0, m, gprev);
    std::swap(gh, gprev);
  }
  // ---- block 0 (its convolution recomputed inside), per-sample partial sums reduced here
  const ConvNetLayer& L0 = a.layers[0];
  ConvNormActPoolBackwardArgs cb;
  cb.fwd = c0;
  cb.fwd.nap.out = nullptr;
  cb.grad_out = gh;
  cb.grad_x = nullptr;
  float* gcw = part;
  float* gcb = part + n * K * a.Cin * 9;
  cb.grad_conv_weight = gcw;
  cb.grad_conv_bias = L0.conv_b != nullptr ? gcb : nullptr;
  cb.grad_weight = gcb + n * K;
  cb.grad_bias = gcb + 2 * n * K;
  conv_norm_act_pool_backward_cpu(cb);
  add_sums(gcw, n, K * a.Cin * 9, L0.g_conv_w);
  if (L0.conv_b != nullptr) add_sums(gcb, n, K, L0.g_conv_b);
  add_sums(gcb + n * K, n, K, L0.g_norm_w);
  add_sums(gcb + 2 * n * K, n, K, L0.g_norm_b);
  return loss;
}

}  // namespace

int64_t convnet_step_workspace_floats(const ConvNetStepArgs& a) { return make_plan(a).total; }

void convnet_step_cpu(const ConvNetStepArgs& a) {
  const Plan p = make_plan(a);
  check(a.B == 0 || a.x != nullptr, "null x");
  check(a.B == 0 || a.labels != nullptr, "null labels");
  for (int64_t i = 0; i < a.B; ++i)
    check(a.labels[i] >= 0 && a.labels[i] < a.classes, "a label is outside [0, classes)");
  check(a.workspace != nullptr && a.workspace_floats >= p.total,
        "workspace smaller than convnet_step_workspace_floats");
#if defined(__linux__)
  {
    // the workspace's whole 2 MB pages as transparent huge pages (a hint, for kernels in
    // `madvise` mode; pages already touched stay as they are until khugepaged merges them): the
    // passes stream tens of megabytes through it, and 4 KB pages miss the TLB (measured 1-2 %
    // of an evaluation epoch here)
    constexpr uintptr_t kHuge = uintptr_t{1} << 21;
    const uintptr_t lo = (reinterpret_cast<uintptr_t>(a.workspace) + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t hi = reinterpret_cast<uintptr_t>(a.workspace + p.total) & ~(kHuge - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
  const Gemm gemm{a.gemm};
  double loss = 0.0;
  for (int64_t b0 = 0; b0 < a.B; b0 += p.P)
    loss += run_pass(a, p, gemm, b0, std::min(p.P, a.B - b0), b0 == 0, a.workspace);
  // the filters' gradients, G^T dU G, once per call (the transform is linear)
  for (int64_t l = 1; l < p.D && a.B > 0; ++l) {
    float* gw = a.workspace + p.gw;
    winograd_filter_grad_cpu(
        WinogradFilterGradArgs{a.workspace + p.du[l], p.K * p.K, gw, a.num_threads, 0});
    float* g = a.layers[l].g_conv_w;
    for (int64_t i = 0; i < p.K * p.K * 9; ++i) g[i] += gw[i];
  }
  if (a.loss != nullptr) *a.loss = static_cast<float>(a.loss_scale * loss);
}

}  // namespace splatdd
