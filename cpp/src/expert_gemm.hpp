// Private: the one GEMM with a quantised right-hand side that every expert projection of the MoE
// layer calls when its weights or activations are not float32 (moe_layer.cpp), and the router
// gate with bf16 activations:
//
//     y[i, j] (float32) = sum_k x[i, k] * dequant(W)[j, k]     for i < m, n_begin <= j < n_end
//
// x [m, k] row-major, float32 or bf16 bits; W [n, k] row-major in its stored format with its
// scales (moelb/weight_format.hpp gives dequant). The bits of y[i, j] depend only on x row i, W
// row j and the ISA path: not on m, on the column range, on the thread count or on the scratch.
//
// The layer's vocabulary (WeightFormat, ActivationDType, WeightTensor) on top of the ISA kernel
// isa::kernels().quant_gemm (cpp/src/isa/quant_kernels.cpp: decode streams W once, prefill
// dequantises panels of W); the layer's workspace accounting asks expert_gemm_scratch_floats,
// so the peak formula follows the kernel's scratch on whichever path runs.
#pragma once

#include <cstddef>

#include "moelb/views.hpp"
#include "moelb/weight_format.hpp"

namespace moelb::detail {

// One matrix W [n, k] in a stored format (WeightTensor::matrix(i) and matrix_scale_inv(i)).
struct QuantMatrix {
    WeightFormat format = WeightFormat::kFloat32;
    const void* data = nullptr;        // n * k elements of element_size(format) bytes
    const float* scale_inv = nullptr;  // fp8: [ceil(n / block.rows), ceil(k / block.cols)];
                                       // int8: [n]; otherwise unused
    Index n = 0, k = 0;
    BlockSize block{};
};

inline QuantMatrix quant_matrix(const WeightTensor& t, Index i) {
    return {t.format(), t.matrix(i), t.matrix_scale_inv(i), t.rows(), t.cols(), t.block()};
}

// Floats of scratch expert_gemm needs for up to m rows of x with k columns, on the ISA path this
// process runs (isa::kernels().quant_gemm_scratch_bytes, rounded up to whole floats).
std::size_t expert_gemm_scratch_floats(Index m, Index k);

// y[i * ldy + j] for i < m and n_begin <= j < n_end (other entries untouched); x [m, k]
// row-major, float32 (x_dtype kFloat32) or bf16 bits (kBFloat16); scratch: at least
// expert_gemm_scratch_floats(m, w.k) floats.
void expert_gemm(const void* x, ActivationDType x_dtype, Index m, const QuantMatrix& w,
                 Index n_begin, Index n_end, float* y, Index ldy, float* scratch);

}  // namespace moelb::detail
