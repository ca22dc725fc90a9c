// The quantised-weight GEMM (isa/kernels.hpp: quant_gemm) on every ISA path this CPU runs: each
// weight type x activation type against a float64 reference with its own bf16 / fp8 / int8
// decoding (written here, independently of the kernels'), partial fp8 scale blocks and chunks,
// NaN codes, and the contract that y[i, j]'s bits depend only on x row i, W row j and the path
// (not on m, the column range or the scratch).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "isa/kernels.hpp"
#include "moelb/cpu_isa.hpp"

namespace {

using moelb::CpuIsa;
using moelb::isa::ActivationType;
using moelb::isa::Index;
using moelb::isa::QuantGemmArgs;
using moelb::isa::WeightType;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---- Independent decodings (float64) ----

// bf16: 1 sign, 8 exponent (bias 127), 7 mantissa bits.
double bf16_to_double(std::uint16_t b) {
    const int sign = (b >> 15) & 1, e = (b >> 7) & 0xFF, m = b & 0x7F;
    double mag;
    if (e == 0xFF) {
        mag = m == 0 ? std::numeric_limits<double>::infinity() : kNaN;
    } else if (e == 0) {
        mag = std::ldexp(static_cast<double>(m), -126 - 7);
    } else {
        mag = std::ldexp(1.0 + m / 128.0, e - 127);
    }
    return sign != 0 ? -mag : mag;
}

// E4M3FN: 1 sign, 4 exponent (bias 7), 3 mantissa bits; S.1111.111 is NaN, no infinities.
double fp8_to_double(std::uint8_t b) {
    const int sign = b >> 7, e = (b >> 3) & 0xF, m = b & 0x7;
    if (e == 0xF && m == 0x7) return kNaN;
    const double mag = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
    return sign != 0 ? -mag : mag;
}

const char* type_name(WeightType t) {
    switch (t) {
        case WeightType::kFloat32:
            return "float32";
        case WeightType::kBfloat16:
            return "bfloat16";
        case WeightType::kFp8E4m3:
            return "fp8_e4m3";
        case WeightType::kInt8:
            return "int8";
    }
    return "?";
}

// A weight matrix in one stored type, with its float64 and float32 dequantisations.
struct Weights {
    WeightType type;
    Index rows, cols, block_rows = 128, block_cols = 128;
    std::vector<float> f32;
    std::vector<std::uint16_t> bf16;
    std::vector<std::uint8_t> fp8;
    std::vector<std::int8_t> i8;
    std::vector<float> scale_inv;

    const void* data() const {
        switch (type) {
            case WeightType::kFloat32:
                return f32.data();
            case WeightType::kBfloat16:
                return bf16.data();
            case WeightType::kFp8E4m3:
                return fp8.data();
            case WeightType::kInt8:
                return i8.data();
        }
        return nullptr;
    }
    Index grid_cols() const { return (cols + block_cols - 1) / block_cols; }
    float scale(Index r, Index c) const {
        if (type == WeightType::kFp8E4m3) {
            return scale_inv[(r / block_rows) * grid_cols() + c / block_cols];
        }
        return type == WeightType::kInt8 ? scale_inv[r] : 1.0f;
    }
    // The stored value before the scale, in float64.
    double q(Index r, Index c) const {
        const Index t = r * cols + c;
        switch (type) {
            case WeightType::kFloat32:
                return f32[t];
            case WeightType::kBfloat16:
                return bf16_to_double(bf16[t]);
            case WeightType::kFp8E4m3:
                return fp8_to_double(fp8[t]);
            case WeightType::kInt8:
                return i8[t];
        }
        return kNaN;
    }
    double value(Index r, Index c) const { return q(r, c) * static_cast<double>(scale(r, c)); }
    // The contract's float32 dequantisation: float(q) * scale, rounded once.
    float value32(Index r, Index c) const {
        return static_cast<float>(q(r, c)) * (type == WeightType::kFloat32 ? 1.0f : scale(r, c));
    }
    std::vector<float> dequantised() const {
        std::vector<float> out(static_cast<std::size_t>(rows * cols));
        for (Index r = 0; r < rows; ++r) {
            for (Index c = 0; c < cols; ++c) out[r * cols + c] = value32(r, c);
        }
        return out;
    }
};

std::uint16_t bf16_bits_of(float v) {
    std::uint32_t u;
    std::memcpy(&u, &v, 4);
    return static_cast<std::uint16_t>(u >> 16);
}

Weights random_weights(WeightType type, Index rows, Index cols, std::uint32_t seed,
                       Index block_rows = 128, Index block_cols = 128) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::uniform_real_distribution<float> scale(0.002f, 0.02f);
    Weights w{type, rows, cols, block_rows, block_cols, {}, {}, {}, {}, {}};
    const auto n = static_cast<std::size_t>(rows * cols);
    switch (type) {
        case WeightType::kFloat32:
            for (std::size_t t = 0; t < n; ++t) w.f32.push_back(normal(gen));
            break;
        case WeightType::kBfloat16:
            for (std::size_t t = 0; t < n; ++t) w.bf16.push_back(bf16_bits_of(normal(gen)));
            break;
        case WeightType::kFp8E4m3:
            for (std::size_t t = 0; t < n; ++t) {
                std::uint8_t b;
                do {
                    b = static_cast<std::uint8_t>(gen() & 0xFF);
                } while ((b & 0x7F) == 0x7F);
                w.fp8.push_back(b);
            }
            for (Index t = 0; t < (rows + block_rows - 1) / block_rows * w.grid_cols(); ++t) {
                w.scale_inv.push_back(scale(gen));
            }
            break;
        case WeightType::kInt8:
            for (std::size_t t = 0; t < n; ++t) {
                w.i8.push_back(static_cast<std::int8_t>(static_cast<int>(gen() % 256) - 128));
            }
            for (Index r = 0; r < rows; ++r) w.scale_inv.push_back(scale(gen));
            break;
    }
    return w;
}

// Activations: float32 values, and (bf16) their bf16 bits with the float32 values made equal to
// them.
struct Activations {
    ActivationType type;
    Index m, k;
    std::vector<float> f32;
    std::vector<std::uint16_t> bf16;
    const void* data() const {
        return type == ActivationType::kFloat32 ? static_cast<const void*>(f32.data())
                                                : static_cast<const void*>(bf16.data());
    }
};

Activations random_x(ActivationType type, Index m, Index k, std::uint32_t seed) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    Activations x{type, m, k, {}, {}};
    for (Index t = 0; t < m * k; ++t) {
        const float v = normal(gen);
        if (type == ActivationType::kFloat32) {
            x.f32.push_back(v);
        } else {
            x.bf16.push_back(bf16_bits_of(v));
            x.f32.push_back(static_cast<float>(bf16_to_double(x.bf16.back())));
        }
    }
    return x;
}

// quant_gemm on the current path for rows [0, m) and columns [n_begin, n_end) into y [m, n]
// (other columns keep their values). scratch_pad: extra scratch bytes, scratch_offset: its
// misalignment.
void gemm(const Activations& x, const Weights& w, Index n_begin, Index n_end, std::vector<float>& y,
          std::size_t scratch_pad = 0, std::size_t scratch_offset = 0) {
    const auto& K = moelb::isa::kernels();
    QuantGemmArgs a;
    a.x = x.data();
    a.x_type = x.type;
    a.m = x.m;
    a.x_stride = x.k;
    a.w.type = w.type;
    a.w.data = w.data();
    a.w.rows = w.rows;
    a.w.cols = w.cols;
    a.w.scale_inv = w.scale_inv.empty() ? nullptr : w.scale_inv.data();
    a.w.block_rows = w.block_rows;
    a.w.block_cols = w.block_cols;
    a.n_begin = n_begin;
    a.n_end = n_end;
    y.resize(static_cast<std::size_t>(x.m * w.rows), -1.0f);
    a.y = y.data();
    a.y_stride = w.rows;
    const std::size_t bytes = K.quant_gemm_scratch_bytes(x.m, w.cols) + scratch_pad;
    std::vector<unsigned char> scratch(bytes + scratch_offset + 64, 0xAB);
    a.scratch = scratch.data() + scratch_offset;
    a.scratch_bytes = bytes;
    K.quant_gemm(a);
}

std::vector<float> gemm(const Activations& x, const Weights& w) {
    std::vector<float> y;
    gemm(x, w, 0, w.rows, y);
    return y;
}

// Runs f on every path this CPU runs, then restores the path in use.
void for_each_path(const std::function<void(CpuIsa)>& f) {
    const CpuIsa saved = moelb::cpu_isa();
    for (const CpuIsa isa : moelb::available_cpu_isas()) {
        moelb::set_cpu_isa(isa);
        SCOPED_TRACE(std::string("path ") + std::string(to_string(isa)));
        f(isa);
    }
    moelb::set_cpu_isa(saved);
}

// y against sum_c x[i, c] * w[j, c] in float64. Tolerance: each y is a float32 dot product --
// float(q) * scale rounded once (u = 2^-24), then per lane a sequential sum of ceil(k / 4)
// products (4 lanes or more; <= 2 roundings per step on paths without FMA) and a tree of <= 4
// levels -- so |error| <= (2 * ceil(k / 4) + 6) * u * sum_c |x w| (the recursive-summation
// bound), which a wrong term or scale exceeds.
void expect_matches_reference(const Activations& x, const Weights& w, const std::vector<float>& y,
                              const std::string& what) {
    const double u = std::ldexp(1.0, -24);
    const double factor = (2.0 * std::ceil(w.cols / 4.0) + 6.0) * u;
    int failures = 0;
    for (Index i = 0; i < x.m; ++i) {
        for (Index j = 0; j < w.rows; ++j) {
            double ref = 0.0, mag = 0.0;
            for (Index c = 0; c < w.cols; ++c) {
                const double p = static_cast<double>(x.f32[i * x.k + c]) * w.value(j, c);
                ref += p;
                mag += std::abs(p);
            }
            const float got = y[i * w.rows + j];
            if (!(std::abs(got - ref) <= factor * mag) && ++failures <= 5) {
                ADD_FAILURE() << what << ": y[" << i << ", " << j << "] = " << got << ", reference "
                              << ref << ", tolerance " << factor * mag;
            }
        }
    }
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

constexpr WeightType kWeightTypes[] = {WeightType::kFloat32, WeightType::kBfloat16,
                                       WeightType::kFp8E4m3, WeightType::kInt8};
constexpr ActivationType kActivationTypes[] = {ActivationType::kFloat32, ActivationType::kBfloat16};

std::string case_name(WeightType wt, ActivationType xt, Index m, Index n, Index k) {
    return std::string("W ") + type_name(wt) + " x " +
           (xt == ActivationType::kFloat32 ? "float32" : "bfloat16") + " m=" + std::to_string(m) +
           " n=" + std::to_string(n) + " k=" + std::to_string(k);
}

TEST(QuantGemm, EveryTypeMatchesTheFloat64ReferenceOnEveryPath) {
    // m < 8: decode (1 to 4 rows per pass over W, several passes from 5); m >= 8: prefill (m = 100:
    // two groups of rows; n = 200: W blocks of 32 rows and a partial one). k not a multiple of
    // any chunk; 200 x 300 with 128 x 128 blocks: partial last blocks both ways.
    struct Shape {
        Index m, n, k;
    };
    const Shape shapes[] = {{1, 200, 300}, {3, 37, 129},   {4, 21, 64}, {6, 19, 300},
                            {8, 33, 17},   {37, 200, 300}, {2, 5, 1},   {100, 40, 70}};
    for_each_path([&](CpuIsa) {
        std::uint32_t seed = 1;
        for (const Shape& s : shapes) {
            for (const WeightType wt : kWeightTypes) {
                const Weights w = random_weights(wt, s.n, s.k, ++seed);
                for (const ActivationType xt : kActivationTypes) {
                    const Activations x = random_x(xt, s.m, s.k, ++seed);
                    expect_matches_reference(x, w, gemm(x, w), case_name(wt, xt, s.m, s.n, s.k));
                }
            }
        }
    });
}

TEST(QuantGemm, BitsDependOnlyOnTheRowAndColumn) {
    // The full product at m = 37 (prefill) against: each row alone (m = 1, decode), rows in
    // groups of 5 (decode, two passes over W), the columns in uneven ranges, and another
    // scratch (larger, misaligned, stale).
    const Index m = 37, n = 200, k = 300;
    for_each_path([&](CpuIsa) {
        std::uint32_t seed = 100;
        for (const WeightType wt : kWeightTypes) {
            const Weights w = random_weights(wt, n, k, ++seed);
            for (const ActivationType xt : kActivationTypes) {
                const std::string what = case_name(wt, xt, m, n, k);
                const Activations x = random_x(xt, m, k, ++seed);
                const std::vector<float> full = gemm(x, w);
                for (const Index rows_per_call : {1, 5, 8, 12}) {
                    std::vector<float> y(full.size(), 0.0f);
                    for (Index i0 = 0; i0 < m; i0 += rows_per_call) {
                        const Index rows = std::min(rows_per_call, m - i0);
                        Activations part{xt, rows, k, {}, {}};
                        part.f32.assign(x.f32.begin() + i0 * k, x.f32.begin() + (i0 + rows) * k);
                        if (xt == ActivationType::kBfloat16) {
                            part.bf16.assign(x.bf16.begin() + i0 * k,
                                             x.bf16.begin() + (i0 + rows) * k);
                        }
                        const std::vector<float> yp = gemm(part, w);
                        std::copy(yp.begin(), yp.end(), y.begin() + i0 * n);
                    }
                    EXPECT_TRUE(same_bits(y, full)) << what << ", rows per call " << rows_per_call;
                }
                std::vector<float> y;
                const Index cuts[] = {0, 1, 7, 8, 61, 128, 131, 199, 200};
                for (std::size_t t = 0; t + 1 < std::size(cuts); ++t) {
                    gemm(x, w, cuts[t], cuts[t + 1], y, 4096 * (t % 2), 4 * (t % 3));
                }
                EXPECT_TRUE(same_bits(y, full)) << what << ", column ranges";
            }
        }
    });
}

// ---- The documented order of int8 and fp8 (kernels.hpp, quant_gemm), one value at a time ----

// This path's lanes and multiply-add: 4 lanes with a multiply then an add on the SSE2 baseline,
// 8 fused lanes on avx2 and avx512, 16 on avx512_bf16 with vdpbf16ps (bf16_dot) for bf16 x; a
// native build's only path follows the compiler's target.
struct Arith {
    int lanes;
    bool fused;
    bool bf16_dot = false;
};
Arith path_arith(CpuIsa isa) {
    if (isa == CpuIsa::kNative) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__AVX512BF16__) && defined(__FMA__) && defined(__F16C__)
        return {16, true, true};
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
        return {8, true};
#elif defined(__SSE2__)
        return {4, false};
#else
        return {4, true};
#endif
    }
    if (isa == CpuIsa::kBaseline) {
#if defined(__SSE2__)
        return {4, false};
#else
        return {4, true};
#endif
    }
    if (isa == CpuIsa::kAvx512Bf16) return {16, true, true};
    return {8, true};
}
// Whether quant_gemm runs vdpbf16ps for this x and W on this path (kernels.hpp: bf16 x with bf16,
// int8, or fp8 W whose scale blocks are whole chunks of 32).
bool uses_bf16_dot(const Arith& ar, ActivationType xt, const Weights& w) {
    return ar.bf16_dot && xt == ActivationType::kBfloat16 &&
           (w.type == WeightType::kBfloat16 || w.type == WeightType::kInt8 ||
            (w.type == WeightType::kFp8E4m3 && w.block_cols % 32 == 0));
}
float madd(const Arith& ar, float a, float b, float c) {
    if (ar.fused) return std::fma(a, b, c);
    volatile float p = a * b;  // rounded on its own, never contracted into the add
    return p + c;
}
// The lanes' tree: (l, l + lanes / 2), ..., (0, 1).
float lane_tree(std::vector<float> v) {
    for (std::size_t h = v.size() / 2; h >= 1; h /= 2) {
        for (std::size_t l = 0; l < h; ++l) v[l] = v[l] + v[l + h];
    }
    return v[0];
}

// y[i, j] for int8 and fp8 W as kernels.hpp documents it. L lanes, chunks of 2L columns, the
// natural layout: lane l takes columns l, l + L, l + 2L, ...; columns up to the end of the last
// chunk are zeros, except fp8 with blocks that are not whole chunks, where columns past k are
// skipped. int8: sum of x * q, then the tree, then * scale. fp8: x row i times 2^Q (Q = 14 - E
// clamped to [-126, 127], max |x_i| < 2^E), values below 2^-126 then zeros, each code as
// fp8 * 2^-8; a lane's sum restarts at every scale block and is added into the lane's total as
// total = madd(sum * 2^(8 - Q), scale, total); then the tree; any NaN code in row j gives NaN.
float documented_y(const Arith& ar, const Activations& x, const Weights& w, Index i, Index j) {
    const Index k = w.cols, chunk = 2 * ar.lanes, padded = (k + chunk - 1) / chunk * chunk;
    const float* xr = x.f32.data() + i * x.k;
    std::vector<float> total(static_cast<std::size_t>(ar.lanes), 0.0f);
    if (w.type == WeightType::kInt8) {
        for (int l = 0; l < ar.lanes; ++l) {
            float s = 0.0f;
            for (Index c = l; c < padded; c += ar.lanes) {
                s = madd(ar, c < k ? xr[c] : 0.0f,
                         c < k ? static_cast<float>(w.i8[j * k + c]) : 0.0f, s);
            }
            total[static_cast<std::size_t>(l)] = s;
        }
        return lane_tree(total) * w.scale_inv[j];
    }
    float max_abs = 0.0f;
    for (Index c = 0; c < k; ++c) max_abs = std::max(max_abs, std::abs(xr[c]));
    int e = 0;
    std::frexp(max_abs, &e);
    const int q_exp = std::clamp(14 - e, -126, 127);
    const float up = std::ldexp(1.0f, q_exp), back = std::ldexp(1.0f, 8 - q_exp);
    bool nan = false;
    const bool whole_chunks = w.block_cols % chunk == 0;
    for (int l = 0; l < ar.lanes; ++l) {
        float s = 0.0f, t = 0.0f;
        Index block = -1;
        for (Index c = l; c < (whole_chunks ? padded : k); c += ar.lanes) {
            const Index b = c / w.block_cols;
            if (b != block) {
                if (block >= 0) t = madd(ar, s * back, w.scale(j, block * w.block_cols), t);
                s = 0.0f;
                block = b;
            }
            float q = 0.0f, xv = 0.0f;
            if (c < k) {
                const double v = fp8_to_double(w.fp8[j * k + c]);
                nan = nan || std::isnan(v);
                q = std::isnan(v) ? 0.0f : static_cast<float>(std::ldexp(v, -8));
                xv = xr[c] * up;
                if (std::abs(xv) < 0x1p-126f) xv = 0.0f;
            }
            s = madd(ar, xv, q, s);
        }
        if (block >= 0) t = madd(ar, s * back, w.scale(j, block * w.block_cols), t);
        total[static_cast<std::size_t>(l)] = t;
    }
    return nan ? std::numeric_limits<float>::quiet_NaN() : lane_tree(total);
}

// vdpbf16ps's arithmetic, one of its two steps per lane: acc + a * b rounded once (the product of
// two bf16 is exact in float32), subnormal inputs read as zero and a subnormal result flushed to
// a zero of its sign.
float flush(float v) { return std::fpclassify(v) == FP_SUBNORMAL ? std::copysign(0.0f, v) : v; }
float dp_step(float acc, float a, float b) {
    return flush(std::fma(flush(a), flush(b), flush(acc)));
}

// y[i, j] where quant_gemm runs vdpbf16ps (uses_bf16_dot), as kernels.hpp and quant_kernels.cpp
// (Bf16Dot, arrange_x_bf16) document it: x row i times 2^P (P = -E clamped to [-126, 126], max
// |x_i| < 2^E; 0 for a zero row), each value rounded to float32 and cut to its top 16 bits; W's
// exact values (bf16, int8 codes, fp8 values); 16 lanes, chunks of 32 columns zero-padded; per
// chunk lane l takes the product of column 2l + 1, then of column 2l (dp_step). bf16: the lanes'
// tree times 2^-P; int8: (tree * 2^-P) * scale; fp8: a lane's sum restarts at every scale block
// and is added into the lane's total as fma(sum * 2^-P, scale, total), then the tree; a NaN code
// in row j gives NaN.
float documented_bf16_dot_y(const Activations& x, const Weights& w, Index i, Index j) {
    constexpr int kLanes = 16;
    const Index k = w.cols, padded = (k + 31) / 32 * 32;
    const float* xr = x.f32.data() + i * x.k;
    float max_abs = 0.0f;
    for (Index c = 0; c < k; ++c) max_abs = std::max(max_abs, std::abs(xr[c]));
    int p = 0;
    if (max_abs > 0.0f && std::isfinite(max_abs)) {
        int e = 0;
        std::frexp(max_abs, &e);
        p = std::clamp(-e, -126, 126);
    }
    const float up = std::ldexp(1.0f, p), back = std::ldexp(1.0f, -p);
    const auto x_at = [&](Index c) {
        if (c >= k) return 0.0f;
        const float t = xr[c] * up;
        return static_cast<float>(bf16_to_double(bf16_bits_of(t)));  // the top 16 bits
    };
    bool nan = false;
    const auto w_at = [&](Index c) {
        if (c >= k) return 0.0f;
        const double v = w.q(j, c);
        nan = nan || std::isnan(v);
        return std::isnan(v) ? 0.0f : static_cast<float>(v);
    };
    const bool fp8 = w.type == WeightType::kFp8E4m3;
    std::vector<float> total(kLanes, 0.0f);
    for (int l = 0; l < kLanes; ++l) {
        float s = 0.0f, t = 0.0f;
        Index block = -1;
        for (Index c0 = 0; c0 < padded; c0 += 32) {
            for (const Index c : {c0 + 2 * l + 1, c0 + 2 * l}) {
                if (fp8 && c / w.block_cols != block) {
                    if (block >= 0) t = std::fma(s * back, w.scale(j, block * w.block_cols), t);
                    s = 0.0f;
                    block = c / w.block_cols;
                }
                s = dp_step(s, x_at(c), w_at(c));
            }
        }
        if (fp8 && block >= 0) t = std::fma(s * back, w.scale(j, block * w.block_cols), t);
        total[static_cast<std::size_t>(l)] = fp8 ? t : s;
    }
    const float tree = lane_tree(total);
    if (nan) return std::numeric_limits<float>::quiet_NaN();
    if (fp8) return tree;
    return w.type == WeightType::kInt8 ? (tree * back) * w.scale_inv[j] : tree * back;
}

TEST(QuantGemm, Int8AndFp8FollowTheDocumentedOrderBitForBit) {
    // Decode (m = 1, 3, 6) and prefill (m = 9, 37), k with a partial chunk, fp8 blocks of whole
    // chunks (128 x 128, 16 x 32) and not (7 x 5, 64 x 40 on AVX2), rows of x scaled far from 1
    // (the clamped powers of two), a zero row, scales of 2^110.
    struct Case {
        Index m, n, k, block_rows, block_cols;
        float scale_factor;
    };
    const Case cases[] = {{1, 40, 300, 128, 128, 1.0f}, {3, 37, 129, 16, 32, 1.0f},
                          {6, 21, 300, 7, 5, 1.0f},     {9, 40, 300, 128, 128, 0x1p110f},
                          {37, 45, 260, 64, 40, 1.0f},  {9, 30, 70, 7, 5, 1.0f}};
    for_each_path([&](CpuIsa isa) {
        const Arith ar = path_arith(isa);
        std::uint32_t seed = 200;
        for (const Case& cs : cases) {
            for (const WeightType wt : {WeightType::kFp8E4m3, WeightType::kInt8}) {
                Weights w = random_weights(wt, cs.n, cs.k, ++seed, cs.block_rows, cs.block_cols);
                for (float& s : w.scale_inv) s *= wt == WeightType::kFp8E4m3 ? cs.scale_factor : 1;
                if (wt == WeightType::kFp8E4m3) w.fp8[3 * cs.k + cs.k / 2] = 0xFF;  // row 3: NaN
                for (const ActivationType xt : kActivationTypes) {
                    Activations x = random_x(xt, cs.m, cs.k, ++seed);
                    const float row_scale[] = {1.0f, 0x1p-90f, 0x1p90f, 0.0f, 0x1p-3f};
                    for (Index i = 0; i < cs.m; ++i) {
                        const float f = row_scale[i % 5];
                        for (Index c = 0; c < cs.k; ++c) {
                            float& v = x.f32[i * cs.k + c];
                            v *= f;
                            if (xt == ActivationType::kBfloat16) {
                                x.bf16[i * cs.k + c] = bf16_bits_of(v);
                                v = static_cast<float>(bf16_to_double(x.bf16[i * cs.k + c]));
                            }
                        }
                    }
                    const std::vector<float> y = gemm(x, w);
                    int failures = 0;
                    for (Index i = 0; i < cs.m; ++i) {
                        for (Index j = 0; j < cs.n; ++j) {
                            const float want = uses_bf16_dot(ar, xt, w)
                                                   ? documented_bf16_dot_y(x, w, i, j)
                                                   : documented_y(ar, x, w, i, j);
                            const float got = y[i * cs.n + j];
                            const bool same = std::isnan(want)
                                                  ? std::isnan(got)
                                                  : std::memcmp(&want, &got, sizeof(float)) == 0;
                            if (!same && ++failures <= 5) {
                                ADD_FAILURE()
                                    << case_name(wt, xt, cs.m, cs.n, cs.k) << " blocks "
                                    << cs.block_rows << " x " << cs.block_cols << ": y[" << i
                                    << ", " << j << "] = " << got << ", documented " << want;
                            }
                        }
                    }
                }
            }
        }
    });
}

TEST(QuantGemm, Bf16DotFollowsTheDocumentedOrderBitForBit) {
    // Where the path runs vdpbf16ps (avx512_bf16, bf16 x): bf16, int8 and fp8 W (blocks of whole
    // chunks) against documented_bf16_dot_y, decode and prefill, a partial chunk, rows of x scaled
    // far from 1, a zero row and a row of bf16 subnormals (read as zero unless scaled up).
    bool ran = false;
    for_each_path([&](CpuIsa isa) {
        const Arith ar = path_arith(isa);
        if (!ar.bf16_dot) return;
        ran = true;
        std::uint32_t seed = 700;
        for (const Index m : {1, 3, 6, 9, 37}) {
            for (const WeightType wt :
                 {WeightType::kBfloat16, WeightType::kInt8, WeightType::kFp8E4m3}) {
                const Index n = 29, k = 300;
                Weights w = random_weights(wt, n, k, ++seed, 16, 64);
                if (wt == WeightType::kFp8E4m3) w.fp8[2 * k + 7] = 0x7F;  // row 2: NaN
                Activations x = random_x(ActivationType::kBfloat16, m, k, ++seed);
                const float row_scale[] = {1.0f, 0x1p-90f, 0x1p90f, 0.0f, 0x1p-3f, 0x1p-135f};
                for (Index i = 0; i < m; ++i) {
                    for (Index c = 0; c < k; ++c) {
                        float& v = x.f32[i * k + c];
                        v *= row_scale[i % 6];
                        x.bf16[i * k + c] = bf16_bits_of(v);
                        v = static_cast<float>(bf16_to_double(x.bf16[i * k + c]));
                    }
                }
                ASSERT_TRUE(uses_bf16_dot(ar, x.type, w));
                const std::vector<float> y = gemm(x, w);
                int failures = 0;
                for (Index i = 0; i < m; ++i) {
                    for (Index j = 0; j < n; ++j) {
                        const float want = documented_bf16_dot_y(x, w, i, j), got = y[i * n + j];
                        const bool same = std::isnan(want)
                                              ? std::isnan(got)
                                              : std::memcmp(&want, &got, sizeof(float)) == 0;
                        if (!same && ++failures <= 5) {
                            ADD_FAILURE() << case_name(wt, x.type, m, n, k) << ": y[" << i << ", "
                                          << j << "] = " << got << ", documented " << want;
                        }
                    }
                }
            }
        }
    });
    if (!ran) GTEST_SKIP() << "no path here runs vdpbf16ps (avx512_bf16)";
}

TEST(QuantGemm, Float32AndBf16GiveTheBitsOfTheirFloat32Values) {
    // bf16 W and its float32 values, a bf16 x and its float32 values (every weight type): the
    // same bits (the even/odd layout of float32 and bf16 W; int8 and fp8 take x's values too) --
    // except a bf16 x where the path runs vdpbf16ps (Bf16DotFollowsTheDocumentedOrderBitForBit).
    for_each_path([&](CpuIsa isa) {
        std::uint32_t seed = 250;
        for (const Index m : {2, 9}) {
            for (const WeightType wt : kWeightTypes) {
                const Weights w = random_weights(wt, 45, 260, ++seed);
                const Activations xb = random_x(ActivationType::kBfloat16, m, 260, ++seed);
                Activations xf = xb;
                xf.type = ActivationType::kFloat32;
                const std::vector<float> y = gemm(xf, w);
                if (!uses_bf16_dot(path_arith(isa), xb.type, w)) {
                    EXPECT_TRUE(same_bits(gemm(xb, w), y)) << type_name(wt) << " m=" << m;
                }
                if (wt == WeightType::kBfloat16) {
                    Weights f = w;
                    f.type = WeightType::kFloat32;
                    f.f32 = w.dequantised();
                    EXPECT_TRUE(same_bits(y, gemm(xf, f))) << type_name(wt) << " m=" << m;
                }
            }
        }
    });
}

TEST(QuantGemm, RowsOfAnyMagnitudeStayAccurate) {
    // Rows of x scaled by 2^-100 to 2^100 (the power of two each row gets in the x panel: fp8 W,
    // and every quantised W on vdpbf16ps paths): every y within the float64 reference's bound, as
    // at scale 1.
    for_each_path([&](CpuIsa) {
        std::uint32_t seed = 280;
        for (const float f : {0x1p-100f, 0x1p-40f, 0x1p40f, 0x1p100f}) {
            for (const Index m : {2, 9}) {
                for (const WeightType wt :
                     {WeightType::kFp8E4m3, WeightType::kBfloat16, WeightType::kInt8}) {
                    for (const ActivationType xt : kActivationTypes) {
                        const Weights w = random_weights(wt, 30, 300, ++seed);
                        Activations x = random_x(xt, m, 300, ++seed);
                        for (float& v : x.f32) v *= f;
                        for (std::uint16_t& b : x.bf16) b = bf16_bits_of(bf16_to_double(b) * f);
                        expect_matches_reference(x, w, gemm(x, w),
                                                 "x * 2^" + std::to_string(std::ilogb(f)) + " " +
                                                     case_name(wt, xt, m, 30, 300));
                    }
                }
            }
        }
    });
}

TEST(QuantGemm, Fp8BlockScalesOfAnyShape) {
    // Blocks that are not whole chunks (each value's own scale), one column wide, larger than
    // the matrix, and a scale too large for the vector conversion's exact * 2^8.
    struct Case {
        Index m, n, k, block_rows, block_cols;
        float scale_factor;
    };
    const Case cases[] = {{3, 200, 300, 128, 128, 1.0f},  {9, 200, 300, 128, 128, 1.0f},
                          {2, 30, 70, 7, 5, 1.0f},        {10, 30, 70, 7, 5, 1.0f},
                          {1, 13, 40, 1, 1, 1.0f},        {4, 50, 96, 64, 48, 1.0f},
                          {3, 17, 50, 1000, 1000, 1.0f},  {3, 33, 256, 16, 32, 0x1p110f},
                          {12, 33, 256, 16, 32, 0x1p110f}};
    for_each_path([&](CpuIsa) {
        std::uint32_t seed = 300;
        for (const Case& c : cases) {
            Weights w =
                random_weights(WeightType::kFp8E4m3, c.n, c.k, ++seed, c.block_rows, c.block_cols);
            for (float& s : w.scale_inv) s *= c.scale_factor;
            // Scales of 2^110: values up to 448 * 0.02 * 2^110, products with x ~ 1 stay finite.
            const Activations x = random_x(ActivationType::kFloat32, c.m, c.k, ++seed);
            expect_matches_reference(x, w, gemm(x, w),
                                     "blocks " + std::to_string(c.block_rows) + " x " +
                                         std::to_string(c.block_cols) + " " +
                                         case_name(w.type, x.type, c.m, c.n, c.k));
        }
    });
}

TEST(QuantGemm, EveryFp8AndInt8CodeDecodesExactly) {
    // W row j holds code j at column j % 40 and code 0 elsewhere, x is all ones: y[0, j] is that
    // one weight, float(q) * scale, exactly (the other products are zeros). k = 40: two whole
    // chunks of 16 (the vector conversions on AVX2) and a partial one (the scalar tail).
    const Index k = 40;
    for_each_path([&](CpuIsa) {
        for (const WeightType wt : {WeightType::kFp8E4m3, WeightType::kInt8}) {
            for (const float scale : {1.0f, 0.37f, 3.0e-3f}) {
                Weights w{wt, 256, k, 1, 128, {}, {}, {}, {}, {}};
                w.fp8.assign(256 * k, 0);
                w.i8.assign(256 * k, 0);
                for (Index j = 0; j < 256; ++j) {
                    w.fp8[j * k + j % k] = static_cast<std::uint8_t>(j);
                    w.i8[j * k + j % k] = static_cast<std::int8_t>(j - 128);
                }
                w.scale_inv.assign(wt == WeightType::kInt8 ? 256 : 256, scale);
                Activations x{ActivationType::kFloat32, 1, k, std::vector<float>(k, 1.0f), {}};
                const std::vector<float> y = gemm(x, w);
                for (Index j = 0; j < 256; ++j) {
                    const float want =
                        wt == WeightType::kInt8
                            ? static_cast<float>(j - 128) * scale
                            : static_cast<float>(fp8_to_double(static_cast<std::uint8_t>(j))) *
                                  scale;
                    if (std::isnan(want)) {
                        EXPECT_TRUE(std::isnan(y[j])) << type_name(wt) << " code " << j;
                    } else {
                        EXPECT_EQ(y[j], want)
                            << type_name(wt) << " code " << j << " scale " << scale;
                    }
                }
            }
        }
    });
}

TEST(QuantGemm, Fp8NanCodesPropagate) {
    // 0x7F and 0xFF in W row j make column j NaN for every row of x (decode and prefill), in a
    // whole chunk and in the partial last one; the other columns stay finite.
    const Index n = 24, k = 150;
    for_each_path([&](CpuIsa) {
        Weights w = random_weights(WeightType::kFp8E4m3, n, k, 400);
        w.fp8[3 * k + 17] = 0x7F;    // in a whole chunk
        w.fp8[10 * k + 149] = 0xFF;  // in the partial chunk
        w.fp8[20 * k + 0] = 0xFF;
        for (const Index m : {1, 3, 9}) {
            const Activations x = random_x(ActivationType::kBfloat16, m, k, 401);
            const std::vector<float> y = gemm(x, w);
            for (Index i = 0; i < m; ++i) {
                for (Index j = 0; j < n; ++j) {
                    const bool nan_column = j == 3 || j == 10 || j == 20;
                    EXPECT_EQ(std::isnan(y[i * n + j]), nan_column)
                        << "m=" << m << " y[" << i << ", " << j << "]";
                }
            }
        }
    });
}

TEST(QuantGemm, EmptyShapesAndBadArguments) {
    const auto& K = moelb::isa::kernels();
    const Weights w = random_weights(WeightType::kInt8, 8, 20, 500);
    const Activations x = random_x(ActivationType::kFloat32, 2, 20, 501);
    // k = 0: every y is 0.
    {
        Weights empty{WeightType::kBfloat16, 3, 0, 128, 128, {}, {}, {}, {}, {}};
        std::vector<std::uint16_t> no_values(1);
        empty.bf16 = no_values;
        Activations x0{ActivationType::kFloat32, 2, 0, std::vector<float>(1), {}};
        std::vector<float> y;
        gemm(x0, empty, 0, 3, y);
        for (const float v : y) EXPECT_EQ(v, 0.0f);
    }
    QuantGemmArgs a;
    a.x = x.data();
    a.m = 2;
    a.x_stride = 20;
    a.w.type = WeightType::kInt8;
    a.w.data = w.data();
    a.w.rows = 8;
    a.w.cols = 20;
    a.w.scale_inv = w.scale_inv.data();
    a.n_begin = 0;
    a.n_end = 8;
    std::vector<float> y(16);
    a.y = y.data();
    a.y_stride = 8;
    std::vector<unsigned char> scratch(K.quant_gemm_scratch_bytes(2, 20));
    a.scratch = scratch.data();
    a.scratch_bytes = scratch.size();
    EXPECT_NO_THROW(K.quant_gemm(a));
    const auto expect_refused = [&](QuantGemmArgs bad, const std::string& needle) {
        try {
            K.quant_gemm(bad);
            ADD_FAILURE() << "expected std::invalid_argument mentioning " << needle;
        } catch (const std::invalid_argument& e) {
            EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
        }
    };
    QuantGemmArgs bad = a;
    bad.scratch_bytes -= 1;
    expect_refused(bad, "scratch");
    bad = a;
    bad.n_end = 9;
    expect_refused(bad, "n_end");
    bad = a;
    bad.w.scale_inv = nullptr;
    expect_refused(bad, "scale_inv");
    bad = a;
    bad.y_stride = 7;
    expect_refused(bad, "y_stride");
    bad = a;
    bad.x_stride = 19;
    expect_refused(bad, "x_stride");
    bad = a;
    bad.w.type = WeightType::kFp8E4m3;
    bad.w.block_cols = 0;
    expect_refused(bad, "block_cols");
}

}  // namespace
