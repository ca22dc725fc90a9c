// What this machine can do, measured (benchmarks/README.md compares the MoE layer's kernels with
// it): a STREAM-like read bandwidth, the float32 FMA peak and the bf16 dot-product peak, each on
// `threads` threads running together, best of several passes. The loops are ISA kernels
// (cpp/src/isa/limits_kernels.cpp) of the path in use (moelb/cpu_isa.hpp): the limits of what that
// path can use, not of the silicon.
#pragma once

#include <cstdint>
#include <string>

namespace moelb {

struct MachineLimitsOptions {
    // Threads that run each measurement together, one moelb::parallel_for chunk each; >= 1 and
    // at most get_num_threads().
    int threads = 1;
    // The read-bandwidth buffer: much larger than the last-level cache (>= 1 MiB), split evenly
    // between the threads; written once before the passes.
    std::int64_t buffer_bytes = std::int64_t{256} << 20;
    // Each figure is the best of this many passes (>= 1).
    int passes = 5;
    // The length of one FMA or bf16-dot pass, in seconds (>= 1e-3; calibrated once).
    double seconds = 0.1;
};

struct MachineLimits {
    int threads = 0;
    std::string cpu_isa;  // the kernels' path that ran the loops
    // Bytes read per second (1e9 bytes), summing the buffer with vector loads: each thread reads
    // its contiguous share once per pass (on the AVX paths as 8 streams in lockstep, as the GEMV
    // kernels read several weight rows); time from a common start to the last thread's end.
    double read_bandwidth_gbs = 0.0;
    // float32 FMAs on independent chains (enough to cover the latency), 2 flops per lane, in
    // 1e9 flops per second; on a path without FMA (baseline), a multiply and an add.
    double fma_peak_gflops = 0.0;
    // bf16 x bf16 -> float32 products, 2 flops each, as the path does them on this CPU (see
    // bf16_dot_method): vdpbf16ps on the avx512_bf16 path, else one bf16
    // operand read from L1 and widened to float32 in registers, multiplied by a float32 one with
    // FMA (a bf16-weight GEMM's inner loop).
    double bf16_dot_peak_gflops = 0.0;
    std::string bf16_dot_method;
    std::int64_t buffer_bytes = 0;  // as used (rounded down to whole vectors per thread)
    int passes = 0;
};

// Runs the three measurements (about passes * (2 * seconds + buffer_bytes / bandwidth) plus the
// buffer's first write). InvalidArgument naming the option for bad options; Error if the threads
// could not be started together (e.g. when called from inside a parallel loop).
MachineLimits measure_machine_limits(const MachineLimitsOptions& options = {});

}  // namespace moelb
