// norm_act_pool.cpp -- fused instance norm -> ReLU -> 2x2 average pool on the CPU (see the header).
//
// Tasks are (sample, channel) planes in contiguous ranges, one range per worker; each plane is
// read twice for its statistics and once for the output (forward), twice for the backward, with
// a few planes of scratch per worker (vectors over whole planes, rows with slack). The loops
// (norm_act_pool.inc) are compiled for baseline x86-64 (4-float vectors), AVX2+FMA (8) and
// AVX-512 (16) and chosen at run time by the CPU's features.
#include "norm_act_pool.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "cpu_parallel.h"

namespace splatdd {

namespace {
// Floats of slack after each scratch buffer of the plane loops: a row's or a plane's last
// kLanes-wide vector may read or write up to 2 kLanes floats past its end (norm_act_pool.inc).
constexpr int64_t kScratchPad = 64;

// Scratch floats per worker of each op (the layouts are in norm_act_pool.inc).
int64_t nap_forward_scratch(int64_t H, int64_t W) { return 3 * (H * W + kScratchPad); }
int64_t nap_backward_scratch(int64_t H, int64_t W) {
  return H * W + (H / 2) * (W / 2) + 2 * kScratchPad;
}
int64_t padded_input_floats(int64_t Cin, int64_t H, int64_t W) {
  return Cin * (H + 2) * (W + 2) + kScratchPad;
}
// Row strides of the fused first block's backward: the padded input's gradient (W + 2 rounded up
// to 16 floats, whole vectors of every build) and the zero-bordered copy of the plane's gradient
// read by it.
int64_t conv_grad_stride(int64_t W) { return (W + 2 + 15) / 16 * 16; }
int64_t conv_gx_stride(int64_t W) { return conv_grad_stride(W) + 16; }
int64_t conv_backward_scratch(int64_t Cin, int64_t H, int64_t W) {
  return padded_input_floats(Cin, H, W) + (Cin * (H + 2) * conv_grad_stride(W) + kScratchPad) +
         ((H + 4) * conv_gx_stride(W) + kScratchPad) + 4 * (H * W + kScratchPad) +
         nap_backward_scratch(H, W);
}
}  // namespace

// NAP_LANES: the floats of the build's widest register, the .inc's vector width
#define NAP_LANES 4
namespace nap_generic {
#include "norm_act_pool.inc"
}  // namespace nap_generic
#undef NAP_LANES

#if defined(SPLATDD_CPU_X86)
#define NAP_LANES 8
SPLATDD_TARGET_AVX2_BEGIN
namespace nap_avx2 {
#include "norm_act_pool.inc"
}  // namespace nap_avx2
SPLATDD_TARGET_END
#undef NAP_LANES
#define NAP_LANES 16
SPLATDD_TARGET_AVX512_BEGIN
namespace nap_avx512 {
#include "norm_act_pool.inc"
}  // namespace nap_avx512
SPLATDD_TARGET_END
#undef NAP_LANES
#endif

namespace {

void check(bool ok, const char* msg) {
  if (!ok) throw std::invalid_argument(msg);
}

void validate(const NormActPoolArgs& a, bool need_out) {
  check(a.dtype == 0 || a.dtype == 1, "dtype must be 0 (float32) or 1 (bfloat16)");
  check(a.N >= 0 && a.C >= 1 && a.H >= 1 && a.W >= 1, "N must be >= 0 and C, H, W >= 1");
  check(!a.pool || (a.H >= 2 && a.W >= 2), "pooling needs H >= 2 and W >= 2");
  check(a.N * a.C * a.H * a.W < (int64_t{1} << 40), "tensor too large");
  check(std::isfinite(a.eps) && a.eps > 0.f, "eps must be finite and > 0");
  check(a.N == 0 || a.x != nullptr, "null x pointer");
  check(!need_out || a.N == 0 || a.out != nullptr, "null out pointer");
}

// Values per worker below which a call stays on the caller's thread: a ConvNet block of a few
// images is a fraction of a millisecond of memory-bound work, less than starting a thread costs
// (and far less than waiting for a core when the machine is busy).
constexpr int64_t kMinValuesPerWorker = int64_t{1} << 21;

// Splits the N*C planes into one contiguous range per worker and runs body(begin, end, scratch)
// with `scratch_per_worker` floats of scratch.
template <class F>
void for_planes(const NormActPoolArgs& a, const F& body, int64_t scratch_per_worker) {
  const int64_t planes = a.N * a.C;
  if (planes == 0) return;
  const int64_t by_work = std::max<int64_t>(1, planes * a.H * a.W / kMinValuesPerWorker);
  const int n = resolve_threads(a.num_threads, std::min(planes, by_work));
  const size_t per = static_cast<size_t>(scratch_per_worker);
  std::vector<float> scratch(static_cast<size_t>(n) * per);
  run_parallel(n, [&](int t) {
    const int64_t begin = planes * t / n, end = planes * (t + 1) / n;
    body(begin, end, scratch.data() + static_cast<size_t>(t) * per);
  });
}

}  // namespace

void norm_act_pool_forward_cpu(const NormActPoolArgs& a) {
  validate(a, /*need_out=*/true);
  const Isa isa = choose_isa(a.isa);
  for_planes(a, [&](int64_t begin, int64_t end, float* s) {
#if defined(SPLATDD_CPU_X86)
    if (isa == Isa::kAvx512) {
      if (a.dtype == 0) nap_avx512::forward_planes<float>(a, begin, end, s);
      else nap_avx512::forward_planes<uint16_t>(a, begin, end, s);
      return;
    }
    if (isa == Isa::kAvx2) {
      if (a.dtype == 0) nap_avx2::forward_planes<float>(a, begin, end, s);
      else nap_avx2::forward_planes<uint16_t>(a, begin, end, s);
      return;
    }
#endif
    (void)isa;
    if (a.dtype == 0) nap_generic::forward_planes<float>(a, begin, end, s);
    else nap_generic::forward_planes<uint16_t>(a, begin, end, s);
  }, nap_forward_scratch(a.H, a.W));
}

void norm_act_pool_backward_cpu(const NormActPoolBackwardArgs& b) {
  const NormActPoolArgs& a = b.fwd;
  validate(a, /*need_out=*/false);
  check(a.dtype == 0, "the backward needs float32 x");
  check(a.N == 0 || (a.mean != nullptr && a.rstd != nullptr && b.grad_out != nullptr &&
                     b.grad_x != nullptr && b.grad_weight != nullptr && b.grad_bias != nullptr),
        "null mean, rstd or gradient pointer");
  const Isa isa = choose_isa(a.isa);
  for_planes(a, [&](int64_t begin, int64_t end, float* s) {
#if defined(SPLATDD_CPU_X86)
    if (isa == Isa::kAvx512) return nap_avx512::backward_planes(b, begin, end, s);
    if (isa == Isa::kAvx2) return nap_avx2::backward_planes(b, begin, end, s);
#endif
    (void)isa;
    nap_generic::backward_planes(b, begin, end, s);
  }, nap_backward_scratch(a.H, a.W));
}

static void validate_conv(const ConvNormActPoolArgs& c, bool need_out) {
  const NormActPoolArgs& a = c.nap;
  validate(a, need_out);
  check(a.dtype == 0, "the fused convolution block is float32 only");
  check(c.Cin >= 1 && c.Cin <= 64, "Cin must be in 1..64");
  check(c.pad >= 0 && c.pad <= 16, "pad must be in 0..16");
  check(c.Hin + 2 * c.pad - 2 == a.H && c.Win + 2 * c.pad - 2 == a.W,
        "H, W must be the convolution's output size Hin + 2 pad - 2, Win + 2 pad - 2");
  check(a.N == 0 || (c.conv_x != nullptr && c.conv_weight != nullptr), "null conv_x or conv_weight");
}

void conv_norm_act_pool_forward_cpu(const ConvNormActPoolArgs& c) {
  const NormActPoolArgs& a = c.nap;
  validate_conv(c, /*need_out=*/true);
  const Isa isa = choose_isa(a.isa);
  // the padded input, two planes (a grey image's are computed in pairs), forward_plane's two
  const int64_t scratch = padded_input_floats(c.Cin, a.H, a.W) + 2 * (a.H * a.W + kScratchPad) +
                          2 * (a.H * a.W + kScratchPad);
  for_planes(a, [&](int64_t begin, int64_t end, float* s) {
#if defined(SPLATDD_CPU_X86)
    if (isa == Isa::kAvx512) return nap_avx512::conv_forward_planes(c, begin, end, s);
    if (isa == Isa::kAvx2) return nap_avx2::conv_forward_planes(c, begin, end, s);
#endif
    (void)isa;
    nap_generic::conv_forward_planes(c, begin, end, s);
  }, scratch);
}

void conv_norm_act_pool_backward_cpu(const ConvNormActPoolBackwardArgs& b) {
  const ConvNormActPoolArgs& c = b.fwd;
  const NormActPoolArgs& a = c.nap;
  validate_conv(c, /*need_out=*/false);
  check(a.N == 0 || (a.mean != nullptr && a.rstd != nullptr && b.grad_out != nullptr &&
                     b.grad_conv_weight != nullptr && b.grad_weight != nullptr &&
                     b.grad_bias != nullptr),
        "null mean, rstd or gradient pointer");
  if (a.N == 0) return;
  const Isa isa = choose_isa(a.isa);
  const size_t per = static_cast<size_t>(conv_backward_scratch(c.Cin, a.H, a.W));
  // one task per sample (its planes in order: the input gradient sums over channels)
  const int64_t by_work = std::max<int64_t>(1, a.N * a.C * a.H * a.W / kMinValuesPerWorker);
  const int n = resolve_threads(a.num_threads, std::min(a.N, by_work));
  std::vector<float> scratch(static_cast<size_t>(n) * per);
  run_parallel(n, [&](int t) {
    const int64_t begin = a.N * t / n, end = a.N * (t + 1) / n;
    float* s = scratch.data() + static_cast<size_t>(t) * per;
#if defined(SPLATDD_CPU_X86)
    if (isa == Isa::kAvx512) return nap_avx512::conv_backward_samples(b, begin, end, s);
    if (isa == Isa::kAvx2) return nap_avx2::conv_backward_samples(b, begin, end, s);
#endif
    (void)isa;
    nap_generic::conv_backward_samples(b, begin, end, s);
  });
}

}  // namespace splatdd
