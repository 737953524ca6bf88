// splat_math.h -- the per-Gaussian and per-sample maths of the splatdd renderer.
//
// Shared by the CPU backend (cpp/render_cpu.cpp) and the CUDA kernels (cuda/*.cu): every function
// here is `SPLAT_HD inline`, templated on the accumulation type T (float for fp32/bf16 parameters,
// double for fp64), and free of any framework type. The CPU tests therefore cover the maths the GPU
// runs.
//
// Conventions (see docs/renderer.md for the full contract):
//   * Packed parameters per Gaussian: [u, v, l11, l21, l22, c_1 .. c_C, alpha]  (6 + C values).
//   * u, v in [-1, 1] are image-normalised; L = [[l11, 0], [l21, l22]] is the Cholesky factor of the
//     covariance in the same normalised units.
//   * Everything below works in *sample space*: the supersampled grid of Ws = s*W by Hs = s*H samples,
//     sample (i, j) centred at (x, y) = (j + 0.5, i + 0.5).  Mean: mx = (u + 1) * Ws / 2.
//     Scale S = diag(Ws / 2, Hs / 2); Sigma = (S L)(S L)^T.
//   * Prefilter: Sigma' = Sigma + delta * I with delta = 1/12 (one sample-spacing box filter) when on,
//     delta = kMinVariance (a numerical floor, std 0.01 sample) when off. Sigma' is then always
//     positive definite: degenerate l11 = 0 or l22 = 0 gives a finite, thin Gaussian, never NaN.
//   * Kernel with a continuous cut-off at Mahalanobis radius r = kCutoffRadius (4 sigma of Sigma'):
//       k(d2) = max(exp(-d2/2) - exp(-r^2/2), 0),   d2 = (x - m)^T Sigma'^-1 (x - m).
//     |k(d2) - exp(-d2/2)| <= exp(-r^2/2) = 3.354e-4 for every d2, so a pixel's error against the
//     untruncated mixture is at most 3.354e-4 * sum_k |alpha_k| |c_k|.  Being continuous in the
//     parameters, the cut-off never makes a finite-difference gradient check jump.
//   * Pixel value = mean over its s*s samples of sum_k alpha_k k(d2_k) c_k.
//   * d2 is evaluated as a sum of two squares (the Cholesky factorisation of the conic),
//       d2 = A (dx + beta dy)^2 + gamma dy^2,   beta = B / A = -Sigma'_xy / Sigma'_yy,
//                                                gamma = Cc - B^2 / A = 1 / Sigma'_yy,
//     never as A dx^2 + 2 B dx dy + Cc dy^2: for a thin (near-singular) Gaussian the three terms of
//     the latter are huge and cancel, so in fp32 it can come out negative and exp(-d2/2) explodes
//     (issue 14). Both terms of the sum are >= 0, so 0 <= k < 1 whatever the rounding, and
//     u = dx + beta dy is the offset from the row's centre line, which stays small where k > 0.
//     The backward's moments are taken in the same variables (u, dy) -- see SplatGrad.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SPLAT_HD __host__ __device__ __forceinline__
#else
#define SPLAT_HD inline
#endif

namespace splatdd {

constexpr int kMaxChannels = 8;            // C in [1, kMaxChannels]
constexpr double kCutoffRadius = 4.0;      // Mahalanobis radius of the support
constexpr double kCutoffD2 = kCutoffRadius * kCutoffRadius;
// exp(-kCutoffD2 / 2) = exp(-8)
constexpr double kTailValue = 3.3546262790251185e-04;
constexpr double kPrefilterVariance = 1.0 / 12.0;
constexpr double kMinVariance = 1e-4;

// Parameter dtypes understood by both backends.
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat64 = 2 };

SPLAT_HD float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
#if defined(__CUDA_ARCH__)  // device pass only: __uint_as_float is __device__ (nvcc's host pass too
                            // defines __CUDACC__ and must take the memcpy path)
  f = __uint_as_float(bits);
#else
  __builtin_memcpy(&f, &bits, sizeof(f));
#endif
  return f;
}

// Read element `i` of a parameter buffer of dtype `dt` as accumulation type T.
template <typename T>
SPLAT_HD T load_param(const void* p, int64_t i, int dt) {
  if (dt == kFloat32) return static_cast<T>(static_cast<const float*>(p)[i]);
  if (dt == kFloat64) return static_cast<T>(static_cast<const double*>(p)[i]);
  return static_cast<T>(bf16_to_float(static_cast<const uint16_t*>(p)[i]));
}

// A Gaussian prepared for rasterisation in sample space.
template <typename T>
struct Splat {
  T mx, my;        // mean (sample units)
  T A, B, Cc;      // conic: inverse of Sigma' = [[A, B], [B, Cc]]
  T beta, gamma;   // d2 = A (dx + beta dy)^2 + gamma dy^2:  beta = B / A, gamma = 1 / Sigma'_yy
  T invA;          // 1 / A = det(Sigma') / Sigma'_yy (half-width^2 of a row span per unit d2)
  T sxx, syy;      // diagonal of Sigma' (for the bounding box)
  T alpha;
  // axis-aligned bounding box of the ellipse d2 <= kCutoffD2, in sample indices, inclusive.
  // Empty when x0 > x1 or y0 > y1 (clipped to the sample grid).
  int x0, x1, y0, y1;
};

// Sample-space scale factors for an image of Hs x Ws samples.
template <typename T>
SPLAT_HD void sample_scale(int Ws, int Hs, T& sx, T& sy) {
  sx = static_cast<T>(0.5) * static_cast<T>(Ws);
  sy = static_cast<T>(0.5) * static_cast<T>(Hs);
}

// NaN-safe clamp: NaN maps to `lo` (so a bounding box built from NaN/overflowed values comes out
// empty instead of feeding NaN to an int conversion, which is undefined behaviour).
template <typename T>
SPLAT_HD T clamp_to(T v, T lo, T hi) { return !(v >= lo) ? lo : (v > hi ? hi : v); }

// Build the Splat of one Gaussian from its geometry (u, v, l11, l21, l22) and opacity.
template <typename T>
SPLAT_HD Splat<T> make_splat(T u, T v, T l11, T l21, T l22, T alpha, int Ws, int Hs,
                             bool prefilter) {
  Splat<T> s;
  T sx, sy;
  sample_scale<T>(Ws, Hs, sx, sy);
  const T delta = prefilter ? static_cast<T>(kPrefilterVariance) : static_cast<T>(kMinVariance);
  s.mx = (u + T(1)) * sx;
  s.my = (v + T(1)) * sy;
  const T a = sx * sx * l11 * l11;                 // Sigma_xx
  const T b = sx * sy * l11 * l21;                 // Sigma_xy
  const T c = sy * sy * (l21 * l21 + l22 * l22);   // Sigma_yy
  const T ap = a + delta, cp = c + delta;
  // det(Sigma') without cancellation: (a c - b^2) = (sx sy l11 l22)^2 exactly.
  const T q = sx * sy * l11 * l22;
  const T det = q * q + delta * (a + c) + delta * delta;
  const T inv = T(1) / det;
  s.A = cp * inv;
  s.B = -b * inv;
  s.Cc = ap * inv;
  s.beta = -b / cp;
  s.gamma = T(1) / cp;
  s.invA = det / cp;
  s.sxx = ap;
  s.syy = cp;
  s.alpha = alpha;
  // Tight bounding box of {d2 <= r^2}: half-widths r*sqrt(Sigma'_xx), r*sqrt(Sigma'_yy).
  const T r = static_cast<T>(kCutoffRadius);
  const T hx = r * sqrt(ap), hy = r * sqrt(cp);
  // Samples j with |j + 0.5 - mx| <= hx  ->  j in [ceil(mx - hx - 0.5), floor(mx + hx - 0.5)].
  const T fx0 = clamp_to<T>(ceil(s.mx - hx - T(0.5)), T(-1), T(Ws));
  const T fx1 = clamp_to<T>(floor(s.mx + hx - T(0.5)), T(-1), T(Ws));
  const T fy0 = clamp_to<T>(ceil(s.my - hy - T(0.5)), T(-1), T(Hs));
  const T fy1 = clamp_to<T>(floor(s.my + hy - T(0.5)), T(-1), T(Hs));
  s.x0 = fx0 < T(0) ? 0 : static_cast<int>(fx0);
  s.x1 = fx1 > T(Ws - 1) ? Ws - 1 : static_cast<int>(fx1);
  s.y0 = fy0 < T(0) ? 0 : static_cast<int>(fy0);
  s.y1 = fy1 > T(Hs - 1) ? Hs - 1 : static_cast<int>(fy1);
  return s;
}

// Offset of a sample from the centre line of its row: u = dx + beta dy (d2 = A u^2 + gamma dy^2).
template <typename T>
SPLAT_HD T row_offset(const Splat<T>& s, T dx, T dy) {
  return dx + s.beta * dy;
}

// Squared Mahalanobis distance of offset (dx, dy) from the mean, as a sum of two non-negative
// squares (never negative, fp32-accurate for near-singular conics; see the header comment).
template <typename T>
SPLAT_HD T mahalanobis2(const Splat<T>& s, T dx, T dy) {
  const T u = row_offset<T>(s, dx, dy);
  return s.A * u * u + s.gamma * dy * dy;
}

// Cut-off kernel value k(d2) (0 outside the support).
template <typename T>
SPLAT_HD T kernel_value(T d2, T& e) {
  if (!(d2 <= static_cast<T>(kCutoffD2))) { e = T(0); return T(0); }
  e = exp(T(-0.5) * d2);
  const T k = e - static_cast<T>(kTailValue);
  if (k > T(0)) return k;
  e = T(0);  // k clamped to 0 (rounding at d2 ~ r^2): its derivative dk/dd2 = -e/2 is 0 too
  return T(0);
}

// The row interval of samples j (inclusive) where d2 <= r^2 for sample row with offset dy:
// A u^2 <= r^2 - gamma dy^2 with u = x - xc, xc = mx - beta dy (the row's centre).  Returns false
// when the row misses the ellipse. The interval is widened by one sample on each side to be robust
// to rounding; callers still test d2 (kernel_value does), so the result is exact.
template <typename T>
SPLAT_HD bool row_span(const Splat<T>& s, T dy, int& j0, int& j1) {
  const T rem = static_cast<T>(kCutoffD2) - s.gamma * dy * dy;
  if (!(rem >= T(0))) return false;
  const T h = sqrt(rem * s.invA);
  const T xc = s.mx - s.beta * dy;
  const T lo = xc - h, hi = xc + h;  // x range
  const T jl = floor(lo - T(0.5)), jh = ceil(hi - T(0.5));
  // Clamp to [x0, x1] before any int conversion (NaN or huge values fall back to the box).
  j0 = !(jl > T(s.x0)) ? s.x0 : (jl > T(s.x1) ? s.x1 + 1 : static_cast<int>(jl));
  j1 = !(jh < T(s.x1)) ? s.x1 : (jh < T(s.x0) ? s.x0 - 1 : static_cast<int>(jh));
  return j0 <= j1;
}

// Per-Gaussian backward accumulators over the samples it covers, in the variables of the sum of
// squares (u = dx + beta dy, dy), which stay well conditioned for thin Gaussians. With
// w = dL/d(d2) at a sample (w = -0.5 * e * alpha * <g_out, c>):
//   swu = sum w u, swy = sum w dy, swuu = sum w u^2, swuy = sum w u dy, swyy = sum w dy^2,
//   sa = sum k * <g_out, c>   (dL/dalpha),   sc[ch] = sum alpha * k * g_out[ch]   (dL/dc).
template <typename T>
struct SplatGrad {
  T swu, swy, swuu, swuy, swyy, sa;
  T sc[kMaxChannels];
};

template <typename T>
SPLAT_HD void zero_grad(SplatGrad<T>& g, int C) {
  g.swu = g.swy = g.swuu = g.swuy = g.swyy = g.sa = T(0);
  for (int ch = 0; ch < C; ++ch) g.sc[ch] = T(0);
}

// Accumulate one sample.  gout[ch] is dL/d(sample value) (pixel gradient / s^2), col the colours.
template <typename T>
SPLAT_HD void accumulate_sample(SplatGrad<T>& g, const Splat<T>& s, T dx, T dy, T k, T e,
                                const T* gout, const T* col, int C) {
  T dot = T(0);
  for (int ch = 0; ch < C; ++ch) {
    dot += gout[ch] * col[ch];
    g.sc[ch] += s.alpha * k * gout[ch];
  }
  g.sa += k * dot;
  const T w = T(-0.5) * e * s.alpha * dot;
  const T u = row_offset<T>(s, dx, dy);
  const T wu = w * u, wy = w * dy;
  g.swu += wu;
  g.swy += wy;
  g.swuu += wu * u;
  g.swuy += wu * dy;
  g.swyy += wy * dy;
}

// Finalise: chain the accumulators back to dL/d[u, v, l11, l21, l22] (colour and alpha gradients
// are g.sc and g.sa directly).  d2 = A u^2 + gamma dy^2, u = dx + beta dy, dx = x - mx, dy = y - my:
//   dd2/dmx = -2 A u,  dd2/dmy = -2 A beta u - 2 gamma dy,
//   dd2/dA = u^2,      dd2/dbeta = 2 A u dy,   dd2/dgamma = dy^2;
// then (A, beta, gamma) -> Sigma' = [[a', b], [b, c']] with D = det Sigma':
//   A = c'/D:     dA/da' = -A^2,  dA/db = -2 A B,  dA/dc' = -B^2   (B = -b/D, the conic's off-diagonal)
//   beta = -b/c': dbeta/db = -gamma,  dbeta/dc' = -beta gamma
//   gamma = 1/c': dgamma/dc' = -gamma^2.
template <typename T>
SPLAT_HD void finish_grad(const SplatGrad<T>& g, const Splat<T>& s, T l11, T l21, T l22, int Ws,
                          int Hs, T out[5]) {
  T sx, sy;
  sample_scale<T>(Ws, Hs, sx, sy);
  const T gmx = T(-2) * s.A * g.swu;
  const T gmy = T(-2) * (s.A * s.beta * g.swu + s.gamma * g.swy);
  const T gA = g.swuu, gbeta = T(2) * s.A * g.swuy, ggamma = g.swyy;
  const T ga = -s.A * s.A * gA;
  const T gb = T(-2) * s.A * s.B * gA - s.gamma * gbeta;
  const T gc = -s.B * s.B * gA - s.beta * s.gamma * gbeta - s.gamma * s.gamma * ggamma;
  out[0] = gmx * sx;
  out[1] = gmy * sy;
  out[2] = ga * T(2) * sx * sx * l11 + gb * sx * sy * l21;
  out[3] = gb * sx * sy * l11 + gc * T(2) * sy * sy * l21;
  out[4] = gc * T(2) * sy * sy * l22;
}

}  // namespace splatdd
