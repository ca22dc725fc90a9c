// The kernel table of one ISA path (isa/kernels.hpp; compiled once per path).
#include "kernels.hpp"

namespace moelb::MOELB_ISA_NS {

const isa::Kernels& kernels() {
    static constexpr isa::Kernels kTable{
        &route_rows,
        &hash_scores,
        &gate_rows,
        &mlp_rows,
        &store_rows,
        &combine_rows,
        &add_values,
        &best_swap,
        &rank_descending,
        &replica_order,
        &narrow_balanced_packing,
        &peak_change,
        &other_change,
        &score_rows,
        &bound_rows,
        &quant_gemm,
        &quant_gemm_scratch_bytes,
        &read_sum,
        &fma_loop,
        &bf16_dot_loop,
        &bf16_dot_method,
    };
    return kTable;
}

}  // namespace moelb::MOELB_ISA_NS
