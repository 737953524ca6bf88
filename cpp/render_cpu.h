// render_cpu.h -- the CPU backend of the splatdd renderer.
//
// Multithreaded with std::thread, allocation-free in the hot loops, deterministic: the result bits
// do not depend on the number of threads or on scheduling (every output element is written by
// exactly one task, which visits its inputs in a fixed order; no atomics on data).
#pragma once

#include "render_params.h"

namespace splatdd {

// Renders args into args.out, (B, C, H, W): double for fp64 params, float otherwise. `out` need not
// be initialised (every element is written). args.offsets is host memory.
void render_forward_cpu(const RenderArgs& args);

// Adds dL/dparams to args.grad_params, (total, 6 + C): double for fp64 params, float otherwise.
void render_backward_cpu(const BackwardArgs& args);

// Which inner-loop implementation the CPU backend uses on this machine: "avx2" or "generic" (for
// benchmark reports). Setting SPLATDD_CPU_KERNEL=simple in the environment selects a plain
// per-sample implementation built directly on splat_math.h's kernel_value / accumulate_sample
// (slow; used by the tests to check the shared maths against the fast loops).
const char* cpu_kernel_name();

}  // namespace splatdd
