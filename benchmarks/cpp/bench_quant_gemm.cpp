// The quantised-weight GEMM (cpp/src/isa/quant_kernels.cpp) against Eigen's float32 GEMM on the
// same shapes and against this machine's measured limits (moelb/machine_limits.hpp), without
// Python: y [m, n] = x [m, k] * W [n, k]^T, W 4096 x 7168 (DeepSeek-V3's gate/up projection of one
// expert, k = hidden) in float32 / bf16 / fp8 E4M3 (128 x 128 block scales) / int8 (row scales),
// x float32 or bf16. Decode (m = 1, 4, 16, 64): GB/s of weight bytes (with scales) read per second
// against the read bandwidth; prefill (m = 128, 512): GFLOP/s (2 m n k) against the FMA and
// bf16-dot peaks. Columns split evenly between the threads (each with its own scratch), as the
// layer does. Each weight matrix has enough copies (>= 256 MiB together) that every call reads
// its weights from memory, not from the last-level cache. Median of `repeats` calls; "cpu ms" is
// the busiest thread's CPU time (below "ms" when other processes took the cores meanwhile).
//
//   cmake -S . -B build/bench -G Ninja -DMOELB_BUILD_BENCHMARKS=ON && ninja -C build/bench
//   ./build/bench/moelb_bench_quant_gemm [threads [repeats [filter]]]
//
// filter: a substring of the case name ("decode", "prefill", "bf16", "m=16", ...).
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "isa/kernels.hpp"
#include "moelb/cpu_isa.hpp"
#include "moelb/machine_limits.hpp"
#include "moelb/parallel.hpp"

namespace {

using moelb::isa::ActivationType;
using moelb::isa::Index;
using moelb::isa::QuantGemmArgs;
using moelb::isa::WeightType;
using Clock = std::chrono::steady_clock;

constexpr Index kN = 4096, kK = 7168, kBlock = 128;
constexpr std::size_t kMinBytes = std::size_t{256} << 20;

struct WeightSet {
    WeightType type;
    const char* name;
    std::size_t bytes_per_weight;
    std::vector<std::vector<unsigned char>> copies;
    std::vector<float> scale_inv;
    std::size_t weight_bytes() const {  // one copy, scales included
        return static_cast<std::size_t>(kN * kK) * bytes_per_weight +
               scale_inv.size() * sizeof(float);
    }
};

WeightSet make_weights(WeightType type, const char* name, std::size_t bytes, std::mt19937& gen) {
    WeightSet w{type, name, bytes, {}, {}};
    const std::size_t size = static_cast<std::size_t>(kN * kK) * bytes;
    const std::size_t copies = std::max<std::size_t>(2, (kMinBytes + size - 1) / size);
    for (std::size_t c = 0; c < copies; ++c) {
        std::vector<unsigned char> data(size);
        for (std::size_t i = 0; i < size; i += 4) {
            const std::uint32_t r = gen();
            std::memcpy(&data[i], &r, 4);
        }
        if (type == WeightType::kFloat32) {  // finite, moderate values
            auto* f = reinterpret_cast<float*>(data.data());
            for (Index i = 0; i < kN * kK; ++i) f[i] = static_cast<float>(gen() % 2001) * 1e-3f - 1;
        } else if (type == WeightType::kBfloat16) {
            auto* h = reinterpret_cast<std::uint16_t*>(data.data());
            for (Index i = 0; i < kN * kK; ++i)
                h[i] = static_cast<std::uint16_t>(0x3F00 | (h[i] & 0x80FF));
        } else if (type == WeightType::kFp8E4m3) {
            for (auto& b : data) {
                if ((b & 0x7F) == 0x7F) b = 0x3F;
            }
        }
        w.copies.push_back(std::move(data));
    }
    if (type == WeightType::kFp8E4m3) {
        w.scale_inv.assign(
            static_cast<std::size_t>(((kN + kBlock - 1) / kBlock) * ((kK + kBlock - 1) / kBlock)),
            0.01f);
    } else if (type == WeightType::kInt8) {
        w.scale_inv.assign(static_cast<std::size_t>(kN), 0.01f);
    }
    return w;
}

// The calling thread's CPU time in seconds: with the wall time, how much of a call other
// processes took (this machine is shared).
double thread_cpu_seconds() {
    timespec t{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
    const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
    const int repeats = argc > 2 ? std::atoi(argv[2]) : 7;
    const std::string filter = argc > 3 ? argv[3] : "";
    moelb::set_num_threads(threads);
    const auto& K = moelb::isa::kernels();

    // The read bandwidth over a 256 MiB buffer (8x this machine's 32 MiB L3; the weights here are
    // 29-117 MiB a copy): the default 1 GiB buffer reads about 20% slower on this VM (its page
    // tables, 2 MiB with 4 KiB pages, stop fitting the caches), which made the percentages
    // overstate; Eigen's float32 GEMV streams faster than the 1 GiB figure.
    moelb::MachineLimitsOptions lo;
    lo.threads = threads;
    lo.buffer_bytes = std::int64_t{256} << 20;
    const moelb::MachineLimits lim = moelb::measure_machine_limits(lo);
    std::printf(
        "path %s, %d thread(s): read %.2f GB/s, fma peak %.1f GFLOP/s, bf16-dot peak %.1f "
        "GFLOP/s (%s)\n",
        lim.cpu_isa.c_str(), threads, lim.read_bandwidth_gbs, lim.fma_peak_gflops,
        lim.bf16_dot_peak_gflops, lim.bf16_dot_method.c_str());

    std::mt19937 gen(7);
    std::vector<WeightSet> sets;
    sets.push_back(make_weights(WeightType::kFloat32, "float32", 4, gen));
    sets.push_back(make_weights(WeightType::kBfloat16, "bfloat16", 2, gen));
    sets.push_back(make_weights(WeightType::kFp8E4m3, "fp8_e4m3", 1, gen));
    sets.push_back(make_weights(WeightType::kInt8, "int8", 1, gen));

    std::printf("%-34s %9s %9s %8s %8s %8s %8s %8s\n", "case", "ms", "cpu ms", "GB/s", "GFLOP/s",
                "%read", "%fma", "%bf16");
    for (const Index m : {1, 4, 16, 64, 128, 512}) {
        const bool decode = m <= 64;
        std::vector<float> xf(static_cast<std::size_t>(m * kK));
        for (auto& v : xf) v = static_cast<float>(gen() % 2001) * 1e-3f - 1;
        std::vector<std::uint16_t> xb(xf.size());
        for (std::size_t i = 0; i < xf.size(); ++i) {
            std::uint32_t u;
            std::memcpy(&u, &xf[i], 4);
            xb[i] = static_cast<std::uint16_t>(u >> 16);
        }
        std::vector<float> y(static_cast<std::size_t>(m * kN));
        const std::size_t scratch_bytes = K.quant_gemm_scratch_bytes(m, kK);
        std::vector<std::vector<unsigned char>> scratch(static_cast<std::size_t>(threads),
                                                        std::vector<unsigned char>(scratch_bytes));
        const Index cols_per_thread = (kN + threads - 1) / threads;

        // GB/s of weights and GFLOP/s on the wall time (percentages of the limits measured at the
        // start), and the busiest thread's CPU time (cpu ms: less than ms when other processes
        // took the cores meanwhile).
        const auto report = [&](const std::string& name, double seconds, double cpu_seconds,
                                double bytes) {
            const double gbs = bytes / seconds / 1e9;
            const double gflops = 2.0 * static_cast<double>(m * kN * kK) / seconds / 1e9;
            std::printf("%-34s %9.3f %9.3f %8.2f %8.1f %7.0f%% %7.0f%% %7.0f%%\n", name.c_str(),
                        seconds * 1e3, cpu_seconds * 1e3, gbs, gflops,
                        100 * gbs / lim.read_bandwidth_gbs, 100 * gflops / lim.fma_peak_gflops,
                        100 * gflops / lim.bf16_dot_peak_gflops);
            std::fflush(stdout);
        };
        const std::string phase = decode ? "decode" : "prefill";
        for (const WeightSet& w : sets) {
            for (const ActivationType xt : {ActivationType::kFloat32, ActivationType::kBfloat16}) {
                const std::string name = phase + " m=" + std::to_string(m) + " W " + w.name +
                                         " x " +
                                         (xt == ActivationType::kFloat32 ? "float32" : "bfloat16");
                if (name.find(filter) == std::string::npos) continue;
                std::vector<double> times, busy;
                std::vector<double> cpu(static_cast<std::size_t>(threads));
                for (int r = 0; r < repeats + 1; ++r) {
                    const auto& data = w.copies[static_cast<std::size_t>(r) % w.copies.size()];
                    const auto t0 = Clock::now();
                    moelb::parallel_for(threads, 1, [&](std::int64_t t, std::int64_t) {
                        const double c0 = thread_cpu_seconds();
                        QuantGemmArgs a;
                        a.x = xt == ActivationType::kFloat32 ? static_cast<const void*>(xf.data())
                                                             : static_cast<const void*>(xb.data());
                        a.x_type = xt;
                        a.m = m;
                        a.x_stride = kK;
                        a.w.type = w.type;
                        a.w.data = data.data();
                        a.w.rows = kN;
                        a.w.cols = kK;
                        a.w.scale_inv = w.scale_inv.empty() ? nullptr : w.scale_inv.data();
                        a.w.block_rows = kBlock;
                        a.w.block_cols = kBlock;
                        a.n_begin = std::min(kN, t * cols_per_thread);
                        a.n_end = std::min(kN, (t + 1) * cols_per_thread);
                        a.y = y.data();
                        a.y_stride = kN;
                        a.scratch = scratch[static_cast<std::size_t>(t)].data();
                        a.scratch_bytes = scratch_bytes;
                        K.quant_gemm(a);
                        cpu[static_cast<std::size_t>(t)] = thread_cpu_seconds() - c0;
                    });
                    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
                    if (r > 0) {  // the first call warms up
                        times.push_back(s);
                        busy.push_back(*std::max_element(cpu.begin(), cpu.end()));
                    }
                }
                report(name, median(times), median(busy), static_cast<double>(w.weight_bytes()));
            }
        }
        // Eigen's float32 GEMM as the MoE layer runs it (the kernel table's gate_rows: Eigen
        // compiled for the same ISA path), the same column split, each thread's block of y apart.
        const std::string name = phase + " m=" + std::to_string(m) + " eigen float32";
        if (name.find(filter) == std::string::npos) continue;
        const WeightSet& w = sets[0];
        std::vector<std::vector<float>> y_blocks(
            static_cast<std::size_t>(threads),
            std::vector<float>(static_cast<std::size_t>(m * cols_per_thread)));
        std::vector<double> times, busy;
        std::vector<double> cpu(static_cast<std::size_t>(threads));
        for (int r = 0; r < repeats + 1; ++r) {
            const auto& data = w.copies[static_cast<std::size_t>(r) % w.copies.size()];
            const auto t0 = Clock::now();
            moelb::parallel_for(threads, 1, [&](std::int64_t t, std::int64_t) {
                const double c0 = thread_cpu_seconds();
                const Index n0 = std::min(kN, t * cols_per_thread);
                const Index n1 = std::min(kN, (t + 1) * cols_per_thread);
                K.gate_rows(xf.data(), m, kK, reinterpret_cast<const float*>(data.data()) + n0 * kK,
                            n1 - n0, y_blocks[static_cast<std::size_t>(t)].data());
                cpu[static_cast<std::size_t>(t)] = thread_cpu_seconds() - c0;
            });
            const double s = std::chrono::duration<double>(Clock::now() - t0).count();
            if (r > 0) {
                times.push_back(s);
                busy.push_back(*std::max_element(cpu.begin(), cpu.end()));
            }
        }
        report(name, median(times), median(busy), static_cast<double>(w.weight_bytes()));
    }
    return 0;
}
