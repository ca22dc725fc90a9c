// The step-time model's dispatch copies (step_time.hpp): a hand-traced dispatch in both DeepEP
// modes, a table of topologies against a reference that walks every (token, GPU) and (token,
// node) pair, conservation, and input errors.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "moelb/errors.hpp"
#include "moelb/parallel.hpp"
#include "moelb/step_time.hpp"
#include "test_util.hpp"

namespace {

using namespace moelb::test_util;

using moelb::DeepEPMode;
using moelb::Index;
using moelb::RowMatrix;

RowMatrix<std::int64_t> copies(const RowMatrix<std::int32_t>& physical,
                               const std::vector<std::int32_t>& source, int P, int W, int N,
                               DeepEPMode mode) {
    RowMatrix<std::int64_t> out(4, W);
    moelb::token_copies(cmap(physical), source, P, W, N, mode, mmap(out));
    return out;
}

std::vector<std::int64_t> row(const RowMatrix<std::int64_t>& m, int r) {
    return std::vector<std::int64_t>(m.row(r).begin(), m.row(r).end());
}

// W = 4 GPUs on 2 nodes, P = 8 (slot p on GPU p / 2). t0 from GPU 0 to GPUs 1, 1, 2; t1 from 1 to
// 3, 3, 0, 0; t2 from 3 to 2, 3 (itself), 0; t3 from 2 to 0, 1.
const RowMatrix<std::int32_t> kPhysical =
    matrix<std::int32_t>({{2, 3, 4, -1}, {6, 7, 0, 1}, {4, 6, 1, -1}, {0, 2, -1, -1}});
const std::vector<std::int32_t> kSource = {0, 1, 3, 2};

TEST(TokenCopies, NormalModeByHand) {
    // NVLink: t0 0->1; t1 1->0; t2 3->2, and 1->0 forwarded (t2 reaches node 0 at GPU 1, its
    // local index); t3 0->1 forwarded (t3 reaches node 0 at GPU 0). Network: t0 0->2, t1 1->3,
    // t2 3->1, t3 2->0 (one copy for both of node 0's GPUs).
    const auto c = copies(kPhysical, kSource, 8, 4, 2, DeepEPMode::kNormal);
    EXPECT_EQ(row(c, moelb::kNvlinkSent), (std::vector<std::int64_t>{2, 2, 0, 1}));
    EXPECT_EQ(row(c, moelb::kNvlinkReceived), (std::vector<std::int64_t>{2, 2, 1, 0}));
    EXPECT_EQ(row(c, moelb::kNetworkSent), (std::vector<std::int64_t>{1, 1, 1, 1}));
    EXPECT_EQ(row(c, moelb::kNetworkReceived), (std::vector<std::int64_t>{1, 1, 1, 1}));
}

TEST(TokenCopies, LowLatencyModeByHand) {
    // One copy per remote (token, column): NVLink t0 0->1 x2, t1 1->0 x2, t2 3->2; network t0
    // 0->2, t1 1->3 x2, t2 3->0, t3 2->0 and 2->1.
    const auto c = copies(kPhysical, kSource, 8, 4, 2, DeepEPMode::kLowLatency);
    EXPECT_EQ(row(c, moelb::kNvlinkSent), (std::vector<std::int64_t>{2, 2, 0, 1}));
    EXPECT_EQ(row(c, moelb::kNvlinkReceived), (std::vector<std::int64_t>{2, 2, 1, 0}));
    EXPECT_EQ(row(c, moelb::kNetworkSent), (std::vector<std::int64_t>{1, 2, 2, 1}));
    EXPECT_EQ(row(c, moelb::kNetworkReceived), (std::vector<std::int64_t>{2, 1, 1, 2}));
}

// The reference: per token, the set of destination GPUs, then every GPU and node in turn.
RowMatrix<std::int64_t> reference(const RowMatrix<std::int32_t>& physical,
                                  const std::vector<std::int32_t>& source, int P, int W, int N,
                                  DeepEPMode mode) {
    const int S = P / W, G = W / N;
    RowMatrix<std::int64_t> out = RowMatrix<std::int64_t>::Zero(4, W);
    auto add = [&](int link, int from, int to) {
        ++out(link, from);
        ++out(link + 1, to);
    };
    for (Index t = 0; t < physical.rows(); ++t) {
        const int s = source[static_cast<std::size_t>(t)];
        std::vector<int> hits(static_cast<std::size_t>(W), 0);
        for (Index c = 0; c < physical.cols(); ++c) {
            if (physical(t, c) >= 0) ++hits[static_cast<std::size_t>(physical(t, c) / S)];
        }
        for (int g = 0; g < W; ++g) {
            const int k = hits[static_cast<std::size_t>(g)];
            if (g == s || k == 0) continue;
            const int link = g / G == s / G ? moelb::kNvlinkSent : moelb::kNetworkSent;
            const int times = mode == DeepEPMode::kNormal ? 1 : k;
            for (int i = 0; i < times; ++i) {
                if (mode == DeepEPMode::kLowLatency || link == moelb::kNvlinkSent) {
                    add(link, s, g);
                }
            }
        }
        if (mode == DeepEPMode::kLowLatency) continue;
        for (int node = 0; node < N; ++node) {
            if (node == s / G) continue;
            const int relay = node * G + s % G;
            bool any = false;
            for (int g = node * G; g < (node + 1) * G; ++g) {
                if (hits[static_cast<std::size_t>(g)] == 0) continue;
                any = true;
                if (g != relay) add(moelb::kNvlinkSent, relay, g);
            }
            if (any) add(moelb::kNetworkSent, s, relay);
        }
    }
    return out;
}

struct Topology {
    int W, N, S, C, T;
};

class TokenCopiesTopologies : public ::testing::TestWithParam<Topology> {};

TEST_P(TokenCopiesTopologies, MatchesTheReferenceAndConservesCopies) {
    const auto [W, N, S, C, T] = GetParam();
    const int P = W * S;
    for (std::uint32_t seed = 0; seed < 5; ++seed) {
        Rng rng(seed * 7919u + static_cast<std::uint32_t>(W * 31 + N));
        RowMatrix<std::int32_t> physical(T, C);
        std::vector<std::int32_t> source(static_cast<std::size_t>(T));
        for (int t = 0; t < T; ++t) {
            source[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(rng.below(W));
            for (int c = 0; c < C; ++c) {
                physical(t, c) = static_cast<std::int32_t>(rng.below(P + 1)) - 1;
            }
        }
        std::vector<std::int64_t> expected_slots(static_cast<std::size_t>(P), 0);
        for (Index i = 0; i < physical.size(); ++i) {
            if (physical.data()[i] >= 0)
                ++expected_slots[static_cast<std::size_t>(physical.data()[i])];
        }
        for (const auto mode : {DeepEPMode::kNormal, DeepEPMode::kLowLatency}) {
            RowMatrix<std::int64_t> got(4, W);
            std::vector<std::int64_t> slots(static_cast<std::size_t>(P), -7);
            moelb::token_copies(cmap(physical), source, P, W, N, mode, mmap(got), slots);
            EXPECT_EQ(got, reference(physical, source, P, W, N, mode)) << "seed " << seed;
            EXPECT_EQ(slots, expected_slots);
            EXPECT_EQ(got.row(moelb::kNvlinkSent).sum(), got.row(moelb::kNvlinkReceived).sum());
            EXPECT_EQ(got.row(moelb::kNetworkSent).sum(), got.row(moelb::kNetworkReceived).sum());
            if (N == 1) EXPECT_EQ(got.row(moelb::kNetworkSent).sum(), 0);
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Table, TokenCopiesTopologies,
                         ::testing::Values(Topology{1, 1, 4, 3, 20}, Topology{4, 1, 2, 4, 50},
                                           Topology{4, 2, 2, 4, 50}, Topology{8, 4, 3, 8, 200},
                                           Topology{8, 8, 1, 6, 100}, Topology{32, 4, 9, 8, 500},
                                           Topology{16, 2, 4, 9, 300}),
                         [](const auto& info) {
                             const Topology& p = info.param;
                             return "W" + std::to_string(p.W) + "_N" + std::to_string(p.N) + "_S" +
                                    std::to_string(p.S) + "_C" + std::to_string(p.C);
                         });

TEST(TokenCopies, SameForAnyThreadCount) {
    // 40,000 tokens: five parallel chunks.
    const int W = 16, N = 4, P = 16 * 5, T = 40000;
    Rng rng(11);
    RowMatrix<std::int32_t> physical(T, 8);
    std::vector<std::int32_t> source(static_cast<std::size_t>(T));
    for (int t = 0; t < T; ++t) {
        source[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(t * W / T);
        for (int c = 0; c < 8; ++c) physical(t, c) = static_cast<std::int32_t>(rng.below(P));
    }
    std::vector<RowMatrix<std::int64_t>> results;
    for (const int threads : {1, 3, 8}) {
        moelb::set_num_threads(threads);
        results.push_back(copies(physical, source, P, W, N, DeepEPMode::kNormal));
    }
    moelb::set_num_threads(0);
    EXPECT_EQ(results[0], results[1]);
    EXPECT_EQ(results[0], results[2]);
    EXPECT_EQ(results[0], reference(physical, source, P, W, N, DeepEPMode::kNormal));
    // The first bad row is named, whichever chunk meets it first.
    physical(35000, 3) = P;
    physical(30000, 1) = -2;
    moelb::set_num_threads(8);
    RowMatrix<std::int64_t> out(4, W);
    expect_invalid_argument(
        [&] {
            moelb::token_copies(cmap(physical), source, P, W, N, DeepEPMode::kNormal, mmap(out));
        },
        "physical[30000, 1]=-2 is not a slot");
    moelb::set_num_threads(0);
}

TEST(TokenCopies, Errors) {
    RowMatrix<std::int64_t> out(4, 4);
    expect_invalid_argument(
        [&] {
            moelb::token_copies(cmap(kPhysical), kSource, 8, 4, 3, DeepEPMode::kNormal, mmap(out));
        },
        "ep_size=4 must be a positive multiple of num_nodes=3");
    expect_invalid_argument(
        [&] {
            moelb::token_copies(cmap(kPhysical), kSource, 6, 4, 2, DeepEPMode::kNormal, mmap(out));
        },
        "num_physical_experts=6 is not a positive multiple of ep_size=4");
    const std::vector<std::int32_t> short_source = {0, 1};
    expect_invalid_argument(
        [&] {
            moelb::token_copies(cmap(kPhysical), short_source, 8, 4, 2, DeepEPMode::kNormal,
                                mmap(out));
        },
        "source_rank has 2 entries for 4 rows");
    const std::vector<std::int32_t> bad_source = {0, 1, 4, 2};
    expect_invalid_argument(
        [&] {
            moelb::token_copies(cmap(kPhysical), bad_source, 8, 4, 2, DeepEPMode::kLowLatency,
                                mmap(out));
        },
        "source_rank[2]=4 is not a rank in [0, 4)");
    auto bad = kPhysical;
    bad(1, 2) = 8;
    expect_invalid_argument(
        [&] { moelb::token_copies(cmap(bad), kSource, 8, 4, 2, DeepEPMode::kNormal, mmap(out)); },
        "physical[1, 2]=8 is not a slot in [-1, 8)");
    RowMatrix<std::int64_t> small(4, 3);
    expect_invalid_argument(
        [&] {
            moelb::token_copies(cmap(kPhysical), kSource, 8, 4, 2, DeepEPMode::kNormal,
                                mmap(small));
        },
        "out must be [4, 4]");
    std::vector<std::int64_t> slots(7);
    expect_invalid_argument(
        [&] {
            moelb::token_copies(cmap(kPhysical), kSource, 8, 4, 2, DeepEPMode::kNormal, mmap(out),
                                slots);
        },
        "slot_tokens has 7 entries, expected 8");
}

}  // namespace
