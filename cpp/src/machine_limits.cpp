// The machine-limit microbenchmarks (moelb/machine_limits.hpp): threads started together on a
// barrier, timed from the barrier to the last thread's end, best of the passes.
#include "moelb/machine_limits.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#include "isa/kernels.hpp"
#include "moelb/cpu_isa.hpp"
#include "moelb/errors.hpp"
#include "moelb/parallel.hpp"

namespace moelb {
namespace {

using Clock = std::chrono::steady_clock;

// Runs body(t) for t in [0, threads) on `threads` threads together: one parallel_for chunk each,
// all waiting until every chunk has started. Returns the seconds from the first thread leaving
// the barrier to the last one finishing.
template <class Body>
double run_together(int threads, const Body& body) {
    std::atomic<int> arrived{0};
    std::atomic<bool> failed{false};
    std::vector<Clock::time_point> start(static_cast<std::size_t>(threads));
    std::vector<Clock::time_point> end(static_cast<std::size_t>(threads));
    parallel_for(threads, 1, [&](std::int64_t begin, std::int64_t) {
        const auto t = static_cast<std::size_t>(begin);
        arrived.fetch_add(1);
        const auto give_up = Clock::now() + std::chrono::seconds(10);
        while (arrived.load() < threads && !failed.load()) {
            if (Clock::now() > give_up) failed.store(true);
            std::this_thread::yield();
        }
        if (failed.load()) return;
        start[t] = Clock::now();
        body(static_cast<int>(t));
        end[t] = Clock::now();
    });
    MOELB_CHECK(!failed.load(), "measure_machine_limits could not run "
                                    << threads << " threads together (get_num_threads()="
                                    << get_num_threads() << "; called inside a parallel loop?)");
    const auto first = *std::min_element(start.begin(), start.end());
    const auto last = *std::max_element(end.begin(), end.end());
    return std::chrono::duration<double>(last - first).count();
}

struct AlignedDelete {
    void operator()(float* p) const { ::operator delete (p, std::align_val_t{64}); }
};

}  // namespace

MachineLimits measure_machine_limits(const MachineLimitsOptions& options) {
    const int threads = options.threads;
    MOELB_CHECK_ARG(threads >= 1, "threads must be >= 1, got " << threads);
    MOELB_CHECK_ARG(threads <= get_num_threads(),
                    "threads=" << threads << " exceeds get_num_threads()=" << get_num_threads()
                               << " (set_num_threads raises it)");
    MOELB_CHECK_ARG(options.buffer_bytes >= (std::int64_t{1} << 20),
                    "buffer_bytes must be >= 1 MiB (1048576), got " << options.buffer_bytes);
    MOELB_CHECK_ARG(options.passes >= 1, "passes must be >= 1, got " << options.passes);
    MOELB_CHECK_ARG(std::isfinite(options.seconds) && options.seconds >= 1e-3,
                    "seconds must be finite and >= 0.001 (shorter passes time the clock, not the "
                    "loop), got "
                        << options.seconds);
    const isa::Kernels& K = isa::kernels();

    MachineLimits out;
    out.threads = threads;
    out.cpu_isa = std::string(to_string(cpu_isa()));
    out.bf16_dot_method = K.bf16_dot_method();
    out.passes = options.passes;

    // Read bandwidth: each thread sums its share (whole 64-float blocks).
    const std::int64_t per_thread =
        options.buffer_bytes / static_cast<std::int64_t>(sizeof(float)) / threads / 64 * 64;
    out.buffer_bytes = per_thread * threads * static_cast<std::int64_t>(sizeof(float));
    std::unique_ptr<float, AlignedDelete> buffer(static_cast<float*>(
        ::operator new (static_cast<std::size_t>(out.buffer_bytes), std::align_val_t{64})));
    float* data = buffer.get();
    run_together(threads, [&](int t) {  // first touch by the thread that reads it
        float* part = data + t * per_thread;
        for (std::int64_t i = 0; i < per_thread; ++i) part[i] = static_cast<float>(i % 3);
    });
    std::vector<double> sums(static_cast<std::size_t>(threads));
    double checksum = 0.0;
    for (int p = 0; p < options.passes; ++p) {
        const double s = run_together(threads, [&](int t) {
            sums[static_cast<std::size_t>(t)] = K.read_sum(data + t * per_thread, per_thread);
        });
        for (const double v : sums) checksum += v;
        out.read_bandwidth_gbs =
            std::max(out.read_bandwidth_gbs, static_cast<double>(out.buffer_bytes) / s / 1e9);
    }
    buffer.reset();

    // FMA and bf16 loops: iterations calibrated on one thread to about `seconds`.
    using Loop = std::int64_t (*)(std::int64_t, float, float*);
    const auto peak = [&](Loop loop) {
        float sink = 0.0f;
        std::int64_t iterations = 1000;
        for (;;) {
            const auto t0 = Clock::now();
            loop(iterations, 0.999f, &sink);
            const double s = std::chrono::duration<double>(Clock::now() - t0).count();
            if (s >= 0.02 || iterations > (std::int64_t{1} << 40)) {
                iterations = std::max<std::int64_t>(
                    1, static_cast<std::int64_t>(static_cast<double>(iterations) * options.seconds /
                                                 std::max(s, 1e-9)));
                break;
            }
            iterations *= 4;
        }
        std::vector<std::int64_t> flops(static_cast<std::size_t>(threads));
        std::vector<float> sinks(static_cast<std::size_t>(threads));
        double best = 0.0;
        for (int p = 0; p < options.passes; ++p) {
            const double s = run_together(threads, [&](int t) {
                const auto i = static_cast<std::size_t>(t);
                flops[i] = loop(iterations, 0.999f - 0.001f * static_cast<float>(t), &sinks[i]);
            });
            double total = 0.0;
            for (std::size_t i = 0; i < flops.size(); ++i) {
                total += static_cast<double>(flops[i]);
                checksum += sinks[i];
            }
            best = std::max(best, total / s / 1e9);
        }
        return best;
    };
    out.fma_peak_gflops = peak(K.fma_loop);
    out.bf16_dot_peak_gflops = peak(K.bf16_dot_loop);
    // The sums are used (a NaN would mean the loops computed garbage).
    MOELB_CHECK(std::isfinite(checksum), "machine-limit loops returned a non-finite checksum");
    return out;
}

}  // namespace moelb
