#include "moelb/parallel.hpp"

#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

#include "moelb/errors.hpp"

namespace moelb {
namespace {

std::atomic<int> g_num_threads{0};

int default_num_threads() {
    const unsigned hw = std::thread::hardware_concurrency();
    return hw == 0 ? 1 : static_cast<int>(hw);
}

}  // namespace

void set_num_threads(int n) { g_num_threads.store(n > 0 ? n : 0); }

int get_num_threads() {
    const int n = g_num_threads.load();
    return n > 0 ? n : default_num_threads();
}

void parallel_for(std::int64_t n, std::int64_t grain,
                  const std::function<void(std::int64_t, std::int64_t)>& body) {
    MOELB_CHECK(grain > 0, "parallel_for grain must be positive, got " << grain);
    if (n <= 0) return;
    const std::int64_t num_chunks = (n + grain - 1) / grain;
    const int num_threads = static_cast<int>(std::min<std::int64_t>(get_num_threads(), num_chunks));
    // Chunks are claimed in increasing order; which thread runs a chunk does not change its
    // result. After a failure, chunks above the lowest failed one are skipped, while every chunk
    // below it still runs, so the exception rethrown is always that of the lowest failing chunk.
    std::atomic<std::int64_t> next{0};
    std::atomic<std::int64_t> first_failed{num_chunks};
    std::vector<std::exception_ptr> errors(static_cast<std::size_t>(num_chunks));
    auto worker = [&] {
        for (;;) {
            const std::int64_t c = next.fetch_add(1);
            if (c >= num_chunks) return;
            if (c > first_failed.load()) continue;
            const std::int64_t begin = c * grain;
            const std::int64_t end = std::min(n, begin + grain);
            try {
                body(begin, end);
            } catch (...) {
                errors[static_cast<std::size_t>(c)] = std::current_exception();
                std::int64_t seen = first_failed.load();
                while (c < seen && !first_failed.compare_exchange_weak(seen, c)) {
                }
            }
        }
    };
    std::vector<std::thread> threads;
    if (num_threads > 1) threads.reserve(static_cast<std::size_t>(num_threads - 1));
    for (int i = 1; i < num_threads; ++i) threads.emplace_back(worker);
    worker();
    for (auto& t : threads) t.join();
    const std::int64_t failed = first_failed.load();
    if (failed < num_chunks) std::rethrow_exception(errors[static_cast<std::size_t>(failed)]);
}

}  // namespace moelb
