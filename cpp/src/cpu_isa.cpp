// The choice of the kernels' ISA path (moelb/cpu_isa.hpp): what this build compiled
// (MOELB_ISA_HAVE_* from CMakeLists.txt), what the CPU and OS support (CPUID and XGETBV), the
// MOELB_ISA override, and the kernel table the core calls (isa/kernels.hpp).
#include "moelb/cpu_isa.hpp"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <string>

#include "enum_names.hpp"
#include "isa/kernels.hpp"
#include "moelb/errors.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define MOELB_X86_CPUID 1
#endif

namespace moelb {
namespace {

constexpr detail::EnumNames<CpuIsa, 5> kIsaNames{{
    {"baseline", CpuIsa::kBaseline},
    {"avx2", CpuIsa::kAvx2},
    {"avx512", CpuIsa::kAvx512},
    {"avx512_bf16", CpuIsa::kAvx512Bf16},
    {"native", CpuIsa::kNative},
}};

// A feature the path needs, and whether this CPU (and OS) has it.
struct Feature {
    const char* name;
    bool present;
};

#if defined(MOELB_X86_CPUID)
std::uint64_t xgetbv0() {
    std::uint32_t eax = 0, edx = 0;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return (static_cast<std::uint64_t>(edx) << 32) | eax;
}

// The features of x86-64-v3 (avx2) and x86-64-v4 (avx512) -- the -march levels the paths are
// compiled for -- and v4 with AVX512_BF16 (avx512_bf16), and the OS saving the vector registers'
// state (XCR0) on context switches.
struct X86Features {
    std::vector<Feature> v3, v4, v4_bf16;

    X86Features() {
        unsigned a = 0, b = 0, c = 0, d = 0;
        unsigned c1 = 0, b7 = 0, cx = 0, a71 = 0;
        if (__get_cpuid(1, &a, &b, &c, &d)) c1 = c;
        if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
            b7 = b;
            const unsigned subleaves = a;  // leaf 7's largest sub-leaf
            if (subleaves >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) a71 = a;
        }
        if (__get_cpuid(0x80000001u, &a, &b, &c, &d)) cx = c;
        const auto bit = [](unsigned reg, int i) { return ((reg >> i) & 1u) != 0; };
        const bool osxsave = bit(c1, 27);
        const std::uint64_t xcr0 = osxsave ? xgetbv0() : 0;
        v3 = {{"sse3", bit(c1, 0)},
              {"ssse3", bit(c1, 9)},
              {"sse4.1", bit(c1, 19)},
              {"sse4.2", bit(c1, 20)},
              {"popcnt", bit(c1, 23)},
              {"cx16", bit(c1, 13)},
              {"lahf_lm", bit(cx, 0)},
              {"avx", bit(c1, 28)},
              {"avx2", bit(b7, 5)},
              {"fma", bit(c1, 12)},
              {"f16c", bit(c1, 29)},
              {"bmi1", bit(b7, 3)},
              {"bmi2", bit(b7, 8)},
              {"lzcnt", bit(cx, 5)},
              {"movbe", bit(c1, 22)},
              {"osxsave", osxsave},
              {"OS support of the AVX state (XCR0 bits 1-2)", (xcr0 & 0x6) == 0x6}};
        v4 = v3;
        v4.insert(v4.end(),
                  {{"avx512f", bit(b7, 16)},
                   {"avx512bw", bit(b7, 30)},
                   {"avx512cd", bit(b7, 28)},
                   {"avx512dq", bit(b7, 17)},
                   {"avx512vl", bit(b7, 31)},
                   {"OS support of the AVX-512 state (XCR0 bits 5-7)", (xcr0 & 0xE0) == 0xE0}});
        v4_bf16 = v4;
        v4_bf16.push_back({"avx512_bf16", bit(a71, 5)});
    }
};

const X86Features& x86_features() {
    static const X86Features features;
    return features;
}
#endif

// The features `isa` needs that this CPU lacks (empty: it can run the path).
std::vector<std::string> missing_features(CpuIsa isa) {
    std::vector<std::string> missing;
    const auto collect = [&](const std::vector<Feature>& needed) {
        for (const Feature& f : needed) {
            if (!f.present) missing.emplace_back(f.name);
        }
    };
    switch (isa) {
        case CpuIsa::kBaseline:
        case CpuIsa::kNative:  // built for this machine; the build's own business
            break;
        case CpuIsa::kAvx2:
#if defined(MOELB_X86_CPUID)
            collect(x86_features().v3);
#else
            missing.emplace_back("an x86-64 CPU");
#endif
            break;
        case CpuIsa::kAvx512:
#if defined(MOELB_X86_CPUID)
            collect(x86_features().v4);
#else
            missing.emplace_back("an x86-64 CPU");
#endif
            break;
        case CpuIsa::kAvx512Bf16:
#if defined(MOELB_X86_CPUID)
            collect(x86_features().v4_bf16);
#else
            missing.emplace_back("an x86-64 CPU");
#endif
            break;
    }
    return missing;
}

// The paths this build compiled, narrowest first, with their tables' getters. Availability reads
// this list, never a table: a path's code (the avx512_bf16 table is built on its first use) may
// run only on a CPU that has the path.
struct CompiledPath {
    CpuIsa isa;
    const isa::Kernels& (*kernels)();
};
constexpr CompiledPath kCompiledPaths[] = {
#if defined(MOELB_ISA_HAVE_BASELINE)
    {CpuIsa::kBaseline, &isa_baseline::kernels},
#endif
#if defined(MOELB_ISA_HAVE_AVX2)
    {CpuIsa::kAvx2, &isa_avx2::kernels},
#endif
#if defined(MOELB_ISA_HAVE_AVX512)
    {CpuIsa::kAvx512, &isa_avx512::kernels},
#endif
#if defined(MOELB_ISA_HAVE_AVX512_BF16)
    {CpuIsa::kAvx512Bf16, &isa_avx512_bf16::kernels},
#endif
#if defined(MOELB_ISA_HAVE_NATIVE)
    {CpuIsa::kNative, &isa_native::kernels},
#endif
};

const CompiledPath* find_compiled(CpuIsa isa) {
    for (const CompiledPath& p : kCompiledPaths) {
        if (p.isa == isa) return &p;
    }
    return nullptr;
}
bool compiled(CpuIsa isa) { return find_compiled(isa) != nullptr; }

// The kernel table of a compiled path that this CPU runs.
const isa::Kernels* table(CpuIsa isa) { return &find_compiled(isa)->kernels(); }

std::string join(const std::vector<std::string>& names) {
    std::ostringstream os;
    for (std::size_t i = 0; i < names.size(); ++i) os << (i > 0 ? ", " : "") << names[i];
    return os.str();
}

std::string path_names(const std::vector<CpuIsa>& isas) {
    std::vector<std::string> names;
    for (const CpuIsa isa : isas) names.emplace_back(to_string(isa));
    return join(names);
}

// Throws an InvalidArgument (naming `what`, e.g. "MOELB_ISA=avx512") unless `isa` can run here.
void check_runnable(CpuIsa isa, const std::string& what) {
    MOELB_CHECK_ARG(compiled(isa),
                    what << ": this build has no " << to_string(isa) << " path; it has "
                         << path_names(compiled_cpu_isas())
                         << " (MOELB_NATIVE=" << (compiled(CpuIsa::kNative) ? "ON" : "OFF") << ")");
    const std::vector<std::string> missing = missing_features(isa);
    MOELB_CHECK_ARG(missing.empty(), what << ": this CPU cannot run the " << to_string(isa)
                                          << " path; it lacks " << join(missing)
                                          << "; available: " << path_names(available_cpu_isas()));
}

std::mutex g_mutex;
std::atomic<const isa::Kernels*> g_kernels{nullptr};
std::atomic<CpuIsa> g_isa{CpuIsa::kBaseline};

void select(CpuIsa isa) {
    g_isa.store(isa);
    g_kernels.store(table(isa));
}

// The first choice: MOELB_ISA, else the widest available path. Called under g_mutex.
void choose_initial() {
    const char* env = std::getenv("MOELB_ISA");
    const std::string name = env != nullptr ? env : "";
    if (name.empty() || name == "auto") {
        select(available_cpu_isas().back());
        return;
    }
    const CpuIsa isa = detail::parse_enum(kIsaNames, name, "MOELB_ISA", "an ISA path");
    check_runnable(isa, "MOELB_ISA=" + name);
    select(isa);
}

}  // namespace

std::string_view to_string(CpuIsa isa) { return detail::enum_name(kIsaNames, isa); }

CpuIsa parse_cpu_isa(std::string_view name, std::string_view param) {
    return detail::parse_enum(kIsaNames, name, param, "an ISA path");
}

std::vector<CpuIsa> compiled_cpu_isas() {
    std::vector<CpuIsa> out;
    for (const CompiledPath& p : kCompiledPaths) out.push_back(p.isa);
    return out;
}

std::vector<CpuIsa> available_cpu_isas() {
    std::vector<CpuIsa> out;
    for (const CpuIsa isa : compiled_cpu_isas()) {
        if (missing_features(isa).empty()) out.push_back(isa);
    }
    return out;
}

CpuIsa cpu_isa() {
    isa::kernels();  // makes the first choice
    return g_isa.load();
}

void set_cpu_isa(CpuIsa isa) {
    check_runnable(isa, "set_cpu_isa('" + std::string(to_string(isa)) + "')");
    const std::lock_guard lock(g_mutex);
    select(isa);
}

namespace isa {

const Kernels& kernels() {
    const Kernels* k = g_kernels.load();
    if (k == nullptr) [[unlikely]] {
        const std::lock_guard lock(g_mutex);
        if (g_kernels.load() == nullptr) choose_initial();
        k = g_kernels.load();
    }
    return *k;
}

}  // namespace isa
}  // namespace moelb
