// Weight formats (moelb/weight_format.hpp): names, the scalar conversions against definitions
// written here (every bf16 and fp8 bit pattern), torch's / ml_dtypes' out-of-range behaviour, and
// the quantisers against the format's dequantisation formula, recomputed here.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "moelb/errors.hpp"
#include "moelb/weight_format.hpp"
#include "test_util.hpp"

namespace {

using namespace moelb::test_util;
using moelb::BlockSize;
using moelb::Index;
using moelb::WeightFormat;
using moelb::WeightTensor;

// E4M3FN from its definition: (-1)^s 2^(e - 7) (1 + m / 8), subnormal 2^-6 (m / 8), S.1111.111
// NaN.
double fp8_definition(int bits) {
    const int s = bits >> 7, e = (bits >> 3) & 15, m = bits & 7;
    if (e == 15 && m == 7) return std::numeric_limits<double>::quiet_NaN();
    const double v = e == 0 ? std::pow(2.0, -6) * (m / 8.0) : std::pow(2.0, e - 7) * (1 + m / 8.0);
    return s ? -v : v;
}

TEST(WeightFormat, Names) {
    EXPECT_EQ(moelb::parse_weight_format("fp8_e4m3"), WeightFormat::kFp8E4M3);
    EXPECT_EQ(moelb::to_string(WeightFormat::kBFloat16), "bfloat16");
    EXPECT_EQ(moelb::parse_activation_dtype("bfloat16"), moelb::ActivationDType::kBFloat16);
    expect_invalid_argument([] { moelb::parse_weight_format("fp4"); },
                            "weight_format='fp4' is not a weight format; expected 'float32', "
                            "'bfloat16', 'fp8_e4m3' or 'int8'");
    expect_invalid_argument([] { moelb::parse_activation_dtype("float16"); },
                            "activation_dtype='float16' is not an activation dtype");
    EXPECT_EQ(moelb::element_size(WeightFormat::kFloat32), 4u);
    EXPECT_EQ(moelb::element_size(WeightFormat::kBFloat16), 2u);
    EXPECT_EQ(moelb::element_size(WeightFormat::kFp8E4M3), 1u);
    EXPECT_EQ(moelb::element_size(WeightFormat::kInt8), 1u);
    EXPECT_EQ(moelb::element_size(moelb::ActivationDType::kBFloat16), 2u);
}

TEST(WeightFormat, Fp8DecodesEveryPatternAndRoundTrips) {
    for (int b = 0; b < 256; ++b) {
        const float got = moelb::fp8_e4m3_bits_to_float(static_cast<std::uint8_t>(b));
        const double want = fp8_definition(b);
        if (std::isnan(want)) {
            EXPECT_TRUE(std::isnan(got)) << b;
            continue;
        }
        EXPECT_EQ(static_cast<double>(got), want) << b;
        // Every value encodes back to its pattern (+0 and -0 keep their sign).
        EXPECT_EQ(moelb::float_to_fp8_e4m3_bits(got), b) << b;
    }
    EXPECT_EQ(moelb::fp8_e4m3_bits_to_float(0x7E), 448.0f);
}

TEST(WeightFormat, Fp8RoundsToNearestEven) {
    // Between each pair of neighbouring non-negative values: below the midpoint rounds down,
    // above rounds up, the midpoint to the even pattern.
    for (int b = 0; b < 0x7E; ++b) {
        const double lo = fp8_definition(b), hi = fp8_definition(b + 1), mid = (lo + hi) / 2;
        const int even = (b % 2 == 0) ? b : b + 1;
        EXPECT_EQ(moelb::float_to_fp8_e4m3_bits(static_cast<float>(mid)), even) << b;
        EXPECT_EQ(moelb::float_to_fp8_e4m3_bits(std::nextafter(static_cast<float>(mid), 0.0f)), b);
        EXPECT_EQ(moelb::float_to_fp8_e4m3_bits(std::nextafter(static_cast<float>(mid), 1e9f)),
                  b + 1);
        EXPECT_EQ(moelb::float_to_fp8_e4m3_bits(-static_cast<float>(mid)), even | 0x80) << b;
    }
}

TEST(WeightFormat, Fp8OutOfRangeIsNaNAsTorch) {
    // torch.float8_e4m3fn / ml_dtypes: not saturating; 464 (the midpoint of 448 and 480) ties
    // to 448, anything above becomes NaN, as do infinities and NaN (sign kept).
    EXPECT_EQ(moelb::float_to_fp8_e4m3_bits(464.0f), 0x7E);
    EXPECT_EQ(moelb::float_to_fp8_e4m3_bits(std::nextafter(464.0f, 1e9f)), 0x7F);
    EXPECT_EQ(moelb::float_to_fp8_e4m3_bits(1e30f), 0x7F);
    EXPECT_EQ(moelb::float_to_fp8_e4m3_bits(-500.0f), 0xFF);
    EXPECT_EQ(moelb::float_to_fp8_e4m3_bits(std::numeric_limits<float>::infinity()), 0x7F);
    EXPECT_EQ(moelb::float_to_fp8_e4m3_bits(-std::numeric_limits<float>::infinity()), 0xFF);
    EXPECT_EQ(moelb::float_to_fp8_e4m3_bits(std::numeric_limits<float>::quiet_NaN()), 0x7F);
    // Below half the smallest subnormal (2^-10): zero.
    EXPECT_EQ(moelb::float_to_fp8_e4m3_bits(0x1p-10f), 0x00);
    EXPECT_EQ(moelb::float_to_fp8_e4m3_bits(0x1.2p-10f), 0x01);
}

TEST(WeightFormat, Bf16EveryPatternRoundTripsAndRoundsToNearestEven) {
    for (std::uint32_t b = 0; b < 65536; ++b) {
        const auto bits = static_cast<std::uint16_t>(b);
        const float f = moelb::bf16_bits_to_float(bits);
        EXPECT_EQ(std::bit_cast<std::uint32_t>(f), b << 16);
        if (std::isnan(f)) {
            EXPECT_TRUE(std::isnan(moelb::bf16_bits_to_float(moelb::float_to_bf16_bits(f))));
            continue;
        }
        ASSERT_EQ(moelb::float_to_bf16_bits(f), bits) << b;
    }
    // 1 + 2^-8 is the midpoint of 1 and 1 + 2^-7: ties to 1 (even); 1 + 3 * 2^-8 ties to 1 + 2^-6.
    EXPECT_EQ(moelb::float_to_bf16_bits(1.0f + 0x1p-8f), 0x3F80);
    EXPECT_EQ(moelb::float_to_bf16_bits(1.0f + 0x1p-8f + 0x1p-20f), 0x3F81);
    EXPECT_EQ(moelb::float_to_bf16_bits(1.0f + 3 * 0x1p-8f), 0x3F82);
    EXPECT_EQ(moelb::float_to_bf16_bits(3.4e38f), 0x7F80);  // overflows to infinity
    // NaN stays NaN with its sign, whatever its payload.
    const float payload_nan = std::bit_cast<float>(0x7F800001u);
    EXPECT_TRUE(std::isnan(moelb::bf16_bits_to_float(moelb::float_to_bf16_bits(payload_nan))));
    EXPECT_EQ(moelb::float_to_bf16_bits(-std::numeric_limits<float>::quiet_NaN()) & 0x8000, 0x8000);
}

std::vector<float> random_values(Index n, std::uint64_t seed, float scale = 1.0f) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, scale);
    std::vector<float> v(static_cast<std::size_t>(n));
    for (auto& x : v) x = normal(rng);
    return v;
}

TEST(WeightFormat, Fp8BlockQuantiserFollowsDeepSeeksConvention) {
    const Index count = 2, rows = 40, cols = 50;
    const BlockSize block{16, 32};  // partial last blocks in both directions
    auto w = random_values(count * rows * cols, 3);
    // Block (1, 0) of matrix 1 is all zero.
    for (Index r = 16; r < 32; ++r) {
        for (Index c = 0; c < 32; ++c) w[(rows + r) * cols + c] = 0.0f;
    }
    const auto t = WeightTensor::quantize(w, WeightFormat::kFp8E4M3, count, rows, cols, block);
    ASSERT_EQ(t.scale_rows(), 3);
    ASSERT_EQ(t.scale_cols(), 2);
    ASSERT_EQ(t.scale_inv().size(), 2u * 3 * 2);
    for (Index m = 0; m < count; ++m) {
        for (Index br = 0; br < 3; ++br) {
            for (Index bc = 0; bc < 2; ++bc) {
                float amax = 0;
                for (Index r = br * 16; r < std::min<Index>(rows, br * 16 + 16); ++r) {
                    for (Index c = bc * 32; c < std::min<Index>(cols, bc * 32 + 32); ++c) {
                        amax = std::max(amax, std::fabs(w[(m * rows + r) * cols + c]));
                    }
                }
                const float scale = t.scale_inv()[(m * 3 + br) * 2 + bc];
                EXPECT_EQ(scale, amax > 0 ? amax / 448.0f : 1.0f) << m << br << bc;
            }
        }
    }
    for (Index m = 0; m < count; ++m) {
        for (Index r = 0; r < rows; ++r) {
            for (Index c = 0; c < cols; ++c) {
                const float x = w[(m * rows + r) * cols + c];
                const float scale = t.scale_inv()[(m * 3 + r / 16) * 2 + c / 32];
                const auto q = static_cast<std::uint8_t>(t.matrix(m)[r * cols + c]);
                // q is x / scale rounded to the nearest E4M3 value.
                EXPECT_EQ(q, moelb::float_to_fp8_e4m3_bits(x / scale));
                const double dq = fp8_definition(q) * scale;
                EXPECT_EQ(t.dequantized(m, r, c), static_cast<float>(fp8_definition(q) * scale));
                // 3 mantissa bits: relative error <= 2^-4, absolute <= 2^-10 * scale when
                // subnormal.
                EXPECT_LE(std::fabs(dq - x), std::max(std::fabs(x) * 0x1p-4, scale * 0x1p-10));
            }
        }
    }
}

TEST(WeightFormat, TinyBlocksNeverQuantiseToNaN) {
    // Blocks whose amax / 448 (or / 127) is subnormal: such a scale has too few bits, and
    // amax / scale could round to an fp8 NaN code (found at amax 6.6e-43). They keep scale 1.
    for (const float amax : {6.59e-43f, 2.4e-41f, 1.2e-38f, 1e-45f}) {
        const std::vector<float> w = {amax, -amax / 2, amax / 3, 0.0f};
        for (const auto format : {WeightFormat::kFp8E4M3, WeightFormat::kInt8}) {
            const auto t = WeightTensor::quantize(w, format, 1, 1, 4, BlockSize{1, 4});
            EXPECT_EQ(t.scale_inv()[0], 1.0f) << amax;
            for (Index c = 0; c < 4; ++c) {
                EXPECT_TRUE(std::isfinite(t.dequantized(0, 0, c))) << amax << " " << c;
                EXPECT_LE(std::fabs(t.dequantized(0, 0, c) - w[c]), 0x1p-9f) << amax;
            }
        }
    }
    // The smallest normal scale is kept: amax = 448 * FLT_MIN.
    const float amax = 448.0f * std::numeric_limits<float>::min();
    const auto t = WeightTensor::quantize(std::vector<float>{amax, -amax}, WeightFormat::kFp8E4M3,
                                          1, 1, 2, BlockSize{1, 2});
    EXPECT_EQ(t.scale_inv()[0], std::numeric_limits<float>::min());
    EXPECT_EQ(t.dequantized(0, 0, 0), amax);
    EXPECT_EQ(t.dequantized(0, 0, 1), -amax);
}

TEST(WeightFormat, Int8RowQuantiserAndBf16) {
    const Index rows = 7, cols = 33;
    auto w = random_values(rows * cols, 4, 0.1f);
    for (Index c = 0; c < cols; ++c) w[3 * cols + c] = 0.0f;  // an all-zero row
    const auto t = WeightTensor::quantize(w, WeightFormat::kInt8, 1, rows, cols);
    ASSERT_EQ(t.scale_inv().size(), static_cast<std::size_t>(rows));
    for (Index r = 0; r < rows; ++r) {
        float amax = 0;
        for (Index c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(w[r * cols + c]));
        const float scale = t.scale_inv()[r];
        EXPECT_EQ(scale, amax > 0 ? amax / 127.0f : 1.0f);
        for (Index c = 0; c < cols; ++c) {
            const int q = static_cast<std::int8_t>(t.matrix(0)[r * cols + c]);
            EXPECT_LE(std::abs(q), 127);
            EXPECT_LE(std::fabs(q * static_cast<double>(scale) - w[r * cols + c]),
                      0.5 * scale * (1 + 1e-6));
            EXPECT_EQ(q, static_cast<int>(std::nearbyint(w[r * cols + c] / scale)));
        }
    }
    const auto b = WeightTensor::quantize(w, WeightFormat::kBFloat16, 1, rows, cols);
    EXPECT_TRUE(b.scale_inv().empty());
    for (Index i = 0; i < rows * cols; ++i) {
        std::uint16_t bits;
        std::memcpy(&bits, b.bytes().data() + 2 * i, 2);
        EXPECT_EQ(bits, moelb::float_to_bf16_bits(w[i]));
    }
    // Storage is 64-byte aligned.
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(b.bytes().data()) % 64, 0u);
}

TEST(WeightFormat, QuantiserRefusesNonFiniteWeights) {
    std::vector<float> w(8, 1.0f);
    w[5] = std::numeric_limits<float>::infinity();
    expect_invalid_argument(
        [&] { WeightTensor::quantize(w, WeightFormat::kFp8E4M3, 1, 2, 4, {}, "w13"); },
        "w13 has the non-finite value inf at flat index 5");
    expect_invalid_argument([&] { WeightTensor::quantize(w, WeightFormat::kInt8, 1, 2, 4); },
                            "non-finite");
    expect_invalid_argument([&] { WeightTensor::quantize(w, WeightFormat::kInt8, 1, 3, 4); },
                            "array has 8 values, expected [1, 3, 4]");
}

}  // namespace
