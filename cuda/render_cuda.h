// render_cuda.h -- plain C++ interface of the CUDA backend (no CUDA or pybind11 types), included by
// cpp/bindings.cpp when the module is built with SPLATDD_WITH_CUDA.
#pragma once

#include "../cpp/render_params.h"

namespace splatdd {
namespace cuda {

// Opaque per-call state of the tiled pipeline (sorted Gaussian/tile lists, tile ranges, prepared
// splats) that the forward builds and the backward reuses. Owned by the caller; release with
// free_binning (device memory is stream-ordered, allocated with cudaMallocAsync).
struct Binning;

// Renders args.fwd into args.out on `stream` (a cudaStream_t passed as void*). All pointers in
// `args` are device pointers on the current device. Returns the binning for the backward.
Binning* render_forward(const RenderArgs& args, void* stream);

// Accumulates dL/dparams into args.grad_params (zero-initialised by the caller).
void render_backward(const BackwardArgs& args, const Binning* binning, void* stream);

void free_binning(Binning* binning);

// Number of visible CUDA devices (0 when there is no driver or no device; never throws).
int device_count();

}  // namespace cuda
}  // namespace splatdd
