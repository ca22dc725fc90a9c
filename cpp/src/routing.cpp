// Top-k routing (DESIGN section 1; moelb/routing.hpp): select_experts with its scoring, grouped
// selection, fused shared column and padded rows, and the per-rank shared-slot remap.
#include "moelb/routing.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "enum_names.hpp"
#include "isa/kernels.hpp"
#include "moelb/errors.hpp"
#include "moelb/parallel.hpp"
#include "topk_epilogue.hpp"

namespace moelb {
namespace {

constexpr Index kRowsPerChunk = 256;

}  // namespace

constexpr detail::EnumNames<Scoring, 3> kScoringNames{{
    {"softmax", Scoring::kSoftmax},
    {"sigmoid", Scoring::kSigmoid},
    {"sqrtsoftplus", Scoring::kSqrtSoftplus},
}};

Scoring parse_scoring(std::string_view name, std::string_view param) {
    return detail::parse_enum(kScoringNames, name, param, "a scoring function");
}

std::string_view to_string(Scoring value) { return detail::enum_name(kScoringNames, value); }

constexpr detail::EnumNames<GroupScore, 2> kGroupScoreNames{{
    {"top2_sum", GroupScore::kTop2Sum},
    {"max", GroupScore::kMax},
}};

GroupScore parse_group_score(std::string_view name, std::string_view param) {
    return detail::parse_enum(kGroupScoreNames, name, param, "a group score");
}

std::string_view to_string(GroupScore value) { return detail::enum_name(kGroupScoreNames, value); }

void TopKConfig::validate() const {
    MOELB_CHECK_ARG(top_k >= 1, "top_k must be at least 1, got " << top_k);
    MOELB_CHECK_ARG(num_groups >= 0, "num_groups must be positive (or None), got " << num_groups);
    if (num_groups > 0) {
        MOELB_CHECK_ARG(
            topk_group >= 1 && topk_group <= num_groups,
            "topk_group=" << topk_group << " must be in [1, num_groups=" << num_groups << "]");
    } else {
        MOELB_CHECK_ARG(topk_group == 0,
                        "topk_group=" << topk_group << " needs num_groups (grouped selection)");
    }
    MOELB_CHECK_ARG(
        std::isfinite(routed_scaling_factor) && routed_scaling_factor > 0.0f,
        "routed_scaling_factor must be positive and finite, got " << routed_scaling_factor);
    MOELB_CHECK_ARG(num_fused_shared_experts == 0 || num_fused_shared_experts == 1,
                    "num_fused_shared_experts must be 0 or 1, got " << num_fused_shared_experts);
}

void TopKConfig::validate_for(int num_experts) const {
    validate();
    MOELB_CHECK_ARG(num_experts >= 1, "router_logits must have at least one expert column");
    MOELB_CHECK_ARG(top_k <= num_experts,
                    "top_k=" << top_k << " exceeds the number of experts " << num_experts);
    if (grouped()) {
        MOELB_CHECK_ARG(
            num_experts % num_groups == 0,
            "num_experts=" << num_experts << " is not divisible by num_groups=" << num_groups);
        const int kept = topk_group * (num_experts / num_groups);
        MOELB_CHECK_ARG(top_k <= kept, "top_k=" << top_k << " exceeds the " << kept
                                                << " experts of topk_group=" << topk_group
                                                << " groups of " << num_experts / num_groups);
    }
}

TopKConfig TopKConfig::deepseek_v3() {
    TopKConfig c;
    c.top_k = 8;
    c.scoring = Scoring::kSigmoid;
    c.num_groups = 8;
    c.topk_group = 4;
    c.group_score = GroupScore::kTop2Sum;
    c.renormalize = true;
    c.routed_scaling_factor = 2.5f;
    return c;
}

TopKConfig TopKConfig::deepseek_v4_flash() {
    TopKConfig c;
    c.top_k = 6;
    c.scoring = Scoring::kSqrtSoftplus;
    c.renormalize = true;
    c.routed_scaling_factor = 1.5f;
    return c;
}

TopKConfig TopKConfig::deepseek_v4_pro() {
    TopKConfig c = deepseek_v4_flash();
    c.routed_scaling_factor = 2.5f;
    return c;
}

TopKOutput::TopKOutput(Index num_tokens, int top_k, int num_fused_shared_experts)
    : topk_ids(num_tokens, top_k + num_fused_shared_experts),
      topk_weights(num_tokens, top_k + num_fused_shared_experts),
      recorder_topk_ids(num_tokens, top_k) {}

TopKOutputView TopKOutput::view() {
    return {MatrixMap<std::int32_t>(topk_ids.data(), topk_ids.rows(), topk_ids.cols()),
            MatrixMap<float>(topk_weights.data(), topk_weights.rows(), topk_weights.cols()),
            MatrixMap<std::int32_t>(recorder_topk_ids.data(), recorder_topk_ids.rows(),
                                    recorder_topk_ids.cols())};
}

namespace detail {

void check_output_shapes(const TopKOutputView& out, Index T, int K, int F) {
    MOELB_CHECK_ARG(out.topk_ids.rows() == T && out.topk_ids.cols() == K + F,
                    "topk_ids has shape [" << out.topk_ids.rows() << ", " << out.topk_ids.cols()
                                           << "] but [" << T << ", " << K + F << "] is needed");
    MOELB_CHECK_ARG(out.topk_weights.rows() == T && out.topk_weights.cols() == K + F,
                    "topk_weights has shape [" << out.topk_weights.rows() << ", "
                                               << out.topk_weights.cols() << "] but [" << T << ", "
                                               << K + F << "] is needed");
    MOELB_CHECK_ARG(out.recorder_topk_ids.rows() == T && out.recorder_topk_ids.cols() == K,
                    "recorder_topk_ids has shape [" << out.recorder_topk_ids.rows() << ", "
                                                    << out.recorder_topk_ids.cols() << "] but ["
                                                    << T << ", " << K << "] is needed");
}

void check_num_token_non_padded(std::optional<Index> n, Index T) {
    if (n) {
        MOELB_CHECK_ARG(*n >= 0 && *n <= T, "num_token_non_padded=" << *n << " is outside [0, " << T
                                                                    << "] (the token count)");
    }
}

void check_dispatcher(const LayerDispatcher* dispatcher, int E) {
    if (dispatcher) {
        MOELB_CHECK_ARG(dispatcher->location().num_logical_experts() == E,
                        "location has num_logical_experts="
                            << dispatcher->location().num_logical_experts()
                            << " but router_logits has " << E << " expert columns");
    }
}

}  // namespace detail

void select_experts(ConstMatrixMap<float> router_logits, const TopKConfig& config,
                    std::span<const float> correction_bias,
                    std::optional<Index> num_token_non_padded, const LayerDispatcher* dispatcher,
                    TopKOutputView out) {
    const Index T = router_logits.rows();
    const int E = static_cast<int>(router_logits.cols());
    config.validate_for(E);
    detail::check_output_shapes(out, T, config.top_k, config.num_fused_shared_experts);
    detail::check_num_token_non_padded(num_token_non_padded, T);
    detail::check_dispatcher(dispatcher, E);
    const float* bias = nullptr;
    if (!correction_bias.empty()) {
        MOELB_CHECK_ARG(static_cast<int>(correction_bias.size()) == E,
                        "correction_bias has " << correction_bias.size() << " entries but "
                                               << "router_logits has " << E << " expert columns");
        for (int e = 0; e < E; ++e) {
            MOELB_CHECK_ARG(
                std::isfinite(correction_bias[static_cast<std::size_t>(e)]),
                "correction_bias[" << e << "] = " << correction_bias[e] << " is not finite");
        }
        bias = correction_bias.data();
    }
    const detail::TopKEpilogue epilogue(config.top_k, config.num_fused_shared_experts,
                                        config.renormalize, config.routed_scaling_factor,
                                        config.apply_routed_scaling_factor_on_output, E,
                                        num_token_non_padded, dispatcher, out);
    const Index non_padded = num_token_non_padded.value_or(T);
    // The scores and top-k of each row run on the ISA path chosen now (moelb/cpu_isa.hpp).
    const isa::Kernels& kernels = isa::kernels();
    isa::RouteRowsArgs args;
    args.logits = router_logits.data();
    args.num_experts = E;
    args.top_k = config.top_k;
    args.scoring = detail::to_score_fn(config.scoring);
    args.num_groups = config.grouped() ? config.num_groups : 0;
    args.topk_group = config.grouped() ? config.topk_group : 0;
    args.group_max = config.group_score == GroupScore::kMax;
    args.bias = bias;
    const Index K = config.top_k;
    parallel_for(T, kRowsPerChunk, [&](Index begin, Index end) {
        const Index routed_end = std::clamp(non_padded, begin, end);
        std::vector<std::int32_t> ids(static_cast<std::size_t>((routed_end - begin) * K));
        std::vector<float> scores(ids.size());
        if (routed_end > begin)
            kernels.route_rows(args, begin, routed_end, ids.data(), scores.data());
        for (Index t = begin; t < end; ++t) {
            if (t >= routed_end) {
                epilogue.write(t, nullptr, nullptr);
            } else {
                epilogue.write(t, ids.data() + (t - begin) * K, scores.data() + (t - begin) * K);
            }
        }
    });
}

TopKOutput select_experts(ConstMatrixMap<float> router_logits, const TopKConfig& config,
                          std::span<const float> correction_bias,
                          std::optional<Index> num_token_non_padded,
                          const LayerDispatcher* dispatcher) {
    config.validate();
    TopKOutput out(router_logits.rows(), config.top_k, config.num_fused_shared_experts);
    select_experts(router_logits, config, correction_bias, num_token_non_padded, dispatcher,
                   out.view());
    return out;
}

void remap_topk_for_per_rank_shared_slots(ConstMatrixMap<std::int32_t> topk_ids,
                                          int num_physical_experts, int ep_size, int ep_rank,
                                          int num_fused_shared_experts,
                                          MatrixMap<std::int32_t> out) {
    const int P = num_physical_experts, W = ep_size, F = num_fused_shared_experts;
    MOELB_CHECK_ARG(W >= 1, "ep_size must be positive, got " << W);
    MOELB_CHECK_ARG(P >= 1 && P % W == 0, "num_physical_experts=" << P
                                                                  << " is not a positive multiple "
                                                                     "of ep_size="
                                                                  << W);
    MOELB_CHECK_ARG(ep_rank >= 0 && ep_rank < W,
                    "ep_rank=" << ep_rank << " is outside [0, ep_size=" << W << ")");
    MOELB_CHECK_ARG(F >= 1, "num_fused_shared_experts must be at least 1, got " << F);
    MOELB_CHECK_ARG(topk_ids.cols() > F, "topk_ids has " << topk_ids.cols()
                                                         << " columns; it needs the routed "
                                                            "columns and "
                                                         << F << " shared column(s)");
    MOELB_CHECK_ARG(out.rows() == topk_ids.rows() && out.cols() == topk_ids.cols(),
                    "out has shape [" << out.rows() << ", " << out.cols()
                                      << "] but topk_ids has shape [" << topk_ids.rows() << ", "
                                      << topk_ids.cols() << "]");
    const int S = P / W;
    const int K = static_cast<int>(topk_ids.cols()) - F;
    parallel_for(topk_ids.rows(), 4096, [&](Index begin, Index end) {
        for (Index t = begin; t < end; ++t) {
            bool any = false;
            for (int c = 0; c < K; ++c) {
                const std::int32_t p = topk_ids(t, c);
                MOELB_CHECK_ARG(p >= -1 && p < P, "topk_ids[" << t << ", " << c << "] = " << p
                                                              << " is outside [-1, "
                                                                 "num_physical_experts="
                                                              << P << ")");
                any = any || p >= 0;
                out(t, c) = p < 0 ? -1 : p + (p / S) * F;
            }
            for (int j = 0; j < F; ++j) out(t, K + j) = any ? ep_rank * (S + F) + S + j : -1;
        }
    });
}

}  // namespace moelb
