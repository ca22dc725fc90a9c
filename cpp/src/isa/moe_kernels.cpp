// The MoE layer forward's kernels of one ISA path (isa/kernels.hpp; compiled once per path): the
// gate GEMM, the SwiGLU MLP of a row block, the transposing store and the routed combine.
#include <Eigen/Core>
#include <algorithm>

#include "kernels.hpp"

namespace moelb::MOELB_ISA_NS {
namespace {

using isa::Index;
using RowMatrixXf = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMap = Eigen::Map<RowMatrixXf>;
using ConstRowMap = Eigen::Map<const RowMatrixXf>;
using ColMap = Eigen::Map<Eigen::MatrixXf>;
using ConstColMap = Eigen::Map<const Eigen::MatrixXf>;

}  // namespace

void gate_rows(const float* x, Index rows, Index hidden_size, const float* gate, Index num_experts,
               float* logits) {
    RowMap(logits, rows, num_experts).noalias() =
        ConstRowMap(x, rows, hidden_size) * ConstRowMap(gate, num_experts, hidden_size).transpose();
}

// Column-major results put the weights on the right-hand side of both products, where Eigen packs
// a row-major weight matrix by copying contiguous rows; on the left-hand side it would transpose
// every expert's weights on every block (the forward's largest cost after the products).
void mlp_rows(const float* x, Index rows, Index hidden_size, Index intermediate_size,
              const float* w_gate_up, const float* w_down, float limit, float* gate_up,
              float* y_cm) {
    const Index H = hidden_size, I = intermediate_size;
    ColMap gu(gate_up, rows, 2 * I);
    gu.noalias() = ConstRowMap(x, rows, H) * ConstRowMap(w_gate_up, 2 * I, H).transpose();
    // a = silu(min(g, L)) * clamp(u, -L, L), into the gate columns.
    Eigen::Map<Eigen::ArrayXf> g(gate_up, rows * I);
    Eigen::Map<Eigen::ArrayXf> up(gate_up + rows * I, rows * I);
    if (limit > 0) {
        g = g.min(limit);
        up = up.max(-limit).min(limit);
    }
    g = g / (1.0f + (-g).exp()) * up;
    ColMap(y_cm, rows, H).noalias() =
        ConstColMap(gate_up, rows, I) * ConstRowMap(w_down, H, I).transpose();
}

// In tiles of 16 columns so that each tile's reads stay in cache.
void store_rows(const float* y_cm, Index rows, Index hidden_size, float* dst,
                const std::int32_t* dst_rows) {
    constexpr Index kTile = 16;
    for (Index h0 = 0; h0 < hidden_size; h0 += kTile) {
        const Index width = std::min(kTile, hidden_size - h0);
        for (Index r = 0; r < rows; ++r) {
            float* d = dst + (dst_rows != nullptr ? dst_rows[r] : r) * hidden_size + h0;
            const float* src = y_cm + h0 * rows + r;
            for (Index h = 0; h < width; ++h) d[h] = src[h * rows];
        }
    }
}

void combine_rows(const float* y, const std::int32_t* ids, const float* weights, Index num_columns,
                  Index hidden_size, float rsf, Index begin, Index end, float* out) {
    const Index Kp = num_columns, H = hidden_size;
    for (Index t = begin; t < end; ++t) {
        auto row = RowMap(out + t * H, 1, H);
        row.setZero();
        for (Index k = 0; k < Kp; ++k) {
            if (ids[t * Kp + k] < 0) continue;
            row += weights[t * Kp + k] * ConstRowMap(y + (t * Kp + k) * H, 1, H);
        }
        row *= rsf;
    }
}

void add_values(float* out, const float* in, Index n) {
    Eigen::Map<Eigen::ArrayXf>(out, n) += Eigen::Map<const Eigen::ArrayXf>(in, n);
}

}  // namespace moelb::MOELB_ISA_NS
