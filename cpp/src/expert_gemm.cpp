// Private: the expert GEMM with a quantised right-hand side (expert_gemm.hpp), in the layer's
// vocabulary, on the ISA kernel isa::kernels().quant_gemm.
#include "expert_gemm.hpp"

#include "isa/kernels.hpp"
#include "moelb/errors.hpp"

namespace moelb::detail {
namespace {

isa::WeightType weight_type(WeightFormat format) {
    switch (format) {
        case WeightFormat::kFloat32:
            return isa::WeightType::kFloat32;
        case WeightFormat::kBFloat16:
            return isa::WeightType::kBfloat16;
        case WeightFormat::kFp8E4M3:
            return isa::WeightType::kFp8E4m3;
        case WeightFormat::kInt8:
            return isa::WeightType::kInt8;
    }
    MOELB_CHECK(false, "expert_gemm: unknown weight format " << static_cast<int>(format));
    return isa::WeightType::kFloat32;
}

}  // namespace

std::size_t expert_gemm_scratch_floats(Index m, Index k) {
    const std::size_t bytes = isa::kernels().quant_gemm_scratch_bytes(m, k);
    return (bytes + sizeof(float) - 1) / sizeof(float);
}

void expert_gemm(const void* x, ActivationDType x_dtype, Index m, const QuantMatrix& w,
                 Index n_begin, Index n_end, float* y, Index ldy, float* scratch) {
    MOELB_CHECK(
        0 <= n_begin && n_begin <= n_end && n_end <= w.n,
        "expert_gemm: columns [" << n_begin << ", " << n_end << ") outside [0, " << w.n << ")");
    isa::QuantGemmArgs args;
    args.x = x;
    args.x_type = x_dtype == ActivationDType::kBFloat16 ? isa::ActivationType::kBfloat16
                                                        : isa::ActivationType::kFloat32;
    args.m = m;
    args.x_stride = w.k;
    args.w.type = weight_type(w.format);
    args.w.data = w.data;
    args.w.rows = w.n;
    args.w.cols = w.k;
    args.w.scale_inv = w.scale_inv;
    if (w.format == WeightFormat::kFp8E4M3) {
        args.w.block_rows = w.block.rows;
        args.w.block_cols = w.block.cols;
    }
    args.n_begin = n_begin;
    args.n_end = n_end;
    args.y = y;
    args.y_stride = ldy;
    args.scratch = scratch;
    args.scratch_bytes = expert_gemm_scratch_floats(m, w.k) * sizeof(float);
    isa::kernels().quant_gemm(args);
}

}  // namespace moelb::detail
