// Private: the expert GEMM with a quantised right-hand side (expert_gemm.hpp), the simple
// reference implementation the ISA kernel (cpp/src/isa/quant_kernels.cpp) replaces.
#include "expert_gemm.hpp"

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <cstring>

#include "moelb/errors.hpp"

namespace moelb::detail {
namespace {

// Every E4M3FN byte's float value.
const std::array<float, 256>& fp8_table() {
    static const std::array<float, 256> table = [] {
        std::array<float, 256> t{};
        for (int b = 0; b < 256; ++b) t[b] = fp8_e4m3_bits_to_float(static_cast<std::uint8_t>(b));
        return t;
    }();
    return table;
}

inline float load(const float* x, Index i) { return x[i]; }
inline float load(const std::uint16_t* x, Index i) {
    return std::bit_cast<float>(static_cast<std::uint32_t>(x[i]) << 16);
}

// sum_k x[k] * w[k]: lane l sums the k = l (mod 8) terms in increasing k, then a fixed tree.
template <class X>
float dot(const X* x, const float* w, Index k) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    Index c = 0;
    for (; c + 8 <= k; c += 8) {
        for (int l = 0; l < 8; ++l) acc[l] += load(x, c + l) * w[c + l];
    }
    for (int l = 0; c + l < k; ++l) acc[l] += load(x, c + l) * w[c + l];
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

// Rows [j0, j1) of W dequantised into panel [j1 - j0, k] (w[r, c] = float(q) * scale).
void dequantize_rows(const QuantMatrix& w, Index j0, Index j1, float* panel) {
    const Index k = w.k;
    for (Index j = j0; j < j1; ++j) {
        float* dst = panel + (j - j0) * k;
        switch (w.format) {
            case WeightFormat::kFloat32:
                std::memcpy(dst, static_cast<const float*>(w.data) + j * k, k * sizeof(float));
                break;
            case WeightFormat::kBFloat16: {
                const auto* src = static_cast<const std::uint16_t*>(w.data) + j * k;
                for (Index c = 0; c < k; ++c) dst[c] = load(src, c);
                break;
            }
            case WeightFormat::kFp8E4M3: {
                const auto& table = fp8_table();
                const auto* src = static_cast<const std::uint8_t*>(w.data) + j * k;
                const Index scale_cols = (k + w.block.cols - 1) / w.block.cols;
                const float* scales = w.scale_inv + (j / w.block.rows) * scale_cols;
                for (Index c0 = 0; c0 < k; c0 += w.block.cols) {
                    const float s = scales[c0 / w.block.cols];
                    const Index c1 = std::min(k, c0 + w.block.cols);
                    for (Index c = c0; c < c1; ++c) dst[c] = table[src[c]] * s;
                }
                break;
            }
            case WeightFormat::kInt8: {
                const auto* src = static_cast<const std::int8_t*>(w.data) + j * k;
                const float s = w.scale_inv[j];
                for (Index c = 0; c < k; ++c) dst[c] = static_cast<float>(src[c]) * s;
                break;
            }
        }
    }
}

template <class X>
void gemm(const X* x, Index m, const QuantMatrix& w, Index n_begin, Index n_end, float* y,
          Index ldy, float* scratch) {
    const Index k = w.k;
    for (Index j0 = n_begin; j0 < n_end; j0 += kPanelRows) {
        const Index j1 = std::min(n_end, j0 + kPanelRows);
        const float* panel;
        if (w.format == WeightFormat::kFloat32) {
            panel = static_cast<const float*>(w.data) + j0 * k;
        } else {
            dequantize_rows(w, j0, j1, scratch);
            panel = scratch;
        }
        for (Index i = 0; i < m; ++i) {
            const X* xi = x + i * k;
            float* yi = y + i * ldy;
            for (Index j = j0; j < j1; ++j) yi[j] = dot(xi, panel + (j - j0) * k, k);
        }
    }
}

}  // namespace

std::size_t expert_gemm_scratch_floats(WeightFormat format, Index k) {
    return format == WeightFormat::kFloat32 ? 0 : static_cast<std::size_t>(kPanelRows * k);
}

void expert_gemm(const void* x, ActivationDType x_dtype, Index m, const QuantMatrix& w,
                 Index n_begin, Index n_end, float* y, Index ldy, float* scratch) {
    MOELB_CHECK(
        0 <= n_begin && n_begin <= n_end && n_end <= w.n,
        "expert_gemm: columns [" << n_begin << ", " << n_end << ") outside [0, " << w.n << ")");
    if (x_dtype == ActivationDType::kBFloat16) {
        gemm(static_cast<const std::uint16_t*>(x), m, w, n_begin, n_end, y, ldy, scratch);
    } else {
        gemm(static_cast<const float*>(x), m, w, n_begin, n_end, y, ldy, scratch);
    }
}

}  // namespace moelb::detail
