// test_tile_hit.cu -- host-only check of the binning's tile/ellipse culling (needs nvcc, no GPU).
//
// Build and run (not part of the default build):
//   cmake --build BUILD --target splatdd_test_tile_hit && BUILD/splatdd_test_tile_hit
//
// For random Gaussians (wide, tiny, degenerate l22 = 0, thin at +-45 degrees; prefilter on and off;
// s in {1, 2, 4}; image sizes not multiples of 16), every tile of the Gaussian's bounding box that
// holds a sample with k(d2) > 0 (as the raster kernels compute it) must be kept by gauss_tile_hit.
// It also reports how many kept tiles are in fact empty (the culling's slack).
#include "binning.cu"  // the functions under test live in binning.cu's anonymous namespace

#include <cstdio>
#include <random>

namespace {

using splatdd::kernel_value;
using splatdd::mahalanobis2;
using splatdd::make_splat;
using splatdd::Splat;
using splatdd::cuda::kTile;

template <typename T>
int run(unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> U(-1.3, 1.3), L(-0.6, 0.6), Ls(-0.02, 0.02);
  long missed = 0, kept = 0, kept_empty = 0, tiles = 0;
  for (int it = 0; it < 20000; ++it) {
    const int s = 1 << (it % 3), H = 5 + it % 40, W = 7 + (it * 7) % 45, Hs = s * H, Ws = s * W;
    const bool small = it % 4 == 0;
    const T u = T(U(rng)), v = T(U(rng));
    T l11 = T(small ? Ls(rng) : L(rng)), l21 = T(small ? Ls(rng) : L(rng)),
      l22 = T(small ? Ls(rng) : L(rng));
    if (it % 17 == 0) l22 = T(0);  // degenerate
    if (it % 5 == 1) {             // thin, at +-45 degrees
      l21 = l11 * T(it % 2 ? 1 : -1);
      l22 = T(1e-4) * l11;
    }
    const Splat<T> sp = make_splat<T>(u, v, l11, l21, l22, T(1), Ws, Hs, it % 2 == 0);
    if (sp.x0 > sp.x1 || sp.y0 > sp.y1) continue;
    const T row[6] = {sp.mx, sp.my, sp.A, sp.beta, sp.gamma, sp.alpha};
    const int4 box = make_int4(sp.x0, sp.x1, sp.y0, sp.y1);
    for (int ty = sp.y0 / kTile; ty <= sp.y1 / kTile; ++ty)
      for (int tx = sp.x0 / kTile; tx <= sp.x1 / kTile; ++tx) {
        ++tiles;
        const bool hit = splatdd::cuda::gauss_tile_hit<T>(row, box, tx, ty);
        bool any = false;
        for (int y = ty * kTile; y < ty * kTile + kTile && y < Hs; ++y)
          for (int x = tx * kTile; x < tx * kTile + kTile && x < Ws; ++x) {
            const T dx = T(x) + T(0.5) - sp.mx, dy = T(y) + T(0.5) - sp.my;
            T e;
            if (kernel_value<T>(mahalanobis2<T>(sp, dx, dy), e) > T(0)) any = true;
          }
        if (any && !hit) ++missed;
        if (hit) {
          ++kept;
          if (!any) ++kept_empty;
        }
      }
  }
  std::printf("%-6s tiles in boxes %ld, kept %ld (%ld of them empty), MISSED %ld\n",
              sizeof(T) == 4 ? "float" : "double", tiles, kept, kept_empty, missed);
  return missed != 0;
}

}  // namespace

int main() {
  const int fails = run<float>(1) + run<double>(2);
  std::printf(fails ? "FAILED\n" : "OK\n");
  return fails ? 1 : 0;
}
