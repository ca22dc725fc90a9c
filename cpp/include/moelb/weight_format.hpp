// Weight formats of the MoE layer's expert matrices and the activation dtypes of its forward
// (issue 23): names, element sizes, scalar conversions, the quantisers that turn float32 matrices
// into a stored format, and WeightTensor, a stack of matrices held in one.
//
// Formats (one vocabulary in C++, Python and the docs):
//   float32    the reference;
//   bfloat16   w = the bf16 value exactly;
//   fp8_e4m3   E4M3FN (torch.float8_e4m3fn / ml_dtypes.float8_e4m3fn: bias 7, no infinities,
//              0x7F / 0xFF NaN, largest finite 448) with float32 block scales, DeepSeek's
//              `weight_scale_inv`: w[r, c] = float(q[r, c]) * scale_inv[r / br, c / bc] over a
//              scale grid of [ceil(rows / br), ceil(cols / bc)] (partial last blocks allowed);
//   int8       per output channel: w[r, c] = q[r, c] * scale_inv[r].
// Activations: float32 or bfloat16 (stored as the upper 16 bits of a float32, uint16).
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <span>
#include <string_view>
#include <vector>

#include "moelb/views.hpp"

namespace moelb {

enum class WeightFormat { kFloat32, kBFloat16, kFp8E4M3, kInt8 };
enum class ActivationDType { kFloat32, kBFloat16 };

// "float32", "bfloat16", "fp8_e4m3", "int8"; anything else is an InvalidArgument naming `param`
// and the value.
WeightFormat parse_weight_format(std::string_view name, std::string_view param = "weight_format");
std::string_view to_string(WeightFormat format);
// "float32", "bfloat16".
ActivationDType parse_activation_dtype(std::string_view name,
                                       std::string_view param = "activation_dtype");
std::string_view to_string(ActivationDType dtype);

// Bytes of one stored element: 4, 2, 1, 1 / 4, 2.
std::size_t element_size(WeightFormat format);
std::size_t element_size(ActivationDType dtype);
// Whether the format carries float32 scales (fp8_e4m3: per block; int8: per row).
bool has_scales(WeightFormat format);

// The rows and columns of one fp8 scale block (DeepSeek: 128 x 128).
struct BlockSize {
    Index rows = 128;
    Index cols = 128;
    friend bool operator==(const BlockSize&, const BlockSize&) = default;
};

// ---------------------------------------------------------------------------------------------
// Scalar conversions (bit patterns as unsigned integers).

// float -> bfloat16, round to nearest even; NaN stays NaN (quiet, sign kept), overflow gives inf
// (as torch and ml_dtypes).
std::uint16_t float_to_bf16_bits(float value);
// Exact.
float bf16_bits_to_float(std::uint16_t bits);
// Exact: every E4M3FN value is a float; 0x7F / 0xFF are NaN.
float fp8_e4m3_bits_to_float(std::uint8_t bits);
// float -> E4M3FN, round to nearest even (subnormals included). Out of range as
// torch.float8_e4m3fn (c10::Float8_e4m3fn) and ml_dtypes do, not saturating: a magnitude that
// rounds above 448 (anything above 464; 464 itself ties to 448), infinities and NaN become NaN
// (0x7F, with the input's sign bit).
std::uint8_t float_to_fp8_e4m3_bits(float value);

// The largest finite E4M3FN value and the int8 range used by the quantisers.
inline constexpr float kFp8E4M3Max = 448.0f;
inline constexpr float kInt8Max = 127.0f;

// ---------------------------------------------------------------------------------------------
// 64-byte aligned storage (the layer's weights: the kernels see the same alignment always).

template <class T>
struct AlignedAllocator {
    using value_type = T;
    static constexpr std::size_t kAlignment = 64;
    AlignedAllocator() = default;
    template <class U>
    AlignedAllocator(const AlignedAllocator<U>&) {}  // NOLINT(google-explicit-constructor)
    T* allocate(std::size_t n) {
        return static_cast<T*>(::operator new[](n * sizeof(T), std::align_val_t{kAlignment}));
    }
    void deallocate(T* p, std::size_t) { ::operator delete[](p, std::align_val_t{kAlignment}); }
    template <class U>
    bool operator==(const AlignedAllocator<U>&) const {
        return true;
    }
};

using AlignedBytes = std::vector<std::byte, AlignedAllocator<std::byte>>;

// ---------------------------------------------------------------------------------------------
// A stack of `count` row-major matrices [rows, cols] in one weight format: their elements as raw
// bytes (64-byte aligned; matrix i at byte i * matrix_bytes()) and their float32 scales (matrix i
// at scale i * matrix_scales(): fp8 a [scale_rows(), scale_cols()] grid, int8 [rows], none
// otherwise).
class WeightTensor {
  public:
    WeightTensor() = default;
    // Zero elements and unit scales.
    WeightTensor(WeightFormat format, Index count, Index rows, Index cols,
                 BlockSize block = BlockSize{});

    // Quantises float32 values [count, rows, cols] (row-major) into `format`:
    //   bfloat16: round to nearest even;
    //   fp8_e4m3: per block, scale_inv = amax / 448 (DeepSeek's convention), q = fp8(w /
    //             scale_inv) rounded to nearest even; an all-zero block gets scale_inv = 1;
    //   int8:     per row, scale_inv = amax / 127, q = w / scale_inv rounded half to even and
    //             clamped to [-127, 127]; an all-zero row gets scale_inv = 1;
    //   float32:  a copy.
    // fp8 / int8 refuse non-finite values (InvalidArgument naming `name` and the element).
    static WeightTensor quantize(std::span<const float> values, WeightFormat format, Index count,
                                 Index rows, Index cols, BlockSize block = BlockSize{},
                                 std::string_view name = "array");

    WeightFormat format() const { return format_; }
    Index count() const { return count_; }
    Index rows() const { return rows_; }
    Index cols() const { return cols_; }
    BlockSize block() const { return block_; }
    bool empty() const { return count_ == 0; }
    // fp8: the scale grid of one matrix; int8: [rows, 1]; otherwise [0, 0].
    Index scale_rows() const;
    Index scale_cols() const;
    std::size_t element_bytes() const { return element_size(format_); }
    std::size_t matrix_bytes() const;
    Index matrix_scales() const { return scale_rows() * scale_cols(); }

    std::span<std::byte> bytes() { return {data_.data(), data_.size()}; }
    std::span<const std::byte> bytes() const { return {data_.data(), data_.size()}; }
    std::span<float> scale_inv() { return {scales_.data(), scales_.size()}; }
    std::span<const float> scale_inv() const { return {scales_.data(), scales_.size()}; }
    const std::byte* matrix(Index i) const { return data_.data() + i * matrix_bytes(); }
    std::byte* matrix(Index i) { return data_.data() + i * matrix_bytes(); }
    const float* matrix_scale_inv(Index i) const {
        return scales_.empty() ? nullptr : scales_.data() + i * matrix_scales();
    }
    float* matrix_scale_inv(Index i) {
        return scales_.empty() ? nullptr : scales_.data() + i * matrix_scales();
    }

    // Element (i, r, c) dequantised with the format's definition (above), in float32.
    float dequantized(Index i, Index r, Index c) const;
    // Matrix `src` of `other` (same format and shape) copied into matrix `dst`, scales too.
    void copy_matrix_from(const WeightTensor& other, Index src, Index dst);

  private:
    WeightFormat format_ = WeightFormat::kFloat32;
    Index count_ = 0, rows_ = 0, cols_ = 0;
    BlockSize block_{};
    AlignedBytes data_;
    std::vector<float> scales_;
};

}  // namespace moelb
