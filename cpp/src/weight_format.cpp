// Weight formats and activation dtypes (moelb/weight_format.hpp): names, scalar conversions, the
// quantisers and WeightTensor.
#include "moelb/weight_format.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include "enum_names.hpp"
#include "moelb/errors.hpp"

namespace moelb {
namespace {

constexpr detail::EnumNames<WeightFormat, 4> kFormatNames{{
    {"float32", WeightFormat::kFloat32},
    {"bfloat16", WeightFormat::kBFloat16},
    {"fp8_e4m3", WeightFormat::kFp8E4M3},
    {"int8", WeightFormat::kInt8},
}};

constexpr detail::EnumNames<ActivationDType, 2> kActivationNames{{
    {"float32", ActivationDType::kFloat32},
    {"bfloat16", ActivationDType::kBFloat16},
}};

Index ceil_div(Index a, Index b) { return (a + b - 1) / b; }

// Round half to even in the default floating-point environment (nearbyint honours the current
// rounding mode, which moelb never changes).
float round_even(float x) { return std::nearbyint(x); }

}  // namespace

WeightFormat parse_weight_format(std::string_view name, std::string_view param) {
    return detail::parse_enum(kFormatNames, name, param, "a weight format");
}

std::string_view to_string(WeightFormat format) { return detail::enum_name(kFormatNames, format); }

ActivationDType parse_activation_dtype(std::string_view name, std::string_view param) {
    return detail::parse_enum(kActivationNames, name, param, "an activation dtype");
}

std::string_view to_string(ActivationDType dtype) {
    return detail::enum_name(kActivationNames, dtype);
}

std::size_t element_size(WeightFormat format) {
    switch (format) {
        case WeightFormat::kFloat32:
            return 4;
        case WeightFormat::kBFloat16:
            return 2;
        case WeightFormat::kFp8E4M3:
        case WeightFormat::kInt8:
            return 1;
    }
    return 4;
}

std::size_t element_size(ActivationDType dtype) {
    return dtype == ActivationDType::kBFloat16 ? 2 : 4;
}

bool has_scales(WeightFormat format) {
    return format == WeightFormat::kFp8E4M3 || format == WeightFormat::kInt8;
}

// ---------------------------------------------------------------------------------------------
// Scalar conversions

std::uint16_t float_to_bf16_bits(float value) {
    std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
    if (std::isnan(value)) return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);
    // Adding 0x7FFF plus the lowest kept bit rounds to nearest even; a carry into the exponent
    // is the correct result (up to infinity).
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return static_cast<std::uint16_t>(bits >> 16);
}

float bf16_bits_to_float(std::uint16_t bits) {
    return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
}

float fp8_e4m3_bits_to_float(std::uint8_t bits) {
    const bool negative = (bits & 0x80u) != 0;
    const int exponent = (bits >> 3) & 0xF;
    const int mantissa = bits & 0x7;
    float magnitude;
    if (exponent == 0xF && mantissa == 0x7) {
        magnitude = std::numeric_limits<float>::quiet_NaN();
    } else if (exponent == 0) {
        magnitude = std::ldexp(static_cast<float>(mantissa), -9);  // subnormal: m * 2^-9
    } else {
        magnitude = std::ldexp(static_cast<float>(8 + mantissa), exponent - 10);
    }
    return negative ? -magnitude : magnitude;
}

std::uint8_t float_to_fp8_e4m3_bits(float value) {
    const std::uint8_t sign = (std::bit_cast<std::uint32_t>(value) >> 24) & 0x80u;
    constexpr std::uint8_t kNaN = 0x7F;
    if (!std::isfinite(value)) return sign | kNaN;
    const float a = std::fabs(value);
    if (a < 0x1p-6f) {
        // Subnormal range: multiples of 2^-9 (a * 512 is exact); 8 * 2^-9 is the smallest
        // normal, whose bits are 0x08 as well.
        return sign | static_cast<std::uint8_t>(round_even(a * 512.0f));
    }
    int e = std::ilogb(a);                                       // a in [2^e, 2^(e+1))
    int q = static_cast<int>(round_even(std::ldexp(a, 3 - e)));  // in [8, 16]
    if (q == 16) {
        q = 8;
        ++e;
    }
    const int biased = e + 7;
    if (biased > 15 || (biased == 15 && q == 15)) return sign | kNaN;  // above 448
    return sign | static_cast<std::uint8_t>((biased << 3) | (q - 8));
}

// ---------------------------------------------------------------------------------------------
// WeightTensor

WeightTensor::WeightTensor(WeightFormat format, Index count, Index rows, Index cols,
                           BlockSize block)
    : format_(format), count_(count), rows_(rows), cols_(cols), block_(block) {
    MOELB_CHECK_ARG(count >= 0 && rows >= 0 && cols >= 0,
                    "a weight tensor needs non-negative dimensions, got [" << count << ", " << rows
                                                                           << ", " << cols << "]");
    MOELB_CHECK_ARG(block.rows >= 1 && block.cols >= 1, "weight_block_size must be positive, got ("
                                                            << block.rows << ", " << block.cols
                                                            << ")");
    data_.assign(static_cast<std::size_t>(count) * matrix_bytes(), std::byte{0});
    scales_.assign(static_cast<std::size_t>(count * matrix_scales()), 1.0f);
}

Index WeightTensor::scale_rows() const {
    if (format_ == WeightFormat::kFp8E4M3) return ceil_div(rows_, block_.rows);
    if (format_ == WeightFormat::kInt8) return rows_;
    return 0;
}

Index WeightTensor::scale_cols() const {
    if (format_ == WeightFormat::kFp8E4M3) return ceil_div(cols_, block_.cols);
    if (format_ == WeightFormat::kInt8) return 1;
    return 0;
}

std::size_t WeightTensor::matrix_bytes() const {
    return static_cast<std::size_t>(rows_ * cols_) * element_bytes();
}

float WeightTensor::dequantized(Index i, Index r, Index c) const {
    const std::byte* m = matrix(i);
    const Index k = r * cols_ + c;
    switch (format_) {
        case WeightFormat::kFloat32: {
            float v;
            std::memcpy(&v, m + k * 4, 4);
            return v;
        }
        case WeightFormat::kBFloat16: {
            std::uint16_t v;
            std::memcpy(&v, m + k * 2, 2);
            return bf16_bits_to_float(v);
        }
        case WeightFormat::kFp8E4M3:
            return fp8_e4m3_bits_to_float(static_cast<std::uint8_t>(m[k])) *
                   matrix_scale_inv(i)[(r / block_.rows) * scale_cols() + c / block_.cols];
        case WeightFormat::kInt8:
            return static_cast<float>(static_cast<std::int8_t>(m[k])) * matrix_scale_inv(i)[r];
    }
    return 0.0f;
}

void WeightTensor::copy_matrix_from(const WeightTensor& other, Index src, Index dst) {
    MOELB_CHECK(other.format_ == format_ && other.rows_ == rows_ && other.cols_ == cols_ &&
                    other.matrix_scales() == matrix_scales() &&
                    (format_ != WeightFormat::kFp8E4M3 || other.block_ == block_),
                "copy_matrix_from: tensors of different formats or shapes");
    std::memcpy(matrix(dst), other.matrix(src), matrix_bytes());
    if (!scales_.empty()) {
        std::copy_n(other.matrix_scale_inv(src), matrix_scales(), matrix_scale_inv(dst));
    }
}

WeightTensor WeightTensor::quantize(std::span<const float> values, WeightFormat format, Index count,
                                    Index rows, Index cols, BlockSize block,
                                    std::string_view name) {
    WeightTensor t(format, count, rows, cols, block);
    MOELB_CHECK_ARG(static_cast<Index>(values.size()) == count * rows * cols,
                    name << " has " << values.size() << " values, expected [" << count << ", "
                         << rows << ", " << cols << "]");
    if (format == WeightFormat::kFloat32) {
        std::memcpy(t.data_.data(), values.data(), values.size() * sizeof(float));
        return t;
    }
    if (format == WeightFormat::kBFloat16) {
        for (std::size_t i = 0; i < values.size(); ++i) {
            const std::uint16_t b = float_to_bf16_bits(values[i]);
            std::memcpy(t.data_.data() + 2 * i, &b, 2);
        }
        return t;
    }
    for (std::size_t i = 0; i < values.size(); ++i) {
        MOELB_CHECK_ARG(std::isfinite(values[i]), name << " has the non-finite value " << values[i]
                                                       << " at flat index " << i
                                                       << "; weight_format='" << to_string(format)
                                                       << "' needs finite weights to scale");
    }
    // One scale per (row block, column block) for fp8, per row for int8.
    const Index br = format == WeightFormat::kFp8E4M3 ? block.rows : 1;
    const Index bc = format == WeightFormat::kFp8E4M3 ? block.cols : cols;
    const float range = format == WeightFormat::kFp8E4M3 ? kFp8E4M3Max : kInt8Max;
    for (Index m = 0; m < count; ++m) {
        const float* w = values.data() + m * rows * cols;
        std::byte* q = t.matrix(m);
        float* scales = t.matrix_scale_inv(m);
        for (Index sr = 0; sr < t.scale_rows(); ++sr) {
            for (Index sc = 0; sc < t.scale_cols(); ++sc) {
                const Index r0 = sr * br, r1 = std::min(rows, r0 + br);
                const Index c0 = sc * bc, c1 = std::min(cols, c0 + bc);
                float amax = 0.0f;
                for (Index r = r0; r < r1; ++r) {
                    for (Index c = c0; c < c1; ++c)
                        amax = std::max(amax, std::fabs(w[r * cols + c]));
                }
                // An all-zero block, or one so small that amax / range is not a normal float,
                // keeps scale 1: its values quantise to 0 (or to fp8 / int8 of themselves). A
                // subnormal scale has too few bits: amax / scale could land far above the range
                // (an fp8 NaN code from finite weights).
                float scale = amax / range;
                if (!(scale >= std::numeric_limits<float>::min())) scale = 1.0f;
                scales[sr * t.scale_cols() + sc] = scale;
                for (Index r = r0; r < r1; ++r) {
                    for (Index c = c0; c < c1; ++c) {
                        const float v = w[r * cols + c] / scale;
                        q[r * cols + c] =
                            format == WeightFormat::kFp8E4M3
                                ? static_cast<std::byte>(float_to_fp8_e4m3_bits(v))
                                : static_cast<std::byte>(static_cast<std::int8_t>(
                                      std::clamp(round_even(v), -kInt8Max, kInt8Max)));
                    }
                }
            }
        }
    }
    return t;
}

}  // namespace moelb
