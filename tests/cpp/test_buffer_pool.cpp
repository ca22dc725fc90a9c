// The buffer pool (buffer_pool.hpp): released large blocks come back for requests of a similar
// size, the pool stays within its bounds, small blocks bypass it, blocks are 64-byte aligned,
// concurrent users never share a block, and what is built in a reused block (a placement's
// logical_to_physical) carries nothing over from its previous user.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "moelb/buffer_pool.hpp"
#include "moelb/expert_location.hpp"

namespace {

using moelb::kPooledMaxBlocks;
using moelb::kPooledMaxBytes;
using moelb::kPooledMinBytes;
using moelb::pooled_blocks;
using moelb::pooled_bytes;
using moelb::detail::pool_acquire;
using moelb::detail::pool_release;

bool aligned64(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 64 == 0; }

TEST(BufferPool, AReleasedBlockServesTheNextRequestOfItsSize) {
    const std::size_t bytes = (std::size_t{3} << 20) + 4'100;  // a size no other test uses
    void* first = pool_acquire(bytes);
    ASSERT_TRUE(aligned64(first));
    std::memset(first, 0x5a, bytes);  // the whole block is usable
    pool_release(first, bytes);
    void* again = pool_acquire(bytes);
    EXPECT_EQ(again, first);
    pool_release(again, bytes);
    // A request of at least half the block reuses it too; a smaller one does not.
    void* smaller = pool_acquire(bytes / 2 + 1);
    EXPECT_EQ(smaller, first);
    pool_release(smaller, bytes / 2 + 1);
    void* much_smaller = pool_acquire(bytes / 2 - 4'096);
    EXPECT_NE(much_smaller, first);
    pool_release(much_smaller, bytes / 2 - 4'096);
}

TEST(BufferPool, KeepsAtMostItsBoundedBlocksAndBytes) {
    std::vector<std::pair<void*, std::size_t>> blocks;
    for (std::size_t i = 0; i < kPooledMaxBlocks + 3; ++i) {
        const std::size_t bytes = kPooledMinBytes * (3 + 2 * i) + 64 * i;
        blocks.emplace_back(pool_acquire(bytes), bytes);
    }
    for (auto [p, bytes] : blocks) pool_release(p, bytes);
    EXPECT_LE(pooled_blocks(), kPooledMaxBlocks);
    EXPECT_LE(pooled_bytes(), kPooledMaxBytes);
    EXPECT_GT(pooled_blocks(), 0u);
    // A block larger than the whole pool is freed, not kept.
    const std::size_t before = pooled_bytes();
    const std::size_t huge = kPooledMaxBytes + 4'096;
    void* big = pool_acquire(huge);
    pool_release(big, huge);
    EXPECT_LE(pooled_bytes(), before);
    EXPECT_LE(pooled_bytes(), kPooledMaxBytes);
}

TEST(BufferPool, SmallBlocksBypassThePool) {
    const std::size_t blocks = pooled_blocks(), bytes = pooled_bytes();
    for (std::size_t size : {std::size_t{1}, std::size_t{100}, kPooledMinBytes - 1}) {
        void* p = pool_acquire(size);
        EXPECT_TRUE(aligned64(p)) << size;
        std::memset(p, 1, size);
        pool_release(p, size);
    }
    EXPECT_EQ(pooled_blocks(), blocks);
    EXPECT_EQ(pooled_bytes(), bytes);
}

TEST(BufferPool, ConcurrentUsersNeverShareABlock) {
    // Each thread stamps its blocks with its own id and checks the stamp before releasing: a block
    // handed to two threads at once would show the other's id.
    constexpr int kThreads = 4, kRounds = 300;
    std::vector<int> failures(kThreads, 0);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
        threads.emplace_back([t, &failures] {
            std::mt19937 rng(static_cast<unsigned>(t));
            std::uniform_int_distribution<std::size_t> size(kPooledMinBytes, 4 * kPooledMinBytes);
            for (int r = 0; r < kRounds; ++r) {
                const std::size_t bytes = size(rng) / 4 * 4;
                auto* words = static_cast<std::int32_t*>(pool_acquire(bytes));
                const std::size_t n = bytes / 4;
                for (std::size_t i = 0; i < n; i += 97) words[i] = t;
                std::this_thread::yield();
                for (std::size_t i = 0; i < n; i += 97) failures[t] += words[i] != t;
                pool_release(words, bytes);
            }
        });
    }
    for (auto& th : threads) th.join();
    for (int t = 0; t < kThreads; ++t) EXPECT_EQ(failures[t], 0) << "thread " << t;
    EXPECT_LE(pooled_blocks(), kPooledMaxBlocks);
}

TEST(BufferPool, PooledVectorCopiesAreDeepAndIndependent) {
    moelb::PooledVector<std::int32_t> a(kPooledMinBytes / 4 * 3, 7);
    moelb::PooledVector<std::int32_t> b = a;
    ASSERT_EQ(a, b);
    EXPECT_NE(a.data(), b.data());
    b[5] = 8;
    EXPECT_EQ(a[5], 7);
    moelb::PooledVector<std::int32_t> c = std::move(b);
    EXPECT_EQ(c[5], 8);
}

// A placement built in a block another placement used (more replicas per expert, so its rows were
// filled further) is padded with -1 exactly where it has no replica.
TEST(BufferPool, ARebuiltPlacementCarriesNothingOver) {
    constexpr int L = 40, E = 256, W = 8;
    const auto build = [&](int P, int hot_replicas) {
        moelb::RowMatrix<std::int32_t> map(L, P);
        for (int l = 0; l < L; ++l) {
            int p = 0;
            for (int e = 0; e < E; ++e) map(l, p++) = e;
            while (p < P) map(l, p++) = (l + (p - E) / hot_replicas) % E;
        }
        return moelb::ExpertLocation(std::move(map), E, W);
    };
    std::vector<std::int32_t> first_rows;
    {
        const auto wide = build(E + 64, 32);  // X = 33: a block of L * E * 33 int32
        ASSERT_GE(static_cast<std::size_t>(wide.logical_to_physical().size()) * 4, kPooledMinBytes);
        first_rows.assign(wide.logical_to_physical().data(),
                          wide.logical_to_physical().data() + wide.logical_to_physical().size());
    }
    const auto narrow = build(E + 64, 24);  // X = 25: fits the block just released
    const auto table = narrow.logical_to_physical();
    ASSERT_EQ(table.cols(), narrow.max_replicas());
    for (int l = 0; l < L; ++l) {
        for (int e = 0; e < E; ++e) {
            std::vector<std::int32_t> expected;
            for (int p = 0; p < E + 64; ++p) {
                if (narrow.physical_to_logical()(l, p) == e) expected.push_back(p);
            }
            expected.resize(static_cast<std::size_t>(narrow.max_replicas()), -1);
            for (int x = 0; x < narrow.max_replicas(); ++x) {
                ASSERT_EQ(table(static_cast<moelb::Index>(l) * E + e, x), expected[x])
                    << "layer " << l << " expert " << e << " column " << x;
            }
        }
    }
}

}  // namespace
