// Deterministic parallel loops. Work is split into contiguous chunks whose boundaries depend only
// on the problem size and grain, never on the thread count, and each item's result depends only on
// its own inputs, so results are identical for any number of threads.
#pragma once

#include <cstdint>
#include <exception>
#include <functional>

namespace moelb {

// The number of threads parallel loops use (default: the hardware concurrency). n <= 0 restores
// the default. Thread-safe.
void set_num_threads(int n);
int get_num_threads();

// Calls body(begin, end) over [0, n) in chunks of `grain` items (the last may be shorter), on up
// to get_num_threads() threads; the calling thread takes part. If bodies throw, the exception of
// the lowest chunk is rethrown after all threads finished. The other threads are workers kept
// across calls (started when first needed; a forked child starts its own). A loop started inside
// a body (nested), or while another thread's loop has the workers, runs on its calling thread
// alone: the same result, since results do not depend on the thread count.
void parallel_for(std::int64_t n, std::int64_t grain,
                  const std::function<void(std::int64_t, std::int64_t)>& body);

}  // namespace moelb
