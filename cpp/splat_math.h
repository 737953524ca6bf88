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

// Squared Mahalanobis distance of offset (dx, dy) from the mean.
template <typename T>
SPLAT_HD T mahalanobis2(const Splat<T>& s, T dx, T dy) {
  return s.A * dx * dx + T(2) * s.B * dx * dy + s.Cc * dy * dy;
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
// A dx^2 + 2 B dy dx + (Cc dy^2 - r^2) <= 0.  Returns false when the row misses the ellipse.
// The interval is widened by one sample on each side to be robust to rounding; callers still test
// d2 (kernel_value does), so the result is exact.
template <typename T>
SPLAT_HD bool row_span(const Splat<T>& s, T dy, int& j0, int& j1) {
  const T bq = s.B * dy;
  const T disc = bq * bq - s.A * (s.Cc * dy * dy - static_cast<T>(kCutoffD2));
  if (!(disc >= T(0))) return false;
  const T sq = sqrt(disc);
  const T lo = s.mx + (-bq - sq) / s.A, hi = s.mx + (-bq + sq) / s.A;  // x range
  const T jl = floor(lo - T(0.5)), jh = ceil(hi - T(0.5));
  // Clamp to [x0, x1] before any int conversion (NaN or huge values fall back to the box).
  j0 = !(jl > T(s.x0)) ? s.x0 : (jl > T(s.x1) ? s.x1 + 1 : static_cast<int>(jl));
  j1 = !(jh < T(s.x1)) ? s.x1 : (jh < T(s.x0) ? s.x0 - 1 : static_cast<int>(jh));
  return j0 <= j1;
}

// Per-Gaussian backward accumulators over the samples it covers.  With w = dL/d(d2) at a sample
// (w = -0.5 * e * alpha * <g_out, c>), and offsets dx, dy:
//   swx = sum w dx, swy = sum w dy, swxx = sum w dx^2, swxy = sum w dx dy, swyy = sum w dy^2,
//   sa = sum k * <g_out, c>   (dL/dalpha),   sc[ch] = sum alpha * k * g_out[ch]   (dL/dc).
template <typename T>
struct SplatGrad {
  T swx, swy, swxx, swxy, swyy, sa;
  T sc[kMaxChannels];
};

template <typename T>
SPLAT_HD void zero_grad(SplatGrad<T>& g, int C) {
  g.swx = g.swy = g.swxx = g.swxy = g.swyy = g.sa = T(0);
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
  g.swx += w * dx;
  g.swy += w * dy;
  g.swxx += w * dx * dx;
  g.swxy += w * dx * dy;
  g.swyy += w * dy * dy;
}

// Finalise: chain the accumulators back to dL/d[u, v, l11, l21, l22] (colour and alpha gradients
// are g.sc and g.sa directly).
template <typename T>
SPLAT_HD void finish_grad(const SplatGrad<T>& g, const Splat<T>& s, T l11, T l21, T l22, int Ws,
                          int Hs, T out[5]) {
  T sx, sy;
  sample_scale<T>(Ws, Hs, sx, sy);
  // d2 = A dx^2 + 2B dx dy + C dy^2 with dx = x - mx:  dd2/dmx = -2 (A dx + B dy).
  const T gmx = T(-2) * (s.A * g.swx + s.B * g.swy);
  const T gmy = T(-2) * (s.B * g.swx + s.Cc * g.swy);
  // dL/dK for K = conic (symmetric): G = [[swxx, swxy], [swxy, swyy]];  dL/dSigma' = -K G K.
  const T KG00 = s.A * g.swxx + s.B * g.swxy, KG01 = s.A * g.swxy + s.B * g.swyy;
  const T KG10 = s.B * g.swxx + s.Cc * g.swxy, KG11 = s.B * g.swxy + s.Cc * g.swyy;
  const T gS00 = -(KG00 * s.A + KG01 * s.B);
  const T gS01 = -(KG00 * s.B + KG01 * s.Cc);
  const T gS11 = -(KG10 * s.B + KG11 * s.Cc);
  const T ga = gS00, gb = T(2) * gS01, gc = gS11;  // Sigma_xy appears twice in the matrix
  out[0] = gmx * sx;
  out[1] = gmy * sy;
  out[2] = ga * T(2) * sx * sx * l11 + gb * sx * sy * l21;
  out[3] = gb * sx * sy * l11 + gc * T(2) * sy * sy * l21;
  out[4] = gc * T(2) * sy * sy * l22;
}

}  // namespace splatdd
