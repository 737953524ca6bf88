// cpu_parallel.h -- the CPU backends' worker pool: how many workers, and running a body on them.
//
// Shared by the renderer (render_cpu.cpp) and the fused network blocks (norm_act_pool.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
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

// Runs body(worker) once for every worker 0..n-1 (the calling thread is worker 0). If the system
// refuses to start a thread, the calling thread runs the bodies of the workers that did not start
// after its own, so every worker's share of the work (a fixed range, or tasks claimed from an
// atomic counter) is always done. Every started thread is joined before this returns, also when a
// body throws (a joinable std::thread destroyed during unwinding would end the process); the first
// exception a body threw is then rethrown on the calling thread.
template <class F>
void run_parallel(int n, const F& body) {
  std::vector<std::exception_ptr> errors(static_cast<size_t>(n > 1 ? n : 1));
  const auto guarded = [&body, &errors](int t) {
    try {
      body(t);
    } catch (...) {
      errors[static_cast<size_t>(t)] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(n > 1 ? n - 1 : 0);
  int started = 1;
  for (int t = 1; t < n; ++t, ++started) {
    try {
      pool.emplace_back(guarded, t);
    } catch (...) {
      break;
    }
  }
  guarded(0);
  for (int t = started; t < n; ++t) guarded(t);
  for (auto& th : pool) th.join();
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace splatdd
