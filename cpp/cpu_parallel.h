// cpu_parallel.h -- the CPU backends' worker pool: how many workers, and running a body on them.
//
// Shared by the renderer (render_cpu.cpp) and the fused network blocks (norm_act_pool.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace splatdd {

// Workers for `ntasks` tasks: `requested` (0 = hardware concurrency), at most 1024 and at most
// ntasks (at least 1).
inline int resolve_threads(int requested, int64_t ntasks) {
  int n = requested;
  if (n <= 0) {
    const unsigned hc = std::thread::hardware_concurrency();
    n = hc == 0 ? 1 : static_cast<int>(hc);
  }
  n = std::min(n, 1024);
  if (ntasks < n) n = static_cast<int>(std::max<int64_t>(ntasks, 1));
  return n;
}

// Runs body(worker) on `n` workers (the calling thread is worker 0). Workers claim their tasks
// from shared atomic counters, so if the system refuses to start a thread the others still do all
// the work.
template <class F>
void run_parallel(int n, const F& body) {
  std::vector<std::thread> pool;
  pool.reserve(n > 1 ? n - 1 : 0);
  for (int t = 1; t < n; ++t) {
    try {
      pool.emplace_back([&body, t] { body(t); });
    } catch (...) {
      break;
    }
  }
  body(0);
  for (auto& th : pool) th.join();
}

}  // namespace splatdd
