// The vector instruction set of the hot kernels (docs/architecture.md, "Portable build and ISA
// dispatch"). A portable build (MOELB_NATIVE=OFF, the default) compiles the kernels that gain from
// wider vectors -- routing scores and top-k, the MoE layer's GEMMs and SwiGLU -- once per path and
// picks one at run time from the CPU: "avx512_bf16" (avx512 and AVX512_BF16: the bf16-activation
// GEMMs use vdpbf16ps; compiled only with -DMOELB_ISA_AVX512_BF16=ON until verified on such a
// CPU), else "avx512" (x86-64-v4: AVX-512 F/BW/CD/DQ/VL, and the OS saves the
// AVX-512 state), else "avx2" (x86-64-v3: AVX2, FMA, BMI2, F16C, and the OS saves the AVX
// state), else "baseline" (the target's base ISA: SSE2 on x86-64; NEON on aarch64). Everything
// else is compiled for the base ISA. A MOELB_NATIVE=ON build compiles everything, the kernels
// included, for the build machine (-march=native) and has the single path "native".
//
// Paths may differ in float rounding (FMA contracts, packet widths, Eigen's GEMM blocking), never
// in what a kernel computes; for a fixed path results are identical for any thread count.
#pragma once

#include <string_view>
#include <vector>

namespace moelb {

enum class CpuIsa {
    kBaseline,    // "baseline"
    kAvx2,        // "avx2"
    kAvx512,      // "avx512"
    kAvx512Bf16,  // "avx512_bf16": avx512's kernels, and vdpbf16ps where x is bf16
    kNative,      // "native": a MOELB_NATIVE=ON build's only path
};

// "baseline", "avx2", "avx512", "avx512_bf16", "native".
std::string_view to_string(CpuIsa isa);
// The path named `name`; InvalidArgument naming `param` for an unknown name.
CpuIsa parse_cpu_isa(std::string_view name, std::string_view param);

// The paths compiled into this build, in ascending order of width.
std::vector<CpuIsa> compiled_cpu_isas();
// The compiled paths this CPU (and its OS) can run, in ascending order of width.
std::vector<CpuIsa> available_cpu_isas();

// The path the kernels use. The first call chooses it: the environment variable MOELB_ISA when set
// to a path name (an InvalidArgument if this build or CPU lacks that path; "auto" or empty: the
// widest), else the widest available path. Thread-safe.
CpuIsa cpu_isa();
// Switches the kernels to `isa` (for tests and benchmarks); an InvalidArgument naming the missing
// instructions if this build or CPU lacks it. An operation already running finishes on the path it
// started with. Thread-safe.
void set_cpu_isa(CpuIsa isa);

}  // namespace moelb
