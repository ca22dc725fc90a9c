// The GEMM with a quantised right-hand side of one ISA path (isa/kernels.hpp: quant_gemm; compiled
// once per path): y = x * dequant(W)^T for W in float32, bf16, fp8 E4M3FN with block scales or int8
// with row scales, and x in float32 or bf16.
//
// One dot-product order for every y[i, j], whatever the call. k is cut into chunks of kChunk =
// 2 * kLanes values from column 0, the last one zero-padded; lane l of one vector accumulator
// takes, chunk after chunk, the product of the chunk's values 2l (the "even" vector) and then
// 2l + 1 (the "odd" vector), as FMAs where the path has them (mul then add on SSE2); a fixed tree
// sums the accumulator's lanes at the end. Tiles, k-blocks (accumulators parked in the scratch
// between them), which rows of x share a pass over W: these change when each FMA runs, never its
// operands, so y[i, j]'s bits depend only on x row i, W row j and the path. Every weight is
// dequantised exactly as float(q) * scale (one float32 rounding), so a quantised W and its float32
// dequantisation give the same bits; so do a bf16 x and its float32 values.
//
// The even/odd layout makes bf16 cheap: a 32-bit lane holding two bf16 gives the even value by a
// shift and the odd one by a mask. x is arranged in this layout once per call (the x panel, float32
// in the scratch). Decode (small m): W is streamed once, each chunk of kRows rows converted in
// registers and multiplied into every row of x. Prefill (large m): kBlockRows rows of W at a time
// are dequantised into a float32 panel in the scratch, then register tiles of kTileX rows of x by
// kTileW rows of W run over k-blocks that stay in L1.
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>

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

#if defined(MOELB_QUANT_AVX2)
constexpr int kLanes = 8;
using Vec = __m256;
MOELB_INLINE Vec vzero() { return _mm256_setzero_ps(); }
MOELB_INLINE Vec vset1(float s) { return _mm256_set1_ps(s); }
MOELB_INLINE Vec vload(const float* p) { return _mm256_load_ps(p); }
MOELB_INLINE void vstore(float* p, Vec v) { _mm256_store_ps(p, v); }
MOELB_INLINE Vec vmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
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

#ifndef MOELB_PREFETCH_BYTES
#define MOELB_PREFETCH_BYTES 1024
#endif
// Decode streams kRows rows of W at once, each a small step per chunk: too few cache lines in
// flight for the memory's latency, so each row is prefetched this many bytes ahead.
constexpr Index kPrefetchBytes = MOELB_PREFETCH_BYTES;
MOELB_INLINE void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(p, 0, 3);
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
// Prefill: W rows per panel (each pass over the x panel serves this many rows: 32 measured ~25%
// faster than 16 at m = 512 here), register tile kTileX x kTileW, k-blocks of
// kPrefillBlockChunks.
#ifndef MOELB_QUANT_BLOCK_ROWS
#define MOELB_QUANT_BLOCK_ROWS 32
#endif
constexpr int kBlockRows = MOELB_QUANT_BLOCK_ROWS;
constexpr int kTileX = 3;
constexpr int kTileW = 4;
constexpr Index kPrefillBlockChunks = 16;
// Prefill: rows of x per pass over a W block's k-blocks (a multiple of kTileX), so that their
// k-block slices (96 KiB at 256 values) and accumulators stay in L2.
#ifndef MOELB_QUANT_ROW_GROUP
#define MOELB_QUANT_ROW_GROUP 96
#endif
constexpr Index kPrefillRowGroup = MOELB_QUANT_ROW_GROUP;
static_assert(kBlockRows % kTileW == 0);

constexpr Index round_up(Index v, Index to) { return (v + to - 1) / to * to; }

// The panels' row stride in floats: whole chunks and 64-byte lines, and 17 lines (mod 64) more
// than a multiple of 4 KiB. When k is a multiple of 1024 (k = 7168: rows 28 KiB apart, 7 x 4 KiB)
// every row's k-block would fall into the same L1 sets and the prefill tiles' 16 + 3 rows would
// evict each other; 17 lines apart, a k-block of 16 lines of each row spreads over all 64 sets.
constexpr Index panel_stride(Index k) {
    constexpr Index line = 64 / sizeof(float);
    const Index lines = round_up(k, kChunk > line ? kChunk : line) / line;
    return (lines + ((17 - lines) % 64 + 64) % 64) * line;
}
static_assert(kChunk <= 16 || kChunk % 16 == 0);

// ---- Exact scalar conversions ----------------------------------------------------------------

float bf16_value(std::uint16_t bits) { return std::bit_cast<float>(std::uint32_t{bits} << 16); }

// The 256 E4M3FN values: bias 7, subnormals m * 2^-9, 0x7F and 0xFF NaN, no infinities.
struct Fp8Table {
    float v[256];
};
constexpr Fp8Table make_fp8_table() {
    Fp8Table t{};
    for (unsigned b = 0; b < 256; ++b) {
        const unsigned e = (b >> 3) & 15u, mant = b & 7u;
        float mag = 0.0f;
        if ((b & 0x7Fu) == 0x7Fu) {
            mag = std::numeric_limits<float>::quiet_NaN();
        } else if (e == 0) {
            mag = static_cast<float>(mant) * 0x1p-9f;
        } else {
            mag = std::bit_cast<float>(((e + 120u) << 23) | (mant << 20));
        }
        t.v[b] = (b & 0x80u) != 0 ? -mag : mag;
    }
    return t;
}
constexpr Fp8Table kFp8 = make_fp8_table();

// ---- Reading W: one loader per stored type --------------------------------------------------
//
// A loader reads up to kBlockRows rows of W bound by bind(j0, rows): chunk(jj, c, e, o) gives the
// even and odd vectors of row j0 + jj's chunk c (a whole chunk: (c + 1) * kChunk <= cols), tail()
// the same for the partial last chunk (zero-padded). Calls run in segments: begin_segment(c, end)
// and then chunks c..end - 1, end = segment_end(c, ...) (fp8: within one scale block, whose scales
// it loads once and whose bytes it checks for NaN codes once).

// Row j's chunk from its scalar values (exact), zero-padded past cols.
template <class Value>
MOELB_INLINE void scalar_chunk(const Value& value, Index c, Index cols, Vec& e, Vec& o) {
    alignas(64) float v[kChunk];
    const Index c0 = c * kChunk;
    for (int t = 0; t < kChunk; ++t) v[t] = c0 + t < cols ? value(c0 + t) : 0.0f;
    deinterleave(v, e, o);
}

struct F32Rows {
    static constexpr bool kPairs = false;
    const float* data;
    Index cols;
    const float* row[kBlockRows];

    void bind(Index j0, int rows) {
        for (int jj = 0; jj < rows; ++jj) row[jj] = data + (j0 + jj) * cols;
    }
    Index segment_end(Index, Index end) const { return end; }
    void begin_segment(Index, Index) {}
    MOELB_INLINE void chunk(int jj, Index c, Vec& e, Vec& o) const {
        prefetch(reinterpret_cast<const char*>(row[jj] + c * kChunk) + kPrefetchBytes);
        deinterleave(row[jj] + c * kChunk, e, o);
    }
    void tail(int jj, Index c, Vec& e, Vec& o) const {
        const float* r = row[jj];
        scalar_chunk([r](Index col) { return r[col]; }, c, cols, e, o);
    }
};

struct Bf16Rows {
    static constexpr bool kPairs = false;
    const std::uint16_t* data;
    Index cols;
    const std::uint16_t* row[kBlockRows];

    void bind(Index j0, int rows) {
        for (int jj = 0; jj < rows; ++jj) row[jj] = data + (j0 + jj) * cols;
    }
    Index segment_end(Index, Index end) const { return end; }
    void begin_segment(Index, Index) {}
    MOELB_INLINE void chunk(int jj, Index c, Vec& e, Vec& o) const {
        prefetch(reinterpret_cast<const char*>(row[jj] + c * kChunk) + kPrefetchBytes);
        bf16_pairs(row[jj] + c * kChunk, e, o);
    }
    void tail(int jj, Index c, Vec& e, Vec& o) const {
        const std::uint16_t* r = row[jj];
        scalar_chunk([r](Index col) { return bf16_value(r[col]); }, c, cols, e, o);
    }
};

#if defined(MOELB_QUANT_AVX2)
// The byte order that puts a chunk's even bytes first, then its odd bytes.
MOELB_INLINE __m128i even_odd_bytes(__m128i raw) {
    return _mm_shuffle_epi8(raw,
                            _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
}
#endif

struct Int8Rows {
    static constexpr bool kPairs = false;
    const std::int8_t* data;
    Index cols;
    const float* scale_inv;  // [rows]
    const std::int8_t* row[kBlockRows];
    float scale[kBlockRows];
    Vec scale_vec[kBlockRows];

    void bind(Index j0, int rows) {
        for (int jj = 0; jj < rows; ++jj) {
            row[jj] = data + (j0 + jj) * cols;
            scale[jj] = scale_inv[j0 + jj];
            scale_vec[jj] = vset1(scale[jj]);
        }
    }
    Index segment_end(Index, Index end) const { return end; }
    void begin_segment(Index, Index) {}
    MOELB_INLINE void chunk(int jj, Index c, Vec& e, Vec& o) const {
        prefetch(row[jj] + c * kChunk + kPrefetchBytes);
#if defined(MOELB_QUANT_AVX2)
        const __m128i d =
            even_odd_bytes(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row[jj] + c * kChunk)));
        e = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(d)), scale_vec[jj]);
        o = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(d, d))),
                          scale_vec[jj]);
#else
        tail(jj, c, e, o);
#endif
    }
    void tail(int jj, Index c, Vec& e, Vec& o) const {
        const std::int8_t* r = row[jj];
        const float s = scale[jj];
        scalar_chunk([r, s](Index col) { return static_cast<float>(r[col]) * s; }, c, cols, e, o);
    }
};

struct Fp8Rows {
#if defined(MOELB_QUANT_AVX2)
    static constexpr bool kPairs = true;  // chunk2(): two chunks from one 32-byte load
#else
    static constexpr bool kPairs = false;
#endif
    const std::uint8_t* data;
    Index cols;
    const float* scale_inv;  // [ceil(rows / block_rows), grid_cols]
    Index block_rows, block_cols, grid_cols;
    // Whether each chunk lies in one scale block (block_cols % kChunk == 0): the vector path.
    bool aligned_blocks;
    Index block_chunks;  // block_cols / kChunk when aligned_blocks
    int rows = 0;
    const std::uint8_t* row[kBlockRows];
    const float* scale_row[kBlockRows];
    // The current segment's scale block, per row: scale * 2^8 (see chunk()) and whether the
    // vector conversion applies (a scale of at most 2^100, which * 2^8 stays exact).
    Vec scale256[kBlockRows];
    bool fast[kBlockRows];

    void bind(Index j0, int n) {
        rows = n;
        for (int jj = 0; jj < n; ++jj) {
            row[jj] = data + (j0 + jj) * cols;
            scale_row[jj] = scale_inv + ((j0 + jj) / block_rows) * grid_cols;
        }
    }
    Index segment_end(Index c, Index end) const {
        if (!aligned_blocks) return end;
        const Index block_end = (c / block_chunks + 1) * block_chunks;
        return block_end < end ? block_end : end;
    }
    void begin_segment(Index c, Index end) {
        if (!aligned_blocks) {
            for (int jj = 0; jj < rows; ++jj) fast[jj] = false;
            return;
        }
        const Index b = c / block_chunks;
        for (int jj = 0; jj < rows; ++jj) {
            const float s = scale_row[jj][b];
            bool ok = std::fabs(s) <= 0x1p100f;
#if defined(MOELB_QUANT_AVX2)
            // A NaN code (0x7F, 0xFF) in the segment's whole chunks sends them to the scalar path.
            if (ok && end > c) {
                const std::uint8_t* p = row[jj] + c * kChunk;
                const Index bytes = (end - c) * kChunk;
                const __m256i mag = _mm256_set1_epi8(0x7F);
                __m256i nan = _mm256_setzero_si256();
                Index t = 0;
                for (; t + 32 <= bytes; t += 32) {
                    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + t));
                    nan = _mm256_or_si256(nan, _mm256_cmpeq_epi8(_mm256_and_si256(v, mag), mag));
                }
                if (t < bytes) {  // one chunk of 16 bytes left
                    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + t));
                    const __m128i m = _mm256_castsi256_si128(mag);
                    nan = _mm256_or_si256(
                        nan, _mm256_castsi128_si256(_mm_cmpeq_epi8(_mm_and_si128(v, m), m)));
                }
                ok = _mm256_movemask_epi8(nan) == 0;
            }
#else
            (void)end;
#endif
            fast[jj] = ok;
            scale256[jj] = vset1(ok ? s * 256.0f : 0.0f);
        }
    }
    // The vector path: the byte b = s eeee mmm, doubled into the 16 bits (b << 8 | b) and shifted
    // right arithmetically by 1, has s in bits 15 and 14 and eeee mmm in bits 13 to 7; cleared of
    // bit 14 and bits 6 to 0 it is the float16 with sign s, exponent 0eeee and mantissa mmm0000000:
    // the E4M3 value times 2^-8 (bias 15 against 7), subnormals included, exact. F16C widens it;
    // one multiply by scale * 2^8 rounds fp8 * scale once, as the scalar path does. Segments with a
    // NaN code (which would come out finite) or a huge scale take the scalar path.
    MOELB_INLINE void chunk(int jj, Index c, Vec& e, Vec& o) const {
        prefetch(row[jj] + c * kChunk + kPrefetchBytes);
#if defined(MOELB_QUANT_AVX2)
        if (fast[jj]) [[likely]] {
            const __m128i d = even_odd_bytes(
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(row[jj] + c * kChunk)));
            const __m128i mask = _mm_set1_epi16(static_cast<short>(0xBF80));
            const __m128i lo = _mm_and_si128(_mm_srai_epi16(_mm_unpacklo_epi8(d, d), 1), mask);
            const __m128i hi = _mm_and_si128(_mm_srai_epi16(_mm_unpackhi_epi8(d, d), 1), mask);
            e = _mm256_mul_ps(_mm256_cvtph_ps(lo), scale256[jj]);
            o = _mm256_mul_ps(_mm256_cvtph_ps(hi), scale256[jj]);
            return;
        }
#endif
        tail(jj, c, e, o);
    }
#if defined(MOELB_QUANT_AVX2)
    // Chunks c and c + 1 (both whole, in this segment) as chunk() gives them, from one 32-byte
    // load: the byte shuffle and the unpacks work within each 128-bit half, one chunk each.
    MOELB_INLINE void chunk2(int jj, Index c, Vec& e0, Vec& o0, Vec& e1, Vec& o1) const {
        prefetch(row[jj] + c * kChunk + kPrefetchBytes);
        if (fast[jj]) [[likely]] {
            const __m256i raw =
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[jj] + c * kChunk));
            const __m256i d = _mm256_shuffle_epi8(
                raw, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4,
                                      6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
            const __m256i mask = _mm256_set1_epi16(static_cast<short>(0xBF80));
            const __m256i lo =
                _mm256_and_si256(_mm256_srai_epi16(_mm256_unpacklo_epi8(d, d), 1), mask);
            const __m256i hi =
                _mm256_and_si256(_mm256_srai_epi16(_mm256_unpackhi_epi8(d, d), 1), mask);
            e0 = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(lo)), scale256[jj]);
            o0 = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(hi)), scale256[jj]);
            e1 = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(lo, 1)), scale256[jj]);
            o1 = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(hi, 1)), scale256[jj]);
            return;
        }
        tail(jj, c, e0, o0);
        tail(jj, c + 1, e1, o1);
    }
#endif
    void tail(int jj, Index c, Vec& e, Vec& o) const {
        const std::uint8_t* r = row[jj];
        const float* s = scale_row[jj];
        const Index bc = block_cols;
        scalar_chunk([r, s, bc](Index col) { return kFp8.v[r[col]] * s[col / bc]; }, c, cols, e, o);
    }
};

// ---- Register tiles --------------------------------------------------------------------------

// One decode step: chunk c of W rows [0, R) (whole, or the zero-padded tail) into the
// accumulators of x rows [0, MG); xc = the x panel at chunk c (row stride kp).
template <bool kTail, int R, int MG, class Loader>
MOELB_INLINE void decode_step(const Loader& ld, const float* xc, Index kp, Index c,
                              Vec (&a)[MG][R]) {
#pragma GCC unroll 4
    for (int j = 0; j < R; ++j) {
        Vec e, o;
        if constexpr (kTail) {
            ld.tail(j, c, e, o);
        } else {
            ld.chunk(j, c, e, o);
        }
#pragma GCC unroll 4
        for (int i = 0; i < MG; ++i) {
            a[i][j] = vmadd(vload(xc + i * kp), e, a[i][j]);
            a[i][j] = vmadd(vload(xc + i * kp + kLanes), o, a[i][j]);
        }
    }
}

// Two decode steps, chunks c and c + 1, from the loader's chunk2 (the same values and order).
template <int R, int MG, class Loader>
MOELB_INLINE void decode_pair(const Loader& ld, const float* xc, Index kp, Index c,
                              Vec (&a)[MG][R]) {
    if constexpr (Loader::kPairs) {
#pragma GCC unroll 4
        for (int j = 0; j < R; ++j) {
            Vec e0, o0, e1, o1;
            ld.chunk2(j, c, e0, o0, e1, o1);
#pragma GCC unroll 4
            for (int i = 0; i < MG; ++i) {
                a[i][j] = vmadd(vload(xc + i * kp), e0, a[i][j]);
                a[i][j] = vmadd(vload(xc + i * kp + kLanes), o0, a[i][j]);
                a[i][j] = vmadd(vload(xc + i * kp + kChunk), e1, a[i][j]);
                a[i][j] = vmadd(vload(xc + i * kp + kChunk + kLanes), o1, a[i][j]);
            }
        }
    }
}

// Decode: W rows j0 + [0, R) (bound in ld) against x rows [0, MG) of the x panel xp (row stride
// kp), chunks [c0, c1); `full` = the number of whole chunks (chunk `full`, if below c1, is the
// partial last one). acc: the accumulators, acc[i * acc_stride + j * kLanes].
template <int R, int MG, class Loader>
void decode_tile(Loader& ld, const float* xp, Index kp, Index c0, Index c1, Index full, float* acc,
                 Index acc_stride) {
    Vec a[MG][R];
#pragma GCC unroll 4
    for (int i = 0; i < MG; ++i) {
#pragma GCC unroll 4
        for (int j = 0; j < R; ++j) a[i][j] = vload(acc + i * acc_stride + j * kLanes);
    }
    const Index whole_end = c1 < full ? c1 : full;
    for (Index c = c0; c < whole_end;) {
        const Index seg_end = ld.segment_end(c, whole_end);
        ld.begin_segment(c, seg_end);
        if constexpr (Loader::kPairs) {
            for (; c + 1 < seg_end; c += 2) decode_pair(ld, xp + c * kChunk, kp, c, a);
        }
        for (; c < seg_end; ++c) decode_step<false>(ld, xp + c * kChunk, kp, c, a);
    }
    if (c1 > full) {
        ld.begin_segment(full, full);
        decode_step<true>(ld, xp + full * kChunk, kp, full, a);
    }
#pragma GCC unroll 4
    for (int i = 0; i < MG; ++i) {
#pragma GCC unroll 4
        for (int j = 0; j < R; ++j) vstore(acc + i * acc_stride + j * kLanes, a[i][j]);
    }
}

// Prefill: x panel rows [0, MR) (row stride kp) against W panel rows [0, NR) (row stride kp),
// chunks [c0, c1). Per chunk the even halves, then the odd ones: each accumulator still takes
// its even product before its odd one.
template <int MR, int NR>
void panel_tile(const float* xp, const float* wp, Index kp, Index c0, Index c1, float* acc,
                Index acc_stride) {
    Vec a[MR][NR];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
        for (int j = 0; j < NR; ++j) a[i][j] = vload(acc + i * acc_stride + j * kLanes);
    }
    for (Index c = c0; c < c1; ++c) {
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
            const Index off = c * kChunk + h * kLanes;
            Vec x[MR];
#pragma GCC unroll 4
            for (int i = 0; i < MR; ++i) x[i] = vload(xp + i * kp + off);
#pragma GCC unroll 4
            for (int j = 0; j < NR; ++j) {
                const Vec w = vload(wp + j * kp + off);
#pragma GCC unroll 4
                for (int i = 0; i < MR; ++i) a[i][j] = vmadd(x[i], w, a[i][j]);
            }
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
        for (int j = 0; j < NR; ++j) vstore(acc + i * acc_stride + j * kLanes, a[i][j]);
    }
}

// The tile instances by size: [rows of W - 1][rows of x - 1] (plain arrays: a std::array of
// function pointers would be a template instance without this path's tag).
template <class Loader>
struct DecodeTiles {
    using Fn = void (*)(Loader&, const float*, Index, Index, Index, Index, float*, Index);
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

using PanelTileFn = void (*)(const float*, const float*, Index, Index, Index, float*, Index);
// [rows of x - 1][rows of W - 1].
constexpr PanelTileFn kPanelTiles[kTileX][kTileW] = {
    {&panel_tile<1, 1>, &panel_tile<1, 2>, &panel_tile<1, 3>, &panel_tile<1, 4>},
    {&panel_tile<2, 1>, &panel_tile<2, 2>, &panel_tile<2, 3>, &panel_tile<2, 4>},
    {&panel_tile<3, 1>, &panel_tile<3, 2>, &panel_tile<3, 3>, &panel_tile<3, 4>},
};
static_assert(kTileX == 3 && kTileW == 4);

// ---- The x panel ------------------------------------------------------------------------------

// x rows [0, m) in the even/odd layout: row i at xp + i * kp, chunk c at + c * kChunk (even
// values, then odd), the last chunk zero-padded.
void arrange_x(const QuantGemmArgs& a, Index k, Index kp, float* xp) {
    const Index full = k / kChunk, chunks = (k + kChunk - 1) / kChunk;
    for (Index i = 0; i < a.m; ++i) {
        float* dst = xp + i * kp;
        Vec e, o;
        if (a.x_type == ActivationType::kFloat32) {
            const float* row = static_cast<const float*>(a.x) + i * a.x_stride;
            for (Index c = 0; c < full; ++c) {
                deinterleave(row + c * kChunk, e, o);
                vstore(dst + c * kChunk, e);
                vstore(dst + c * kChunk + kLanes, o);
            }
            if (full < chunks) scalar_chunk([row](Index col) { return row[col]; }, full, k, e, o);
        } else {
            const std::uint16_t* row = static_cast<const std::uint16_t*>(a.x) + i * a.x_stride;
            for (Index c = 0; c < full; ++c) {
                bf16_pairs(row + c * kChunk, e, o);
                vstore(dst + c * kChunk, e);
                vstore(dst + c * kChunk + kLanes, o);
            }
            if (full < chunks) {
                scalar_chunk([row](Index col) { return bf16_value(row[col]); }, full, k, e, o);
            }
        }
        if (full < chunks) {
            vstore(dst + full * kChunk, e);
            vstore(dst + full * kChunk + kLanes, o);
        }
    }
}

// ---- The two drivers ----------------------------------------------------------------------------

struct Layout {
    Index k, kp, chunks, full;  // kp: the panels' row stride (panel_stride(k))
    float* xp;                  // [m, kp]
    float* acc;                 // [m, kBlockRows, kLanes]
    float* wp;                  // [kBlockRows, kp] (prefill)
};

MOELB_INLINE void zero(float* p, Index n) {
    for (Index t = 0; t < n; t += kLanes) vstore(p + t, vzero());
}

template <class Loader>
void run_decode(Loader& ld, const QuantGemmArgs& a, const Layout& L) {
    const int mg_max = a.m < kMaxDecodeX ? static_cast<int>(a.m) : kMaxDecodeX;
    const int rows = mg_max <= 2 ? 4 : 3;  // rows * mg_max <= 12 accumulators
    const Index block = a.m <= mg_max ? L.chunks : kDecodeBlockChunks;
    const Index acc_stride = rows * kLanes;
    for (Index j0 = a.n_begin; j0 < a.n_end; j0 += rows) {
        const int r = static_cast<int>(a.n_end - j0 < rows ? a.n_end - j0 : rows);
        ld.bind(j0, r);
        zero(L.acc, a.m * acc_stride);
        for (Index c0 = 0; c0 < L.chunks; c0 += block) {
            const Index c1 = c0 + block < L.chunks ? c0 + block : L.chunks;
            for (Index i0 = 0; i0 < a.m; i0 += mg_max) {
                const int mg = static_cast<int>(a.m - i0 < mg_max ? a.m - i0 : mg_max);
                DecodeTiles<Loader>::kFn[r - 1][mg - 1](ld, L.xp + i0 * L.kp, L.kp, c0, c1, L.full,
                                                        L.acc + i0 * acc_stride, acc_stride);
            }
        }
        for (Index i = 0; i < a.m; ++i) {
            for (int j = 0; j < r; ++j) {
                a.y[i * a.y_stride + j0 + j] = vsum(vload(L.acc + i * acc_stride + j * kLanes));
            }
        }
    }
}

template <class Loader>
void run_prefill(Loader& ld, const QuantGemmArgs& a, const Layout& L) {
    const Index acc_stride = kBlockRows * kLanes;
    for (Index jb = a.n_begin; jb < a.n_end; jb += kBlockRows) {
        const int nb = static_cast<int>(a.n_end - jb < kBlockRows ? a.n_end - jb : kBlockRows);
        // The block's rows, dequantised into the W panel.
        for (int jj = 0; jj < nb; ++jj) {
            ld.bind(jb + jj, 1);
            float* dst = L.wp + jj * L.kp;
            Vec e, o;
            for (Index c = 0; c < L.full;) {
                const Index seg_end = ld.segment_end(c, L.full);
                ld.begin_segment(c, seg_end);
                for (; c < seg_end; ++c) {
                    ld.chunk(0, c, e, o);
                    vstore(dst + c * kChunk, e);
                    vstore(dst + c * kChunk + kLanes, o);
                }
            }
            if (L.full < L.chunks) {
                ld.begin_segment(L.full, L.full);
                ld.tail(0, L.full, e, o);
                vstore(dst + L.full * kChunk, e);
                vstore(dst + L.full * kChunk + kLanes, o);
            }
        }
        zero(L.acc, a.m * acc_stride);
        // Rows of x in groups whose k-block slices (and accumulators) stay in L2.
        for (Index g0 = 0; g0 < a.m; g0 += kPrefillRowGroup) {
            const Index g1 = g0 + kPrefillRowGroup < a.m ? g0 + kPrefillRowGroup : a.m;
            for (Index c0 = 0; c0 < L.chunks; c0 += kPrefillBlockChunks) {
                const Index c1 =
                    c0 + kPrefillBlockChunks < L.chunks ? c0 + kPrefillBlockChunks : L.chunks;
                for (Index i0 = g0; i0 < g1; i0 += kTileX) {
                    const int mr = static_cast<int>(g1 - i0 < kTileX ? g1 - i0 : kTileX);
                    for (int jq = 0; jq < nb; jq += kTileW) {
                        const int nr = nb - jq < kTileW ? nb - jq : kTileW;
                        kPanelTiles[mr - 1][nr - 1](L.xp + i0 * L.kp, L.wp + jq * L.kp, L.kp, c0,
                                                    c1, L.acc + i0 * acc_stride + jq * kLanes,
                                                    acc_stride);
                    }
                }
            }
        }
        for (Index i = 0; i < a.m; ++i) {
            for (int j = 0; j < nb; ++j) {
                a.y[i * a.y_stride + jb + j] = vsum(vload(L.acc + i * acc_stride + j * kLanes));
            }
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

// The scratch's parts, in floats.
struct ScratchFloats {
    Index x, acc, w;
};
ScratchFloats scratch_floats(Index m, Index k) {
    const Index kp = panel_stride(k);
    return {m * kp, m * kBlockRows * kLanes, m >= kPrefillRows ? kBlockRows * kp : 0};
}

constexpr std::size_t kAlign = 64;

void check(bool ok, const char* message) {
    if (!ok) throw std::invalid_argument(message);
}

}  // namespace

std::size_t quant_gemm_scratch_bytes(Index m, Index k) {
    if (m <= 0) return 0;
    const ScratchFloats s = scratch_floats(m, k < 0 ? 0 : k);
    return static_cast<std::size_t>(s.x + s.acc + s.w) * sizeof(float) + kAlign;
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
    const ScratchFloats parts = scratch_floats(a.m, k);
    const auto base = reinterpret_cast<std::uintptr_t>(a.scratch);
    float* aligned = reinterpret_cast<float*>((base + kAlign - 1) / kAlign * kAlign);
    Layout L{k,       panel_stride(k),   (k + kChunk - 1) / kChunk,    k / kChunk,
             aligned, aligned + parts.x, aligned + parts.x + parts.acc};
    arrange_x(a, k, L.kp, L.xp);

    switch (w.type) {
        case WeightType::kFloat32: {
            F32Rows ld{static_cast<const float*>(w.data), k, {}};
            run(ld, a, L);
            return;
        }
        case WeightType::kBfloat16: {
            Bf16Rows ld{static_cast<const std::uint16_t*>(w.data), k, {}};
            run(ld, a, L);
            return;
        }
        case WeightType::kFp8E4m3: {
            Fp8Rows ld{};
            ld.data = static_cast<const std::uint8_t*>(w.data);
            ld.cols = k;
            ld.scale_inv = w.scale_inv;
            ld.block_rows = w.block_rows;
            ld.block_cols = w.block_cols;
            ld.grid_cols = (k + w.block_cols - 1) / w.block_cols;
            ld.aligned_blocks = w.block_cols % kChunk == 0;
            ld.block_chunks = w.block_cols / kChunk;
            run(ld, a, L);
            return;
        }
        case WeightType::kInt8: {
            Int8Rows ld{};
            ld.data = static_cast<const std::int8_t*>(w.data);
            ld.cols = k;
            ld.scale_inv = w.scale_inv;
            run(ld, a, L);
            return;
        }
    }
    check(false, "quant_gemm: unknown w.type");
}

}  // namespace moelb::MOELB_ISA_NS
