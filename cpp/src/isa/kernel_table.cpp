// The kernel table of one ISA path (isa/kernels.hpp; compiled once per path).
#include "kernels.hpp"

namespace moelb::MOELB_ISA_NS {

#if defined(MOELB_ISA_BASE)
// A path that extends another (cmake/moelb_isa.cmake: avx512_bf16 = avx512 + AVX512_BF16) compiles
// only the kernels the extra instructions change; the rest are the base path's.
const isa::Kernels& kernels() {
    static const isa::Kernels kTable = [] {
        isa::Kernels t = MOELB_ISA_BASE::kernels();
        t.quant_gemm = &quant_gemm;
        t.quant_gemm_scratch_bytes = &quant_gemm_scratch_bytes;
        t.read_sum = &read_sum;
        t.fma_loop = &fma_loop;
        t.bf16_dot_loop = &bf16_dot_loop;
        t.bf16_dot_method = &bf16_dot_method;
        return t;
    }();
    return kTable;
}
#else
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
#endif

}  // namespace moelb::MOELB_ISA_NS
