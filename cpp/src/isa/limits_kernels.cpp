// The machine-limit microbenchmarks' loops of one ISA path (isa/kernels.hpp; compiled once per
// path; moelb/machine_limits.hpp times them): a streaming sum, independent FMA chains, and bf16 dot
// products. Their results feed a sink the caller keeps, so no compiler can drop the work; their
// operands are runtime values, so none can fold it.
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#define MOELB_LIMITS_VEC 512
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MOELB_LIMITS_VEC 256
#elif defined(__SSE2__)
#include <emmintrin.h>
#define MOELB_LIMITS_VEC 128
#else
#define MOELB_LIMITS_VEC 0
#endif
#if defined(__AVX512BF16__)
#define MOELB_LIMITS_AVX512_BF16 1  // the avx512_bf16 path
#endif

#include "kernels.hpp"

namespace moelb::MOELB_ISA_NS {
namespace {

using isa::Index;

// bf16 dot products read one operand from a buffer of this many values, small enough for L1.
constexpr int kDotValues = 4096;

std::uint16_t bf16_bits(float v) {
    std::uint32_t u = 0;
    __builtin_memcpy(&u, &v, 4);
    return static_cast<std::uint16_t>(u >> 16);  // truncation: any bf16 will do
}

#if defined(MOELB_LIMITS_AVX512_BF16)
// 32 bf16 products per vdpbf16ps: 16 lanes, each the sum of two products added to the lane.
std::int64_t dot_avx512_bf16(std::int64_t iterations, float seed, float* sink) {
    alignas(64) std::uint16_t a[kDotValues];
    for (int t = 0; t < kDotValues; ++t) a[t] = bf16_bits(seed + static_cast<float>(t % 7) * 0.01f);
    const __m512i b_bits = _mm512_set1_epi16(static_cast<short>(bf16_bits(seed * 0.001f)));
    __m512bh b;
    __builtin_memcpy(&b, &b_bits, sizeof(b));
    constexpr int kChains = 16;
    __m512 acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_setzero_ps();
    for (std::int64_t it = 0; it < iterations; ++it) {
        for (int t = 0; t < kDotValues; t += 32 * kChains) {
#pragma GCC unroll 16
            for (int c = 0; c < kChains; ++c) {
                __m512bh v;
                const __m512i raw = _mm512_load_si512(a + t + 32 * c);
                __builtin_memcpy(&v, &raw, sizeof(v));
                acc[c] = _mm512_dpbf16_ps(acc[c], v, b);
            }
        }
    }
    __m512 s = acc[0];
    for (int c = 1; c < kChains; ++c) s = _mm512_add_ps(s, acc[c]);
    *sink = _mm512_reduce_add_ps(s);
    return iterations * kDotValues * 2;
}
#endif

}  // namespace

// Eight streams at once (the share cut into eighths, read in lockstep), as the GEMV-like kernels
// read several rows: on this machine (4 KiB pages, hardware prefetch that stops at page ends) one
// stream alone reads about 10% slower.
double read_sum(const float* data, Index n) {
#if MOELB_LIMITS_VEC >= 256
    constexpr int kStreams = 8;
    const Index part = n / 64 / kStreams * 64;  // whole 64-float blocks per stream
    __m256 acc[kStreams];
    for (int j = 0; j < kStreams; ++j) acc[j] = _mm256_setzero_ps();
    for (Index i = 0; i < part; i += 16) {
#pragma GCC unroll 8
        for (int j = 0; j < kStreams; ++j) {
            const float* p = data + j * part + i;
            acc[j] = _mm256_add_ps(acc[j], _mm256_add_ps(_mm256_load_ps(p), _mm256_load_ps(p + 8)));
        }
    }
    for (Index i = kStreams * part; i < n; i += 8) {
        acc[0] = _mm256_add_ps(acc[0], _mm256_load_ps(data + i));
    }
    __m256 s = acc[0];
    for (int j = 1; j < kStreams; ++j) s = _mm256_add_ps(s, acc[j]);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, s);
#elif MOELB_LIMITS_VEC == 128
    __m128 a0 = _mm_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (Index i = 0; i < n; i += 32) {
        a0 = _mm_add_ps(a0, _mm_load_ps(data + i));
        a1 = _mm_add_ps(a1, _mm_load_ps(data + i + 4));
        a2 = _mm_add_ps(a2, _mm_load_ps(data + i + 8));
        a3 = _mm_add_ps(a3, _mm_load_ps(data + i + 12));
        a4 = _mm_add_ps(a4, _mm_load_ps(data + i + 16));
        a5 = _mm_add_ps(a5, _mm_load_ps(data + i + 20));
        a6 = _mm_add_ps(a6, _mm_load_ps(data + i + 24));
        a7 = _mm_add_ps(a7, _mm_load_ps(data + i + 28));
    }
    const __m128 s = _mm_add_ps(_mm_add_ps(_mm_add_ps(a0, a1), _mm_add_ps(a2, a3)),
                                _mm_add_ps(_mm_add_ps(a4, a5), _mm_add_ps(a6, a7)));
    alignas(16) float lanes[4];
    _mm_store_ps(lanes, s);
#else
    float lanes[8] = {};
    for (Index i = 0; i < n; i += 8) {
        for (int l = 0; l < 8; ++l) lanes[l] += data[i + l];
    }
#endif
    double total = 0.0;
    for (const float v : lanes) total += v;
    return total;
}

// Chains: enough independent FMAs in flight to cover the FMA latency (4 cycles) of 2 units.
std::int64_t fma_loop(std::int64_t iterations, float seed, float* sink) {
    // acc = acc * a + b converges to b / (1 - a): finite, never denormal.
    const float av = seed, bv = seed * 0.5f;
#if MOELB_LIMITS_VEC == 512
    constexpr int kChains = 16, kWidth = 16;
    const __m512 a = _mm512_set1_ps(av), b = _mm512_set1_ps(bv);
    __m512 acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(static_cast<float>(c));
    for (std::int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 16
        for (int c = 0; c < kChains; ++c) acc[c] = _mm512_fmadd_ps(acc[c], a, b);
    }
    __m512 s = acc[0];
    for (int c = 1; c < kChains; ++c) s = _mm512_add_ps(s, acc[c]);
    *sink = _mm512_reduce_add_ps(s);
#elif MOELB_LIMITS_VEC == 256
    constexpr int kChains = 12, kWidth = 8;
    const __m256 a = _mm256_set1_ps(av), b = _mm256_set1_ps(bv);
    __m256 acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = _mm256_set1_ps(static_cast<float>(c));
    for (std::int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 12
        for (int c = 0; c < kChains; ++c) acc[c] = _mm256_fmadd_ps(acc[c], a, b);
    }
    alignas(32) float lanes[8];
    __m256 s = acc[0];
    for (int c = 1; c < kChains; ++c) s = _mm256_add_ps(s, acc[c]);
    _mm256_store_ps(lanes, s);
    float total = 0.0f;
    for (const float v : lanes) total += v;
    *sink = total;
#elif MOELB_LIMITS_VEC == 128
    // No FMA: a multiply and an add per lane (still 2 flops).
    constexpr int kChains = 12, kWidth = 4;
    const __m128 a = _mm_set1_ps(av), b = _mm_set1_ps(bv);
    __m128 acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = _mm_set1_ps(static_cast<float>(c));
    for (std::int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 12
        for (int c = 0; c < kChains; ++c) acc[c] = _mm_add_ps(_mm_mul_ps(acc[c], a), b);
    }
    alignas(16) float lanes[4];
    __m128 s = acc[0];
    for (int c = 1; c < kChains; ++c) s = _mm_add_ps(s, acc[c]);
    _mm_store_ps(lanes, s);
    *sink = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#else
    constexpr int kChains = 8, kWidth = 1;
    float acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = static_cast<float>(c);
    for (std::int64_t it = 0; it < iterations; ++it) {
        for (int c = 0; c < kChains; ++c) acc[c] = acc[c] * av + bv;
    }
    float total = 0.0f;
    for (const float v : acc) total += v;
    *sink = total;
#endif
    return iterations * kChains * kWidth * 2;
}

// vdpbf16ps on the avx512_bf16 path; elsewhere one operand read from L1 as bf16 and widened in
// registers (a shift for the even values, a mask for the odd ones), the other float32 in registers
// -- a bf16-weight GEMM's inner loop -- and FMAs.
std::int64_t bf16_dot_loop(std::int64_t iterations, float seed, float* sink) {
#if defined(MOELB_LIMITS_AVX512_BF16)
    return dot_avx512_bf16(iterations, seed, sink);
#else
    alignas(64) std::uint16_t a[kDotValues];
    for (int t = 0; t < kDotValues; ++t) a[t] = bf16_bits(seed + static_cast<float>(t % 7) * 0.01f);
    const float bv = seed * 0.001f;
#if MOELB_LIMITS_VEC == 512
    constexpr int kChains = 8, kStep = 32;
    const __m512 b = _mm512_set1_ps(bv);
    const __m512i mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    __m512 acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_setzero_ps();
    for (std::int64_t it = 0; it < iterations; ++it) {
        for (int t = 0; t < kDotValues; t += kStep * kChains) {
#pragma GCC unroll 8
            for (int c = 0; c < kChains; ++c) {
                const __m512i d = _mm512_load_si512(a + t + kStep * c);
                acc[c] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(d, 16)), b, acc[c]);
                acc[c] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(d, mask)), b, acc[c]);
            }
        }
    }
    __m512 s = acc[0];
    for (int c = 1; c < kChains; ++c) s = _mm512_add_ps(s, acc[c]);
    *sink = _mm512_reduce_add_ps(s);
#elif MOELB_LIMITS_VEC == 256
    constexpr int kChains = 8, kStep = 16;
    const __m256 b = _mm256_set1_ps(bv);
    const __m256i mask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    __m256 acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = _mm256_setzero_ps();
    for (std::int64_t it = 0; it < iterations; ++it) {
        for (int t = 0; t < kDotValues; t += kStep * kChains) {
#pragma GCC unroll 8
            for (int c = 0; c < kChains; ++c) {
                const __m256i d =
                    _mm256_load_si256(reinterpret_cast<const __m256i*>(a + t + kStep * c));
                acc[c] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(d, 16)), b, acc[c]);
                acc[c] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(d, mask)), b, acc[c]);
            }
        }
    }
    __m256 s = acc[0];
    for (int c = 1; c < kChains; ++c) s = _mm256_add_ps(s, acc[c]);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, s);
    float total = 0.0f;
    for (const float v : lanes) total += v;
    *sink = total;
#elif MOELB_LIMITS_VEC == 128
    constexpr int kChains = 8, kStep = 8;
    const __m128 b = _mm_set1_ps(bv);
    const __m128i mask = _mm_set1_epi32(static_cast<int>(0xFFFF0000u));
    __m128 acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = _mm_setzero_ps();
    for (std::int64_t it = 0; it < iterations; ++it) {
        for (int t = 0; t < kDotValues; t += kStep * kChains) {
#pragma GCC unroll 8
            for (int c = 0; c < kChains; ++c) {
                const __m128i d =
                    _mm_load_si128(reinterpret_cast<const __m128i*>(a + t + kStep * c));
                acc[c] = _mm_add_ps(_mm_mul_ps(_mm_castsi128_ps(_mm_slli_epi32(d, 16)), b), acc[c]);
                acc[c] =
                    _mm_add_ps(_mm_mul_ps(_mm_castsi128_ps(_mm_and_si128(d, mask)), b), acc[c]);
            }
        }
    }
    __m128 s = acc[0];
    for (int c = 1; c < kChains; ++c) s = _mm_add_ps(s, acc[c]);
    alignas(16) float lanes[4];
    _mm_store_ps(lanes, s);
    *sink = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#else
    float acc[8] = {};
    for (std::int64_t it = 0; it < iterations; ++it) {
        for (int t = 0; t < kDotValues; t += 8) {
            for (int l = 0; l < 8; ++l) {
                std::uint32_t u = std::uint32_t{a[t + l]} << 16;
                float v = 0.0f;
                __builtin_memcpy(&v, &u, 4);
                acc[l] += v * bv;
            }
        }
    }
    float total = 0.0f;
    for (const float v : acc) total += v;
    *sink = total;
#endif
    return iterations * kDotValues * 2;
#endif
}

const char* bf16_dot_method() {
#if defined(MOELB_LIMITS_AVX512_BF16)
    return "avx512_bf16 vdpbf16ps (512-bit)";
#elif MOELB_LIMITS_VEC == 512
    return "avx512 bf16 widened to float32 + fma (512-bit)";
#elif MOELB_LIMITS_VEC == 256
    return "avx2 bf16 widened to float32 + fma (256-bit)";
#elif MOELB_LIMITS_VEC == 128
    return "sse2 bf16 widened to float32 + mul/add (128-bit)";
#else
    return "scalar bf16 widened to float32";
#endif
}

}  // namespace moelb::MOELB_ISA_NS
