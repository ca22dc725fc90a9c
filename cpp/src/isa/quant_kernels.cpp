// The GEMM with a quantised right-hand side of one ISA path (isa/kernels.hpp: quant_gemm; compiled
// once per path): y = x * dequant(W)^T for W in float32, bf16, fp8 E4M3FN with block scales or int8
// with row scales, and x in float32 or bf16.
//
// One dot-product order for every y[i, j], whatever the call. k is cut into chunks of kChunk =
// 2 * kLanes values from column 0 (kLanes = 4 on SSE2 and plain C++, 8 on avx2 and avx512, 16 on
// avx512_bf16), the last one zero-padded; each chunk gives two vectors of kLanes values; lane l of
// one vector accumulator takes, chunk after chunk, the product from the first vector and then the
// one from the second, as FMAs where the path has them (mul then add on SSE2); a fixed tree sums
// the accumulator's lanes at the end ((l, l + kLanes / 2), ..., (0, 1)). Tiles, k-blocks
// (accumulators parked in the scratch between them), which rows of x share a pass over W: these
// change when each FMA runs, never its operands, so y[i, j]'s bits depend only on x row i, W row
// j (with its scales) and the path. A bf16 x and its float32 values give the same bits (except
// under vdpbf16ps, below). Per weight type (FmaDot):
//   float32, bf16  the even/odd layout (first vector: the chunk's values 2l, second: 2l + 1) -- a
//                  32-bit lane holding two bf16 gives the even value by a shift, the odd one by a
//                  mask; the products x * w. A bf16 W and its float32 values give the same bits.
//   int8           the natural layout (first vector: values l, second: kLanes + l, so lane l takes
//                  the columns l mod kLanes in order; widened by sign-extending loads); the
//                  products x * float(q) (exact); y = tree * scale[j] (one rounding).
//   fp8            the natural layout; x row i carries 2^Q_i in the x panel (Q_i from the row's
//                  largest |x|, see fp8_x_exponent; values below 2^-126 stored as zeros) and
//                  each code is converted to fp8 * 2^-8 exactly (F16C: fp8_scaled), so no FMA
//                  operand is subnormal; each lane's sum restarts at every scale block and at the
//                  block's end is added into the lane's total as total += (sum * 2^(8 - Q_i)) *
//                  scale (exact power of two, then one multiply-add), so every product is
//                  x * fp8 rounded once (while |x| >= 2^-140 max |x_i|) and each block's scale is
//                  applied once. Scale blocks that are not whole chunks take a scalar driver with
//                  the same rule per lane (columns past k skipped). A NaN code (0x7F, 0xFF)
//                  makes its row's outputs NaN.
// Per weight rather than per block, the scale would cost a multiply per weight: decode's inner
// loop is the conversion and the FMAs alone.
//
// The avx512_bf16 path, bf16 x with bf16, int8 or fp8 W (scale blocks of whole chunks): vdpbf16ps
// (Bf16Dot). x row i is normalised by 2^P_i (its largest |x| into [1/2, 1): arrange_x_bf16) and
// kept in bf16; W's values are converted to bf16 exactly (int8 codes by float32, fp8 by a table:
// every E4M3 value is a normal bf16); per chunk of 32 values lane l adds the product of values
// 2l + 1 and then 2l (vdpbf16ps's order, each rounded once; bf16 subnormal inputs and float32
// subnormal results are zeros, which the normalisation keeps below what matters). bf16:
// y = tree * 2^-P_i; int8: y = (tree * 2^-P_i) * scale[j]; fp8: per scale block total +=
// (sum * 2^-P_i) * scale, as above. So a bf16 x no longer gives its float32 values' bits there.
//
// x is arranged once per call (the x panel in the scratch: float32, or bf16 for vdpbf16ps). Decode
// (small m): W is streamed once, each chunk of up to 4 rows converted in registers and multiplied
// into every row of x. Prefill (large m): kBlockRows rows of W at a time are converted into a
// float32 (bf16 for vdpbf16ps) panel in the scratch, then register tiles of kTileX rows of x by
// kTileW rows of W run over k-blocks that stay in L1 (fp8: k-blocks of whole scale blocks).
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <type_traits>

// 512-bit vectors and vdpbf16ps: the avx512_bf16 path only (an opt-in build, MOELB_ISA_AVX512_BF16;
// not yet run on hardware). The avx512 path runs the 256-bit code: on the device machine's Xeon
// the 512-bit FMA variant was slower at 16 threads (prefill m = 512, bf16: 416 against 553
// GFLOP/s).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__AVX512BF16__) && defined(__FMA__) && defined(__F16C__)
#define MOELB_QUANT_AVX512 1    // 512-bit vectors (the AVX2 code's helpers too: check_nan, madd1)
#define MOELB_QUANT_BF16_DOT 1  // vdpbf16ps for bf16 x
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MOELB_QUANT_AVX2 1
#elif defined(__SSE2__)
#include <emmintrin.h>
#define MOELB_QUANT_SSE2 1
#endif

#include "kernels.hpp"

namespace moelb::MOELB_ISA_NS {
namespace {

using isa::ActivationType;
using isa::Index;
using isa::QuantGemmArgs;
using isa::QuantWeights;
using isa::WeightType;

#define MOELB_INLINE inline __attribute__((always_inline))

// ---- This path's vectors -------------------------------------------------------------------

#if defined(MOELB_QUANT_AVX512)
constexpr int kLanes = 16;
using Vec = __m512;
MOELB_INLINE Vec vzero() { return _mm512_setzero_ps(); }
MOELB_INLINE Vec vset1(float s) { return _mm512_set1_ps(s); }
MOELB_INLINE Vec vload(const float* p) { return _mm512_load_ps(p); }
MOELB_INLINE void vstore(float* p, Vec v) { _mm512_store_ps(p, v); }
MOELB_INLINE Vec vmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
MOELB_INLINE Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
// The fixed tree: (l, l + 8), then (l, l + 4), (l, l + 2), (0, 1).
MOELB_INLINE float vsum(Vec v) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
// Even and odd values of v[0, 32).
MOELB_INLINE void deinterleave(const float* v, Vec& e, Vec& o) {
    const __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
    const __m512i even =
        _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    e = _mm512_permutex2var_ps(a, even, b);
    o = _mm512_permutex2var_ps(a, _mm512_add_epi32(even, _mm512_set1_epi32(1)), b);
}
// Even and odd values of the bf16 bits p[0, 32).
MOELB_INLINE void bf16_pairs(const std::uint16_t* p, Vec& e, Vec& o) {
    const __m512i d = _mm512_loadu_si512(p);
    e = _mm512_castsi512_ps(_mm512_slli_epi32(d, 16));
    o = _mm512_castsi512_ps(_mm512_and_si512(d, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#elif defined(MOELB_QUANT_AVX2)
constexpr int kLanes = 8;
using Vec = __m256;
MOELB_INLINE Vec vzero() { return _mm256_setzero_ps(); }
MOELB_INLINE Vec vset1(float s) { return _mm256_set1_ps(s); }
MOELB_INLINE Vec vload(const float* p) { return _mm256_load_ps(p); }
MOELB_INLINE void vstore(float* p, Vec v) { _mm256_store_ps(p, v); }
MOELB_INLINE Vec vmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
MOELB_INLINE Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
// The fixed tree: (l, l + 4), then (l, l + 2), then (0, 1).
MOELB_INLINE float vsum(Vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
// Even and odd values of v[0, 16).
MOELB_INLINE void deinterleave(const float* v, Vec& e, Vec& o) {
    const __m256 a = _mm256_loadu_ps(v), b = _mm256_loadu_ps(v + 8);
    // [a0 a2 b0 b2 | a4 a6 b4 b6] -> 64-bit quarters 0, 2, 1, 3: [a0 a2 a4 a6 b0 b2 b4 b6].
    const __m256 ev = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    const __m256 od = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
    e = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ev), 0xD8));
    o = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(od), 0xD8));
}
// Even and odd values of the bf16 bits p[0, 16).
MOELB_INLINE void bf16_pairs(const std::uint16_t* p, Vec& e, Vec& o) {
    const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    e = _mm256_castsi256_ps(_mm256_slli_epi32(d, 16));
    o = _mm256_castsi256_ps(_mm256_and_si256(d, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#elif defined(MOELB_QUANT_SSE2)
constexpr int kLanes = 4;
using Vec = __m128;
MOELB_INLINE Vec vzero() { return _mm_setzero_ps(); }
MOELB_INLINE Vec vset1(float s) { return _mm_set1_ps(s); }
MOELB_INLINE Vec vload(const float* p) { return _mm_load_ps(p); }
MOELB_INLINE void vstore(float* p, Vec v) { _mm_store_ps(p, v); }
MOELB_INLINE Vec vmadd(Vec a, Vec b, Vec c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
MOELB_INLINE Vec vmul(Vec a, Vec b) { return _mm_mul_ps(a, b); }
// The fixed tree: (l, l + 2), then (0, 1).
MOELB_INLINE float vsum(Vec v) {
    __m128 s = _mm_add_ps(v, _mm_movehl_ps(v, v));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
MOELB_INLINE void deinterleave(const float* v, Vec& e, Vec& o) {
    const __m128 a = _mm_loadu_ps(v), b = _mm_loadu_ps(v + 4);
    e = _mm_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    o = _mm_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
}
MOELB_INLINE void bf16_pairs(const std::uint16_t* p, Vec& e, Vec& o) {
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    e = _mm_castsi128_ps(_mm_slli_epi32(d, 16));
    o = _mm_castsi128_ps(_mm_and_si128(d, _mm_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#else  // other targets: 4 lanes in plain C++, std::fma (one rounding, as on the FMA paths)
constexpr int kLanes = 4;
struct Vec {
    float v[4];
};
MOELB_INLINE Vec vzero() { return Vec{{0.0f, 0.0f, 0.0f, 0.0f}}; }
MOELB_INLINE Vec vset1(float s) { return Vec{{s, s, s, s}}; }
MOELB_INLINE Vec vload(const float* p) { return Vec{{p[0], p[1], p[2], p[3]}}; }
MOELB_INLINE void vstore(float* p, Vec v) {
    for (int l = 0; l < 4; ++l) p[l] = v.v[l];
}
MOELB_INLINE Vec vmadd(Vec a, Vec b, Vec c) {
    Vec r;
    for (int l = 0; l < 4; ++l) r.v[l] = std::fma(a.v[l], b.v[l], c.v[l]);
    return r;
}
MOELB_INLINE Vec vmul(Vec a, Vec b) {
    Vec r;
    for (int l = 0; l < 4; ++l) r.v[l] = a.v[l] * b.v[l];
    return r;
}
MOELB_INLINE float vsum(Vec v) { return (v.v[0] + v.v[2]) + (v.v[1] + v.v[3]); }
MOELB_INLINE void deinterleave(const float* v, Vec& e, Vec& o) {
    for (int l = 0; l < 4; ++l) {
        e.v[l] = v[2 * l];
        o.v[l] = v[2 * l + 1];
    }
}
MOELB_INLINE void bf16_pairs(const std::uint16_t* p, Vec& e, Vec& o) {
    for (int l = 0; l < 4; ++l) {
        e.v[l] = std::bit_cast<float>(std::uint32_t{p[2 * l]} << 16);
        o.v[l] = std::bit_cast<float>(std::uint32_t{p[2 * l + 1]} << 16);
    }
}
#endif

constexpr int kChunk = 2 * kLanes;

#ifndef MOELB_PREFETCH_MODE
#define MOELB_PREFETCH_MODE 1
#endif
#ifndef MOELB_PREFETCH_LOCALITY
#define MOELB_PREFETCH_LOCALITY 2
#endif
// Decode streams a group of rows of W at once, each a small step per chunk: too few cache lines
// in flight for the memory's latency. Each chunk read prefetches the same chunk of the row one
// group further on (bind: `ahead` = the group's elements; rows are contiguous, so the next group
// is the next rows), a whole group's time ahead and every line of it once.
// The prefetch distance in elements of `element_bytes` for a group of `rows` rows of `cols`:
// the group's elements (mode 1, the default), or 1 KiB (mode 0, the distance within the row).
constexpr Index prefetch_ahead(int rows, Index cols, std::size_t element_bytes) {
#if MOELB_PREFETCH_MODE == 1
    (void)element_bytes;
    return rows * cols;
#else
    (void)rows;
    (void)cols;
    return 1024 / static_cast<Index>(element_bytes);
#endif
}

MOELB_INLINE void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(p, 0, MOELB_PREFETCH_LOCALITY);
#else
    (void)p;
#endif
}

// ---- Tiles and thresholds ------------------------------------------------------------------

// Decode: x rows per pass over W (at most 4) and W rows converted together (kRows * rows <= 12
// accumulators). m >= kPrefillRows: prefill.
constexpr int kMaxDecodeX = 4;
#ifndef MOELB_QUANT_PREFILL_ROWS
#define MOELB_QUANT_PREFILL_ROWS 8
#endif
constexpr Index kPrefillRows = MOELB_QUANT_PREFILL_ROWS;
// Decode with several passes over a group of W rows (m > kMaxDecodeX): k-blocks of this many
// chunks, so the group's rows and the x panel's slices stay in L1 between passes.
constexpr Index kDecodeBlockChunks = 32;
// Prefill: W rows per panel (each pass over the x panel serves this many rows), register tile
// kTileX x kTileW, k-blocks of kPrefillBlockChunks (512 values on AVX2). 64 rows and 32-chunk
// k-blocks, with each tile's W slices kept in L1 while a group's x rows pass them, measured
// ~20-30% faster at m = 512 than 32 rows, 16 chunks and x kept instead (bf16 W, this machine),
// and no slower at m = 128.
#ifndef MOELB_QUANT_BLOCK_ROWS
#define MOELB_QUANT_BLOCK_ROWS 64
#endif
constexpr int kBlockRows = MOELB_QUANT_BLOCK_ROWS;
constexpr int kTileX = 3;
constexpr int kTileW = 4;
#ifndef MOELB_QUANT_KBLOCK
#define MOELB_QUANT_KBLOCK 32
#endif
constexpr Index kPrefillBlockChunks = MOELB_QUANT_KBLOCK;
// Prefill: rows of x per pass over a W block's k-blocks (a multiple of kTileX), so that their
// k-block slices (192 KiB at 512 values) and the W panel's (128 KiB) stay in L2.
#ifndef MOELB_QUANT_ROW_GROUP
#define MOELB_QUANT_ROW_GROUP 96
#endif
constexpr Index kPrefillRowGroup = MOELB_QUANT_ROW_GROUP;
static_assert(kBlockRows % kTileW == 0);

constexpr Index round_up(Index v, Index to) { return (v + to - 1) / to * to; }

// The panels' row stride in elements of `bytes` bytes: whole chunks and 64-byte lines, and 17
// lines (mod 64) more than a multiple of 4 KiB. When k is a multiple of 1024 (k = 7168: float32
// rows 28 KiB apart, 7 x 4 KiB) every row's k-block would fall into the same L1 sets and the
// prefill tiles' 16 + 3 rows would evict each other; 17 lines apart, a k-block of 16 lines of each
// row spreads over all 64 sets. A bf16 panel's stride is never longer than a float32 one's in
// bytes (the scratch is sized for float32 panels).
constexpr Index panel_stride(Index k, Index bytes = sizeof(float)) {
    const Index line = 64 / bytes;
    const Index lines = round_up(k, kChunk > line ? kChunk : line) / line;
    return (lines + ((17 - lines) % 64 + 64) % 64) * line;
}
static_assert(kChunk <= 16 || kChunk % 16 == 0);

// ---- The dot product of a chunk ------------------------------------------------------------
//
// A chunk of an x panel row and of a W row meet as kParts operand vectors ("parts") of
// kPartElems panel elements each, every part multiplied into the lanes' accumulators in turn.
//   FmaDot   float32 panels; two parts, the chunk's two vectors of kLanes values (even/odd or
//            natural layout); one FMA per part (mul then add on SSE2).
//   Bf16Dot  (the avx512_bf16 path, bf16 x; see quant_gemm) bf16 panels; one part, the chunk's
//            32 values in order, lane l holding values 2l and 2l + 1; one vdpbf16ps, which per
//            lane adds the odd product and then the even one, each rounded once (the products of
//            two bf16 are exact in float32), bf16 subnormal inputs read as zero and float32
//            subnormal results flushed to zero.
struct FmaDot {
    using XT = float;  // the x panel's elements
    using WT = float;  // the W panel's elements (prefill)
    using Part = Vec;
    static constexpr int kParts = 2;
    static constexpr Index kPartElems = kLanes;
    static MOELB_INLINE Part load(const float* p) { return vload(p); }
    static MOELB_INLINE void store(float* p, Part v) { vstore(p, v); }
    static MOELB_INLINE Vec madd(Part x, Part w, Vec acc) { return vmadd(x, w, acc); }
};
#if defined(MOELB_QUANT_BF16_DOT)
struct Bf16Dot {
    using XT = std::uint16_t;
    using WT = std::uint16_t;
    using Part = __m512i;
    static constexpr int kParts = 1;
    static constexpr Index kPartElems = kChunk;
    static MOELB_INLINE Part load(const std::uint16_t* p) { return _mm512_load_si512(p); }
    static MOELB_INLINE void store(std::uint16_t* p, Part v) { _mm512_store_si512(p, v); }
    static MOELB_INLINE Vec madd(Part x, Part w, Vec acc) {
        return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
    }
};
static_assert(kChunk == 32);
#endif

// ---- Exact scalar conversions ----------------------------------------------------------------

float bf16_value(std::uint16_t bits) { return std::bit_cast<float>(std::uint32_t{bits} << 16); }
// The bits of a float32 that is a bf16 value (exact for those).
[[maybe_unused]] std::uint16_t bf16_bits(float v) {
    return static_cast<std::uint16_t>(std::bit_cast<std::uint32_t>(v) >> 16);
}

// fp8 E4M3FN: the bf16 bits of each code's exact value by its magnitude m = code & 0x7F -- every
// E4M3FN value, the subnormals (m * 2^-9) included, is a normal bf16 (and float32); 0x7F, NaN,
// gives 480: NaN codes are caught apart (check_nan, tail), their row's outputs NaN.
constexpr std::uint16_t fp8_magnitude_bf16(unsigned m) {
    unsigned e = m >> 3, mant = m & 7u;
    if (e == 0) {
        if (mant == 0) return 0;
        int exp = -6;  // mant * 2^-9 = (mant / 8) * 2^-6: shift mant up to 1.xxx
        while ((mant & 8u) == 0) {
            mant <<= 1;
            --exp;
        }
        return static_cast<std::uint16_t>(static_cast<unsigned>(exp + 127) << 7 | (mant & 7u) << 4);
    }
    return static_cast<std::uint16_t>((e + 120u) << 7 | mant << 4);
}
struct Fp8Bf16Table {
    alignas(64) std::uint16_t v[128];
};
constexpr Fp8Bf16Table make_fp8_bf16_table() {
    Fp8Bf16Table t{};
    for (unsigned m = 0; m < 128; ++m) t.v[m] = fp8_magnitude_bf16(m);
    return t;
}
constexpr Fp8Bf16Table kFp8Bf16 = make_fp8_bf16_table();
MOELB_INLINE float fp8_value(std::uint8_t b) {
    return bf16_value(static_cast<std::uint16_t>(kFp8Bf16.v[b & 0x7Fu] | (b & 0x80u) << 8));
}
// FmaDot's fp8 operand: fp8 * 2^-8, a normal float32 for every code (2^-17 <= |v| < 2) -- what
// the vector paths get from the code's bits as an IEEE half (sign, then the code's 7 magnitude
// bits as 0eeee.mmm: 2^(e - 15) * 1.mmm, or for e = 0 the half subnormal 0.mmm * 2^-14) widened
// by F16C's vcvtph2ps. A subnormal float32 operand would cost Intel cores a microcode assist per
// FMA (fp8 * 2^-120, an earlier choice, made fp8 13x slower than bf16 on a Xeon).
MOELB_INLINE float fp8_scaled(std::uint8_t b) { return fp8_value(b) * 0x1p-8f; }
MOELB_INLINE bool fp8_is_nan(std::uint8_t b) { return (b & 0x7Fu) == 0x7Fu; }

// ---- Reading W: one loader per stored type --------------------------------------------------
//
// A loader (for its Dot) reads up to kBlockRows rows of W bound by bind(j0, rows): chunk(jj, c, w)
// gives row j0 + jj's chunk c as the Dot's parts (a whole chunk: (c + 1) * kChunk <= cols), tail()
// the same for the partial last chunk (zero-padded); finish(j, sum) turns row j's lane-tree sum
// (times the x row's factor, see output) into y (int8: the row scale), poisoned(jj) says a NaN code
// was seen (fp8: check_nan over each segment's whole chunks before they are read, tail() for the
// last one).

template <class Dot>
using Parts = typename Dot::Part[Dot::kParts];

// Row j's chunk c from its scalar values (exact; for Bf16Dot, bf16 values), zero-padded past
// cols: FmaDot in the even/odd layout or (kNatural) the natural one, Bf16Dot the bf16 bits in
// order.
template <class Dot, bool kNatural, class Value>
MOELB_INLINE void scalar_chunk(const Value& value, Index c, Index cols, Parts<Dot>& w) {
    const Index c0 = c * kChunk;
    if constexpr (std::is_same_v<Dot, FmaDot>) {
        alignas(64) float v[kChunk];
        for (int t = 0; t < kChunk; ++t) v[t] = c0 + t < cols ? value(c0 + t) : 0.0f;
        if constexpr (kNatural) {
            w[0] = vload(v);
            w[1] = vload(v + kLanes);
        } else {
            deinterleave(v, w[0], w[1]);
        }
    } else {
        alignas(64) std::uint16_t v[kChunk];
        for (int t = 0; t < kChunk; ++t) {
            v[t] = c0 + t < cols ? bf16_bits(value(c0 + t)) : std::uint16_t{0};
        }
        w[0] = Dot::load(v);
    }
}

// The rows of one loader and their prefetch distance.
template <class T>
struct RowPointers {
    const T* data;
    Index cols;
    Index ahead = 0;  // prefetch distance in elements (bind)
    const T* row[kBlockRows];

    void bind_rows(Index j0, int rows) {
        ahead = prefetch_ahead(rows, cols, sizeof(T));
        for (int jj = 0; jj < rows; ++jj) row[jj] = data + (j0 + jj) * cols;
    }
    MOELB_INLINE const T* at(int jj, Index c) const {
        prefetch(row[jj] + c * kChunk + ahead);
        return row[jj] + c * kChunk;
    }
};

struct F32Rows : RowPointers<float> {
    using Dot = FmaDot;
    static constexpr bool kBlockScale = false;

    void bind(Index j0, int rows) { bind_rows(j0, rows); }
    bool poisoned(int) const { return false; }
    float finish(Index, float sum) const { return sum; }
    MOELB_INLINE void chunk(int jj, Index c, Parts<Dot>& w) const {
        deinterleave(at(jj, c), w[0], w[1]);
    }
    void tail(int jj, Index c, Parts<Dot>& w) const {
        const float* r = row[jj];
        scalar_chunk<Dot, false>([r](Index col) { return r[col]; }, c, cols, w);
    }
};

template <class D>
struct Bf16Rows : RowPointers<std::uint16_t> {
    using Dot = D;
    static constexpr bool kBlockScale = false;

    void bind(Index j0, int rows) { bind_rows(j0, rows); }
    bool poisoned(int) const { return false; }
    float finish(Index, float sum) const { return sum; }
    MOELB_INLINE void chunk(int jj, Index c, Parts<Dot>& w) const {
        const std::uint16_t* p = at(jj, c);
        if constexpr (std::is_same_v<Dot, FmaDot>) {
            bf16_pairs(p, w[0], w[1]);
        } else {
#if defined(MOELB_QUANT_BF16_DOT)
            w[0] = _mm512_loadu_si512(p);
#endif
        }
    }
    void tail(int jj, Index c, Parts<Dot>& w) const {
        const std::uint16_t* r = row[jj];
        scalar_chunk<Dot, false>([r](Index col) { return bf16_value(r[col]); }, c, cols, w);
    }
};

// int8: the products x * float(q) (exact: |q| <= 128), the row's scale applied once to the
// lane-tree's sum (finish()). FmaDot: the natural layout -- chunk c's first vector holds its
// values [0, kLanes), the second [kLanes, 2 kLanes): lane l takes the columns l mod kLanes in
// order; one sign-extending load per vector, no byte shuffle. Bf16Dot: the codes as bf16 (exact).
template <class D>
struct Int8Rows : RowPointers<std::int8_t> {
    using Dot = D;
    static constexpr bool kBlockScale = false;
    const float* scale_inv;  // [rows]

    void bind(Index j0, int rows) { bind_rows(j0, rows); }
    bool poisoned(int) const { return false; }
    float finish(Index j, float sum) const { return sum * scale_inv[j]; }
    MOELB_INLINE void chunk(int jj, Index c, Parts<Dot>& w) const {
        const std::int8_t* p = at(jj, c);
        if constexpr (std::is_same_v<Dot, FmaDot>) {
#if defined(MOELB_QUANT_AVX512)
            w[0] = _mm512_cvtepi32_ps(
                _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
            w[1] = _mm512_cvtepi32_ps(
                _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
#elif defined(MOELB_QUANT_AVX2)
            w[0] = _mm256_cvtepi32_ps(
                _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
            w[1] = _mm256_cvtepi32_ps(
                _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
#else
            (void)p;
            tail(jj, c, w);
#endif
        } else {
#if defined(MOELB_QUANT_BF16_DOT)
            // Words 0-15 from the first 16 codes, 16-31 from the next (exact: integers <= 128).
            const __m512 lo = _mm512_cvtepi32_ps(
                _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
            const __m512 hi = _mm512_cvtepi32_ps(
                _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
            w[0] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
#endif
        }
    }
    void tail(int jj, Index c, Parts<Dot>& w) const {
        const std::int8_t* r = row[jj];
        scalar_chunk<Dot, true>([r](Index col) { return static_cast<float>(r[col]); }, c, cols, w);
    }
};

// fp8 E4M3FN with block scales: FmaDot the natural layout of fp8_scaled (as int8's), Bf16Dot the
// codes' exact bf16 values in order (fp8_magnitude_bf16).
template <class D>
struct Fp8Rows : RowPointers<std::uint8_t> {
    using Dot = D;
    static constexpr bool kBlockScale = true;
    const float* scale_inv;  // [ceil(rows / block_rows), grid_cols]
    Index block_rows, block_cols, grid_cols;
    Index block_chunks;  // block_cols / kChunk (the vector drivers need block_cols % kChunk == 0)
    int rows = 0;
    const float* scale_row[kBlockRows];
    bool nan[kBlockRows];  // a NaN code seen in the bound row

    void bind(Index j0, int n) {
        rows = n;
        bind_rows(j0, n);
        for (int jj = 0; jj < n; ++jj) {
            scale_row[jj] = scale_inv + ((j0 + jj) / block_rows) * grid_cols;
            nan[jj] = false;
        }
    }
    Vec scale(int jj, Index block) const { return vset1(scale_row[jj][block]); }
    // Checks the whole chunks [c, end) of bound rows [0, R) for NaN codes: max over (b & 0x7F) is
    // 0x7F exactly when one is there (one test for the R rows; the rows apart only when it fires).
    template <int R>
    void check_nan(Index c, Index end) {
        if (end <= c) return;
        const Index bytes = (end - c) * kChunk;
#if defined(MOELB_QUANT_AVX2)
        const __m256i mag = _mm256_set1_epi8(0x7F);
        __m256i mx = _mm256_setzero_si256();
        Index t = 0;
        for (; t + 32 <= bytes; t += 32) {
#pragma GCC unroll 4
            for (int jj = 0; jj < R; ++jj) {
                const __m256i v =
                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[jj] + c * kChunk + t));
                mx = _mm256_max_epu8(mx, _mm256_and_si256(v, mag));
            }
        }
        if (t < bytes) {  // one chunk of 16 bytes left
#pragma GCC unroll 4
            for (int jj = 0; jj < R; ++jj) {
                const __m128i v =
                    _mm_loadu_si128(reinterpret_cast<const __m128i*>(row[jj] + c * kChunk + t));
                mx = _mm256_max_epu8(
                    mx, _mm256_castsi128_si256(_mm_and_si128(v, _mm256_castsi256_si128(mag))));
            }
        }
        if (_mm256_movemask_epi8(_mm256_cmpeq_epi8(mx, mag)) == 0) [[likely]] {
            return;
        }
#endif
        for (int jj = 0; jj < R; ++jj) {
            const std::uint8_t* p = row[jj] + c * kChunk;
            for (Index t = 0; t < bytes; ++t) {
                if (fp8_is_nan(p[t])) nan[jj] = true;
            }
        }
    }
    bool poisoned(int jj) const { return nan[jj]; }
    float finish(Index, float sum) const { return sum; }
    MOELB_INLINE void chunk(int jj, Index c, Parts<Dot>& w) const {
        const std::uint8_t* p = at(jj, c);
        if constexpr (std::is_same_v<Dot, FmaDot>) {
            // The codes as IEEE halves (fp8_scaled): sign-extended to 16 bits, shifted left by 7
            // (bit 15 = the sign, bits 7-13 = the magnitude) and bit 14 (a copy of the sign)
            // cleared; then widened to float32 in order (the natural layout).
#if defined(MOELB_QUANT_AVX512)
            const __m512i d =
                _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
            const __m512i h = _mm512_and_si512(_mm512_slli_epi16(d, 7),
                                               _mm512_set1_epi16(static_cast<short>(0xBF80)));
            w[0] = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
            w[1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
#elif defined(MOELB_QUANT_AVX2)
            const __m256i d =
                _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
            const __m256i h = _mm256_and_si256(_mm256_slli_epi16(d, 7),
                                               _mm256_set1_epi16(static_cast<short>(0xBF80)));
            w[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
            w[1] = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
#else
            alignas(64) float v[kChunk];
            for (int t = 0; t < kChunk; ++t) v[t] = fp8_scaled(p[t]);
            w[0] = vload(v);
            w[1] = vload(v + kLanes);
#endif
        } else {
#if defined(MOELB_QUANT_BF16_DOT)
            // The magnitude's bf16 from the 128-entry table (two 64-entry permutes, bit 6
            // choosing), then the sign from bit 7.
            const __m512i t0 = _mm512_load_si512(kFp8Bf16.v),
                          t1 = _mm512_load_si512(kFp8Bf16.v + 32);
            const __m512i t2 = _mm512_load_si512(kFp8Bf16.v + 64);
            const __m512i t3 = _mm512_load_si512(kFp8Bf16.v + 96);
            const __m512i code =
                _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
            const __m512i low = _mm512_permutex2var_epi16(t0, code, t1);
            const __m512i high = _mm512_permutex2var_epi16(t2, code, t3);
            const __m512i mag = _mm512_mask_blend_epi16(
                _mm512_test_epi16_mask(code, _mm512_set1_epi16(0x40)), low, high);
            w[0] = _mm512_or_si512(mag, _mm512_slli_epi16(_mm512_srli_epi16(code, 7), 15));
#endif
        }
    }
    // The partial last chunk, zero-padded (its NaN codes checked here).
    void tail(int jj, Index c, Parts<Dot>& w) {
        const std::uint8_t* r = row[jj];
        const Index c0 = c * kChunk;
        for (Index col = c0; col < c0 + kChunk && col < cols; ++col) {
            if (fp8_is_nan(r[col])) nan[jj] = true;
        }
        if constexpr (std::is_same_v<Dot, FmaDot>) {
            scalar_chunk<Dot, true>([r](Index col) { return fp8_scaled(r[col]); }, c, cols, w);
        } else {
            scalar_chunk<Dot, false>([r](Index col) { return fp8_value(r[col]); }, c, cols, w);
        }
    }
};
// ---- Register tiles --------------------------------------------------------------------------

// The end of an fp8 scale block: acc += (S * g_i) * s_j per lane (S the block's lane sums, g_i
// undoing the x panel's and the conversion's powers of two, exactly; s_j the block's scale; one
// rounding in the multiply-add).
MOELB_INLINE Vec block_flush(Vec sum, float g, Vec scale, const float* acc) {
    return vmadd(vmul(sum, vset1(g)), scale, vload(acc));
}

// One decode step: chunk c of W rows [0, R) (whole, or the zero-padded tail) into the
// accumulators of x rows [0, MG); xc = the x panel at chunk c (row stride kp).
template <bool kTail, int R, int MG, class Loader>
MOELB_INLINE void decode_step(Loader& ld, const typename Loader::Dot::XT* xc, Index kp, Index c,
                              Vec (&a)[MG][R]) {
    using Dot = typename Loader::Dot;
#pragma GCC unroll 4
    for (int j = 0; j < R; ++j) {
        Parts<Dot> w;
        if constexpr (kTail) {
            ld.tail(j, c, w);
        } else {
            ld.chunk(j, c, w);
        }
#pragma GCC unroll 4
        for (int i = 0; i < MG; ++i) {
#pragma GCC unroll 2
            for (int p = 0; p < Dot::kParts; ++p) {
                a[i][j] = Dot::madd(Dot::load(xc + i * kp + p * Dot::kPartElems), w[p], a[i][j]);
            }
        }
    }
}

// Decode: W rows j0 + [0, R) (bound in ld) against x rows [0, MG) of the x panel xp (row stride
// kp), chunks [c0, c1); `full` = the number of whole chunks (chunk `full`, if below c1, is the
// partial last one). acc: the accumulators, acc[i * acc_stride + j * kLanes]; xg: the x rows'
// factors (block-scaled loaders). Block-scaled loaders: segments of one scale block each, their
// sums in registers from zero, added into acc at the segment's end (c1 must be a block end).
template <int R, int MG, class Loader>
void decode_tile(Loader& ld, const typename Loader::Dot::XT* xp, Index kp, Index c0, Index c1,
                 Index full, float* acc, Index acc_stride, const float* xg) {
    Vec a[MG][R];
    if constexpr (!Loader::kBlockScale) {
#pragma GCC unroll 4
        for (int i = 0; i < MG; ++i) {
#pragma GCC unroll 4
            for (int j = 0; j < R; ++j) a[i][j] = vload(acc + i * acc_stride + j * kLanes);
        }
    }
    if constexpr (Loader::kBlockScale) {
        // Segments of one scale block each (c0 and c1 are block ends or k's end).
        Index b = c0 / ld.block_chunks;
        for (Index c = c0; c < c1; ++b) {
            const Index block_end = (b + 1) * ld.block_chunks;
            const Index seg_end = block_end < c1 ? block_end : c1;
            const Index whole_end = seg_end < full ? seg_end : full;
            ld.template check_nan<R>(c, whole_end);
#pragma GCC unroll 4
            for (int i = 0; i < MG; ++i) {
#pragma GCC unroll 4
                for (int j = 0; j < R; ++j) a[i][j] = vzero();
            }
            for (; c < whole_end; ++c) decode_step<false>(ld, xp + c * kChunk, kp, c, a);
            if (c < seg_end) {  // c == full: the partial last chunk
                decode_step<true>(ld, xp + c * kChunk, kp, c, a);
                c = seg_end;
            }
#pragma GCC unroll 4
            for (int j = 0; j < R; ++j) {
                const Vec s = ld.scale(j, b);
#pragma GCC unroll 4
                for (int i = 0; i < MG; ++i) {
                    float* p = acc + i * acc_stride + j * kLanes;
                    vstore(p, block_flush(a[i][j], xg[i], s, p));
                }
            }
        }
    } else {
        const Index whole_end = c1 < full ? c1 : full;
        Index c = c0;
        for (; c < whole_end; ++c) decode_step<false>(ld, xp + c * kChunk, kp, c, a);
        if (c < c1) decode_step<true>(ld, xp + c * kChunk, kp, c, a);
    }
    if constexpr (!Loader::kBlockScale) {
#pragma GCC unroll 4
        for (int i = 0; i < MG; ++i) {
#pragma GCC unroll 4
            for (int j = 0; j < R; ++j) vstore(acc + i * acc_stride + j * kLanes, a[i][j]);
        }
    }
}

// Prefill: x panel rows [0, MR) (row stride kp) against W panel rows [0, NR) (row stride kp),
// chunks [c0, c1). Per chunk the Dot's first parts, then the second ones: each accumulator still
// takes its first product before its second. kBlockScale: segments of `block_chunks` chunks (c0
// and c1 block ends or k's end; c0 in block b0), their sums added into acc with xg[i] and the
// scales scales[j][block] at each end.
template <int MR, int NR, bool kBlockScale, class Dot>
void panel_tile(const typename Dot::XT* xp, const typename Dot::WT* wp, Index kp, Index c0,
                Index c1, float* acc, Index acc_stride, const float* xg, const float* const* scales,
                Index block_chunks, Index b0) {
    Vec a[MR][NR];
    if constexpr (!kBlockScale) {
#pragma GCC unroll 4
        for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
            for (int j = 0; j < NR; ++j) a[i][j] = vload(acc + i * acc_stride + j * kLanes);
        }
    }
    for (Index cs = c0, b = b0; cs < c1; ++b) {
        Index ce = c1;
        if constexpr (kBlockScale) {
            ce = (b + 1) * block_chunks;
            if (ce > c1) ce = c1;
#pragma GCC unroll 4
            for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
                for (int j = 0; j < NR; ++j) a[i][j] = vzero();
            }
        }
        for (Index c = cs; c < ce; ++c) {
#pragma GCC unroll 2
            for (int h = 0; h < Dot::kParts; ++h) {
                const Index off = c * kChunk + h * Dot::kPartElems;
                typename Dot::Part x[MR];
#pragma GCC unroll 4
                for (int i = 0; i < MR; ++i) x[i] = Dot::load(xp + i * kp + off);
#pragma GCC unroll 4
                for (int j = 0; j < NR; ++j) {
                    const typename Dot::Part w = Dot::load(wp + j * kp + off);
#pragma GCC unroll 4
                    for (int i = 0; i < MR; ++i) a[i][j] = Dot::madd(x[i], w, a[i][j]);
                }
            }
        }
        if constexpr (kBlockScale) {
#pragma GCC unroll 4
            for (int j = 0; j < NR; ++j) {
                const Vec s = vset1(scales[j][b]);
#pragma GCC unroll 4
                for (int i = 0; i < MR; ++i) {
                    float* p = acc + i * acc_stride + j * kLanes;
                    vstore(p, block_flush(a[i][j], xg[i], s, p));
                }
            }
        }
        cs = ce;
    }
    if constexpr (!kBlockScale) {
#pragma GCC unroll 4
        for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
            for (int j = 0; j < NR; ++j) vstore(acc + i * acc_stride + j * kLanes, a[i][j]);
        }
    }
}

// The tile instances by size: [rows of W - 1][rows of x - 1] (plain arrays: a std::array of
// function pointers would be a template instance without this path's tag).
template <class Loader>
struct DecodeTiles {
    using Fn = void (*)(Loader&, const typename Loader::Dot::XT*, Index, Index, Index, Index,
                        float*, Index, const float*);
    static constexpr Fn kFn[4][kMaxDecodeX] = {
        {&decode_tile<1, 1, Loader>, &decode_tile<1, 2, Loader>, &decode_tile<1, 3, Loader>,
         &decode_tile<1, 4, Loader>},
        {&decode_tile<2, 1, Loader>, &decode_tile<2, 2, Loader>, &decode_tile<2, 3, Loader>,
         &decode_tile<2, 4, Loader>},
        {&decode_tile<3, 1, Loader>, &decode_tile<3, 2, Loader>, &decode_tile<3, 3, Loader>,
         &decode_tile<3, 4, Loader>},
        {&decode_tile<4, 1, Loader>, &decode_tile<4, 2, Loader>, &decode_tile<4, 3, Loader>,
         &decode_tile<4, 4, Loader>},
    };
};
static_assert(kMaxDecodeX == 4);

// [rows of x - 1][rows of W - 1].
template <bool kBlockScale, class Dot>
struct PanelTiles {
    using Fn = void (*)(const typename Dot::XT*, const typename Dot::WT*, Index, Index, Index,
                        float*, Index, const float*, const float* const*, Index, Index);
    static constexpr Fn kFn[kTileX][kTileW] = {
        {&panel_tile<1, 1, kBlockScale, Dot>, &panel_tile<1, 2, kBlockScale, Dot>,
         &panel_tile<1, 3, kBlockScale, Dot>, &panel_tile<1, 4, kBlockScale, Dot>},
        {&panel_tile<2, 1, kBlockScale, Dot>, &panel_tile<2, 2, kBlockScale, Dot>,
         &panel_tile<2, 3, kBlockScale, Dot>, &panel_tile<2, 4, kBlockScale, Dot>},
        {&panel_tile<3, 1, kBlockScale, Dot>, &panel_tile<3, 2, kBlockScale, Dot>,
         &panel_tile<3, 3, kBlockScale, Dot>, &panel_tile<3, 4, kBlockScale, Dot>},
    };
};
static_assert(kTileX == 3 && kTileW == 4);

// ---- The x panel ------------------------------------------------------------------------------

// The power of two fp8 puts on x row i in its FmaDot panel: 2^Q with Q = 14 - E clamped to
// [-126, 127], E the exponent of the row's largest |x| (max |x| < 2^E; 0 for a zero row or one
// with inf or NaN). Then |x * 2^Q| < 2^14, the products x * 2^Q * fp8 * 2^-8 (fp8_scaled) stay
// below 2^15, and x * fp8 is rounded once, scaled by an exact power of two; xg[i] = 2^(8 - Q)
// undoes it at each block's end (block_flush). Panel values below 2^-126 (x below 2^(E - 140))
// are stored as zeros: a subnormal FMA operand would cost Intel cores a microcode assist.
// max_bits: the largest |x| of the row as float32 bits (sign cleared; from 0x7F800000: inf, NaN).
MOELB_INLINE int fp8_x_exponent(std::uint32_t max_bits) {
    if (max_bits >= 0x7F800000u) return 0;  // inf or NaN (NaN rows propagate anyway)
    int e = 0;
    std::frexp(std::bit_cast<float>(max_bits), &e);
    const int q = 14 - e;
    return q < -126 ? -126 : (q > 127 ? 127 : q);
}

// The largest |x| of row i's k values as float32 bits (an integer max, which vectorises).
std::uint32_t row_max_bits(const QuantGemmArgs& a, Index i, Index k) {
    std::uint32_t max_bits = 0;
    if (a.x_type == ActivationType::kFloat32) {
        const float* row = static_cast<const float*>(a.x) + i * a.x_stride;
        for (Index c = 0; c < k; ++c) {
            const std::uint32_t u = std::bit_cast<std::uint32_t>(row[c]) & 0x7FFFFFFFu;
            max_bits = u > max_bits ? u : max_bits;
        }
    } else {
        const std::uint16_t* row = static_cast<const std::uint16_t*>(a.x) + i * a.x_stride;
        for (Index c = 0; c < k; ++c) {
            const std::uint32_t u = (std::uint32_t{row[c]} << 16) & 0x7FFFFFFFu;
            max_bits = u > max_bits ? u : max_bits;
        }
    }
    return max_bits;
}

// FmaDot's x rows [0, m): row i at xp + i * kp, chunk c at + c * kChunk, the last chunk
// zero-padded. The even/odd layout (f32, bf16 W): even values, then odd; the natural one (int8,
// fp8 W): the values in order. fp8 W: the values times 2^Q, those below 2^-126 as zeros, with
// xg[i] = 2^(8 - Q) (fp8_x_exponent); other W: xg[i] = 1.
void arrange_x(const QuantGemmArgs& a, Index k, Index kp, float* xp, float* xg, bool natural,
               bool fp8) {
    const Index full = k / kChunk, chunks = (k + kChunk - 1) / kChunk;
    for (Index i = 0; i < a.m; ++i) {
        float* dst = xp + i * kp;
        const float* rowf = static_cast<const float*>(a.x) + i * a.x_stride;
        const std::uint16_t* rowb = static_cast<const std::uint16_t*>(a.x) + i * a.x_stride;
        const bool f32 = a.x_type == ActivationType::kFloat32;
        float f = 1.0f;
        xg[i] = 1.0f;
        if (fp8) {
            const int q = fp8_x_exponent(row_max_bits(a, i, k));
            f = std::ldexp(1.0f, q);
            xg[i] = std::ldexp(1.0f, 8 - q);
        }
        if (natural) {
            if (f32) {
                for (Index c = 0; c < k; ++c) dst[c] = rowf[c];
            } else {
                for (Index c = 0; c < k; ++c) dst[c] = bf16_value(rowb[c]);
            }
            if (fp8) {
                for (Index c = 0; c < k; ++c) {
                    const float v = dst[c] * f;
                    dst[c] = std::abs(v) < 0x1p-126f ? 0.0f : v;
                }
            }
            for (Index c = k; c < chunks * kChunk; ++c) dst[c] = 0.0f;
            continue;
        }
        const Vec fv = vset1(f);  // 1 (fp8 W take the natural layout)
        Parts<FmaDot> w;
        for (Index c = 0; c < full; ++c) {
            if (f32) {
                deinterleave(rowf + c * kChunk, w[0], w[1]);
            } else {
                bf16_pairs(rowb + c * kChunk, w[0], w[1]);
            }
            vstore(dst + c * kChunk, vmul(w[0], fv));
            vstore(dst + c * kChunk + kLanes, vmul(w[1], fv));
        }
        if (full < chunks) {
            if (f32) {
                scalar_chunk<FmaDot, false>([rowf](Index col) { return rowf[col]; }, full, k, w);
            } else {
                scalar_chunk<FmaDot, false>([rowb](Index col) { return bf16_value(rowb[col]); },
                                            full, k, w);
            }
            vstore(dst + full * kChunk, vmul(w[0], fv));
            vstore(dst + full * kChunk + kLanes, vmul(w[1], fv));
        }
    }
}

#if defined(MOELB_QUANT_BF16_DOT)
// Bf16Dot's x rows (bf16 x only): row i's values times 2^P_i, in order, zero-padded to whole
// chunks, P_i = -E_i clamped to [-126, 126] (max |x_i| < 2^E_i; P_i = 0 for a zero row or one
// with inf or NaN), so the row's largest |value| lies in [1/2, 1) and the products with W's
// values (int8 codes, fp8 values up to 448, bf16) neither overflow nor reach vdpbf16ps's flush to
// zero while they matter: each value is x * 2^P_i rounded to float32 (exact unless below 2^-126,
// where vdpbf16ps reads it as zero anyway) and kept as its top 16 bits. xg[i] = 2^-P_i undoes it
// (output, block_flush).
void arrange_x_bf16(const QuantGemmArgs& a, Index k, Index kp, std::uint16_t* xp, float* xg) {
    const Index padded = round_up(k, kChunk);
    for (Index i = 0; i < a.m; ++i) {
        const std::uint16_t* row = static_cast<const std::uint16_t*>(a.x) + i * a.x_stride;
        const std::uint32_t max_bits = row_max_bits(a, i, k);
        int p = 0;
        if (max_bits != 0 && max_bits < 0x7F800000u) {
            int e = 0;
            std::frexp(std::bit_cast<float>(max_bits), &e);
            p = -e < -126 ? -126 : (-e > 126 ? 126 : -e);
        }
        const float f = std::ldexp(1.0f, p);
        xg[i] = std::ldexp(1.0f, -p);
        std::uint16_t* dst = xp + i * kp;
        for (Index c = 0; c < k; ++c) dst[c] = bf16_bits(bf16_value(row[c]) * f);
        for (Index c = k; c < padded; ++c) dst[c] = 0;
    }
}
#endif

// ---- The drivers --------------------------------------------------------------------------------

struct Layout {
    Index k, kp, chunks, full;  // kp: the panels' row stride in elements (panel_stride)
    float* xp;                  // [m, kp] (bf16 elements for Bf16Dot)
    float* xg;                  // [m]: the x rows' factors
    float* acc;                 // [m, kBlockRows, kLanes]
    float* wp;                  // [kBlockRows, kp] (prefill; bf16 elements for Bf16Dot)
};

MOELB_INLINE void zero(float* p, Index n) {
    for (Index t = 0; t < n; t += kLanes) vstore(p + t, vzero());
}

// y[i, j] from its lane sums and x row i's factor g (applied at each fp8 block's end, else to the
// lane-tree's sum: exact, a power of two; 1 for FmaDot).
template <class Loader>
MOELB_INLINE float output(const Loader& ld, Index j, bool poisoned, const float* lanes, float g) {
    if (poisoned) return std::numeric_limits<float>::quiet_NaN();
    const float sum = vsum(vload(lanes));
    return ld.finish(j, Loader::kBlockScale ? sum : sum * g);
}

// k-blocks: a multiple of the loader's segments (fp8: whole scale blocks).
template <class Loader>
Index kblock_chunks(const Loader& ld, Index want) {
    if constexpr (Loader::kBlockScale) {
        return round_up(want, ld.block_chunks);
    } else {
        (void)ld;
        return want;
    }
}

template <class Loader>
void run_decode(Loader& ld, const QuantGemmArgs& a, const Layout& L) {
    using XT = typename Loader::Dot::XT;
    const XT* xp = reinterpret_cast<const XT*>(L.xp);
    const int mg_max = a.m < kMaxDecodeX ? static_cast<int>(a.m) : kMaxDecodeX;
    const int rows = mg_max <= 2 ? 4 : 3;  // rows * mg_max <= 12 accumulators
    const Index block = a.m <= mg_max ? L.chunks : kblock_chunks(ld, kDecodeBlockChunks);
    const Index acc_stride = rows * kLanes;
    for (Index j0 = a.n_begin; j0 < a.n_end; j0 += rows) {
        const int r = static_cast<int>(a.n_end - j0 < rows ? a.n_end - j0 : rows);
        ld.bind(j0, r);
        zero(L.acc, a.m * acc_stride);
        for (Index c0 = 0; c0 < L.chunks; c0 += block) {
            const Index c1 = c0 + block < L.chunks ? c0 + block : L.chunks;
            for (Index i0 = 0; i0 < a.m; i0 += mg_max) {
                const int mg = static_cast<int>(a.m - i0 < mg_max ? a.m - i0 : mg_max);
                DecodeTiles<Loader>::kFn[r - 1][mg - 1](ld, xp + i0 * L.kp, L.kp, c0, c1, L.full,
                                                        L.acc + i0 * acc_stride, acc_stride,
                                                        L.xg + i0);
            }
        }
        for (Index i = 0; i < a.m; ++i) {
            for (int j = 0; j < r; ++j) {
                a.y[i * a.y_stride + j0 + j] = output(ld, j0 + j, ld.poisoned(j),
                                                      L.acc + i * acc_stride + j * kLanes, L.xg[i]);
            }
        }
    }
}

template <class Loader>
void run_prefill(Loader& ld, const QuantGemmArgs& a, const Layout& L) {
    using Dot = typename Loader::Dot;
    const auto* xp = reinterpret_cast<const typename Dot::XT*>(L.xp);
    auto* wp = reinterpret_cast<typename Dot::WT*>(L.wp);
    const Index acc_stride = kBlockRows * kLanes;
    const Index kblock = kblock_chunks(ld, kPrefillBlockChunks);
    Index block_chunks = 1;
    if constexpr (Loader::kBlockScale) block_chunks = ld.block_chunks;
    bool poisoned[kBlockRows];
    const float* scales[kBlockRows] = {};
    for (Index jb = a.n_begin; jb < a.n_end; jb += kBlockRows) {
        const int nb = static_cast<int>(a.n_end - jb < kBlockRows ? a.n_end - jb : kBlockRows);
        // The block's rows, converted into the W panel.
        for (int jj = 0; jj < nb; ++jj) {
            ld.bind(jb + jj, 1);
            typename Dot::WT* dst = wp + jj * L.kp;
            Parts<Dot> w;
            if constexpr (Loader::kBlockScale) ld.template check_nan<1>(0, L.full);
            for (Index c = 0; c < L.full; ++c) {
                ld.chunk(0, c, w);
                for (int h = 0; h < Dot::kParts; ++h) {
                    Dot::store(dst + c * kChunk + h * Dot::kPartElems, w[h]);
                }
            }
            if (L.full < L.chunks) {
                ld.tail(0, L.full, w);
                for (int h = 0; h < Dot::kParts; ++h) {
                    Dot::store(dst + L.full * kChunk + h * Dot::kPartElems, w[h]);
                }
            }
            poisoned[jj] = ld.poisoned(0);
            if constexpr (Loader::kBlockScale) scales[jj] = ld.scale_row[0];
        }
        zero(L.acc, a.m * acc_stride);
        // Rows of x in groups whose k-block slices (and accumulators) stay in L2.
        for (Index g0 = 0; g0 < a.m; g0 += kPrefillRowGroup) {
            const Index g1 = g0 + kPrefillRowGroup < a.m ? g0 + kPrefillRowGroup : a.m;
            for (Index c0 = 0; c0 < L.chunks; c0 += kblock) {
                const Index c1 = c0 + kblock < L.chunks ? c0 + kblock : L.chunks;
                // Each tile's W rows (kTileW k-block slices) stay in L1 while the group's x rows
                // pass them; x comes from L2 (32 / kTileW bytes per FMA, against 32 / kTileX the
                // other way round).
                for (int jq = 0; jq < nb; jq += kTileW) {
                    const int nr = nb - jq < kTileW ? nb - jq : kTileW;
                    for (Index i0 = g0; i0 < g1; i0 += kTileX) {
                        const int mr = static_cast<int>(g1 - i0 < kTileX ? g1 - i0 : kTileX);
                        PanelTiles<Loader::kBlockScale, Dot>::kFn[mr - 1][nr - 1](
                            xp + i0 * L.kp, wp + jq * L.kp, L.kp, c0, c1,
                            L.acc + i0 * acc_stride + jq * kLanes, acc_stride, L.xg + i0,
                            scales + jq, block_chunks, c0 / block_chunks);
                    }
                }
            }
        }
        for (Index i = 0; i < a.m; ++i) {
            for (int j = 0; j < nb; ++j) {
                a.y[i * a.y_stride + jb + j] =
                    output(ld, jb + j, poisoned[j], L.acc + i * acc_stride + j * kLanes, L.xg[i]);
            }
        }
    }
}

// One float32 multiply-add as this path's vmadd does it (fused where the path has FMA).
MOELB_INLINE float madd1(float a, float b, float c) {
#if defined(MOELB_QUANT_AVX2)
    return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)));
#elif defined(MOELB_QUANT_SSE2)
    return _mm_cvtss_f32(_mm_add_ss(_mm_mul_ss(_mm_set_ss(a), _mm_set_ss(b)), _mm_set_ss(c)));
#else
    return std::fma(a, b, c);
#endif
}

// fp8 with scale blocks that are not whole chunks (block_cols % kChunk != 0), any m, FmaDot: the
// natural layout's lanes one value at a time (lane l: columns l, l + kLanes, ...), lane l's sum
// closed (added into the lane's total as in block_flush) whenever its next column is in another
// scale block, and at the end; columns past k are skipped. Slow, and the same for every m.
void run_fp8_lanes(Fp8Rows<FmaDot>& ld, const QuantGemmArgs& a, const Layout& L) {
    for (Index j = a.n_begin; j < a.n_end; ++j) {
        ld.bind(j, 1);
        const std::uint8_t* q = ld.row[0];
        const float* s = ld.scale_row[0];
        bool nan = false;
        for (Index c = 0; c < L.k; ++c) nan = nan || fp8_is_nan(q[c]);
        for (Index i = 0; i < a.m; ++i) {
            const float* x = L.xp + i * L.kp;
            alignas(64) float total[kLanes] = {};
            for (int l = 0; l < kLanes; ++l) {
                float sum = 0.0f;
                Index block = -1;
                for (Index col = l; col < L.k; col += kLanes) {
                    const Index b = col / ld.block_cols;
                    if (b != block) {
                        if (block >= 0) total[l] = madd1(sum * L.xg[i], s[block], total[l]);
                        sum = 0.0f;
                        block = b;
                    }
                    sum = madd1(x[col], fp8_scaled(q[col]), sum);
                }
                if (block >= 0) total[l] = madd1(sum * L.xg[i], s[block], total[l]);
            }
            a.y[i * a.y_stride + j] = output(ld, j, nan, total, L.xg[i]);
        }
    }
}

template <class Loader>
void run(Loader& ld, const QuantGemmArgs& a, const Layout& L) {
    if (a.m >= kPrefillRows) {
        run_prefill(ld, a, L);
    } else {
        run_decode(ld, a, L);
    }
}

// W's loader for this Dot, then the driver.
template <class Dot>
void run_weights(const QuantGemmArgs& a, const Layout& L) {
    const QuantWeights& w = a.w;
    const Index k = w.cols;
    switch (w.type) {
        case WeightType::kFloat32:
            if constexpr (std::is_same_v<Dot, FmaDot>) {
                F32Rows ld{{static_cast<const float*>(w.data), k, 0, {}}};
                run(ld, a, L);
            }
            return;
        case WeightType::kBfloat16: {
            Bf16Rows<Dot> ld{{static_cast<const std::uint16_t*>(w.data), k, 0, {}}};
            run(ld, a, L);
            return;
        }
        case WeightType::kFp8E4m3: {
            Fp8Rows<Dot> ld{};
            ld.data = static_cast<const std::uint8_t*>(w.data);
            ld.cols = k;
            ld.scale_inv = w.scale_inv;
            ld.block_rows = w.block_rows;
            ld.block_cols = w.block_cols;
            ld.grid_cols = (k + w.block_cols - 1) / w.block_cols;
            ld.block_chunks = w.block_cols / kChunk;
            if (w.block_cols % kChunk == 0) {
                run(ld, a, L);
            } else if constexpr (std::is_same_v<Dot, FmaDot>) {
                run_fp8_lanes(ld, a, L);
            }
            return;
        }
        case WeightType::kInt8: {
            Int8Rows<Dot> ld{};
            ld.data = static_cast<const std::int8_t*>(w.data);
            ld.cols = k;
            ld.scale_inv = w.scale_inv;
            run(ld, a, L);
            return;
        }
    }
}

// The scratch's parts, in floats (float32 panels; Bf16Dot's bf16 panels take no more bytes).
struct ScratchFloats {
    Index x, xg, acc, w;
};
ScratchFloats scratch_floats(Index m, Index k) {
    const Index kp = panel_stride(k);
    return {m * kp, round_up(m, 16), m * kBlockRows * kLanes,
            m >= kPrefillRows ? kBlockRows * kp : 0};
}
static_assert(panel_stride(7168, 2) * 2 <= panel_stride(7168) * 4);

constexpr std::size_t kAlign = 64;

void check(bool ok, const char* message) {
    if (!ok) throw std::invalid_argument(message);
}

}  // namespace

std::size_t quant_gemm_scratch_bytes(Index m, Index k) {
    if (m <= 0) return 0;
    const ScratchFloats s = scratch_floats(m, k < 0 ? 0 : k);
    return static_cast<std::size_t>(s.x + s.xg + s.acc + s.w) * sizeof(float) + kAlign;
}

void quant_gemm(const QuantGemmArgs& a) {
    const QuantWeights& w = a.w;
    check(a.m >= 0, "quant_gemm: m < 0");
    check(w.rows >= 0 && w.cols >= 0, "quant_gemm: w.rows or w.cols < 0");
    check(0 <= a.n_begin && a.n_begin <= a.n_end && a.n_end <= w.rows,
          "quant_gemm: the column range [n_begin, n_end) is not within [0, w.rows]");
    if (a.m == 0 || a.n_begin == a.n_end) return;
    check(a.y != nullptr && (a.m == 1 || a.y_stride >= a.n_end),
          "quant_gemm: y is null or y_stride < n_end");
    check(a.x != nullptr || w.cols == 0, "quant_gemm: x is null");
    check(a.m == 1 || a.x_stride >= w.cols, "quant_gemm: x_stride < w.cols");
    check(a.x_type == ActivationType::kFloat32 || a.x_type == ActivationType::kBfloat16,
          "quant_gemm: unknown x_type");
    check(w.type == WeightType::kFloat32 || w.type == WeightType::kBfloat16 ||
              w.type == WeightType::kFp8E4m3 || w.type == WeightType::kInt8,
          "quant_gemm: unknown w.type");
    check(w.data != nullptr || w.cols == 0, "quant_gemm: w.data is null");
    if (w.type == WeightType::kFp8E4m3) {
        check(w.block_rows >= 1 && w.block_cols >= 1, "quant_gemm: w.block_rows or block_cols < 1");
    }
    if (w.type == WeightType::kFp8E4m3 || w.type == WeightType::kInt8) {
        check(w.scale_inv != nullptr, "quant_gemm: w.scale_inv is null");
    }
    check(a.scratch != nullptr && a.scratch_bytes >= quant_gemm_scratch_bytes(a.m, w.cols),
          "quant_gemm: scratch smaller than quant_gemm_scratch_bytes(m, w.cols)");

    const Index k = w.cols;
    // vdpbf16ps (Bf16Dot) for bf16 x with bf16, int8, or fp8 W whose scale blocks are whole
    // chunks; FmaDot otherwise (a float32 W keeps float32 products).
#if defined(MOELB_QUANT_BF16_DOT)
    const bool bf16_dot = a.x_type == ActivationType::kBfloat16 &&
                          (w.type == WeightType::kBfloat16 || w.type == WeightType::kInt8 ||
                           (w.type == WeightType::kFp8E4m3 && w.block_cols % kChunk == 0));
#else
    constexpr bool bf16_dot = false;
#endif
    const ScratchFloats parts = scratch_floats(a.m, k);
    const auto base = reinterpret_cast<std::uintptr_t>(a.scratch);
    float* aligned = reinterpret_cast<float*>((base + kAlign - 1) / kAlign * kAlign);
    const Layout L{k,
                   panel_stride(k, bf16_dot ? 2 : sizeof(float)),
                   (k + kChunk - 1) / kChunk,
                   k / kChunk,
                   aligned,
                   aligned + parts.x,
                   aligned + parts.x + parts.xg,
                   aligned + parts.x + parts.xg + parts.acc};
    if (bf16_dot) {
#if defined(MOELB_QUANT_BF16_DOT)
        arrange_x_bf16(a, k, L.kp, reinterpret_cast<std::uint16_t*>(L.xp), L.xg);
        run_weights<Bf16Dot>(a, L);
#endif
        return;
    }
    arrange_x(a, k, L.kp, L.xp, L.xg, w.type == WeightType::kInt8 || w.type == WeightType::kFp8E4m3,
              w.type == WeightType::kFp8E4m3);
    run_weights<FmaDot>(a, L);
}

}  // namespace moelb::MOELB_ISA_NS
