// parallel_for and the thread-count setting (parallel.hpp): every index is covered exactly once,
// chunk boundaries depend only on n and grain, exceptions of the lowest failing chunk propagate
// after all threads finished, and results do not depend on the thread count.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "moelb/errors.hpp"
#include "moelb/parallel.hpp"

namespace {

using moelb::get_num_threads;
using moelb::parallel_for;
using moelb::set_num_threads;

int hardware_default() {
    const unsigned hw = std::thread::hardware_concurrency();
    return hw == 0 ? 1 : static_cast<int>(hw);
}

// Every test leaves the process at the default thread count.
class ParallelTest : public ::testing::Test {
  protected:
    void TearDown() override { set_num_threads(0); }
};

// An exception that remembers which chunk threw it.
struct ChunkError : std::runtime_error {
    explicit ChunkError(std::int64_t begin)
        : std::runtime_error("chunk at " + std::to_string(begin)), begin(begin) {}
    std::int64_t begin;
};

// The chunks parallel_for hands out, sorted.
std::vector<std::pair<std::int64_t, std::int64_t>> chunks_of(std::int64_t n, std::int64_t grain,
                                                             int threads) {
    set_num_threads(threads);
    std::mutex mu;
    std::vector<std::pair<std::int64_t, std::int64_t>> chunks;
    parallel_for(n, grain, [&](std::int64_t begin, std::int64_t end) {
        std::lock_guard<std::mutex> lock(mu);
        chunks.emplace_back(begin, end);
    });
    std::sort(chunks.begin(), chunks.end());
    return chunks;
}

TEST_F(ParallelTest, SetAndGetNumThreads) {
    set_num_threads(3);
    EXPECT_EQ(get_num_threads(), 3);
    set_num_threads(1);
    EXPECT_EQ(get_num_threads(), 1);
    set_num_threads(17);
    EXPECT_EQ(get_num_threads(), 17);
}

TEST_F(ParallelTest, NonPositiveRestoresDefault) {
    EXPECT_EQ(get_num_threads(), hardware_default());
    set_num_threads(5);
    set_num_threads(0);
    EXPECT_EQ(get_num_threads(), hardware_default());
    set_num_threads(5);
    set_num_threads(-3);
    EXPECT_EQ(get_num_threads(), hardware_default());
    EXPECT_GE(get_num_threads(), 1);
}

TEST_F(ParallelTest, SetNumThreadsIsThreadSafe) {
    // Concurrent setters and getters: a getter only ever sees one of the values set (or the
    // default), never garbage.
    const int def = hardware_default();
    std::atomic<bool> bad{false};
    std::vector<std::thread> threads;
    for (int i = 0; i < 4; ++i) {
        threads.emplace_back([&, i] {
            for (int j = 0; j < 2000; ++j) {
                set_num_threads(i % 2 == 0 ? 2 + i : 0);
                const int n = get_num_threads();
                if (n != 2 && n != 4 && n != def) bad = true;
            }
        });
    }
    for (auto& t : threads) t.join();
    EXPECT_FALSE(bad.load());
}

TEST_F(ParallelTest, EmptyRangeNeverCallsBody) {
    set_num_threads(4);
    int calls = 0;
    parallel_for(0, 8, [&](std::int64_t, std::int64_t) { ++calls; });
    parallel_for(-5, 8, [&](std::int64_t, std::int64_t) { ++calls; });
    EXPECT_EQ(calls, 0);
}

TEST_F(ParallelTest, NonPositiveGrainIsAnInternalError) {
    set_num_threads(2);
    auto body = [](std::int64_t, std::int64_t) {};
    EXPECT_THROW(parallel_for(10, 0, body), moelb::Error);
    EXPECT_THROW(parallel_for(10, -4, body), moelb::Error);
}

struct CoverageCase {
    std::int64_t n;
    std::int64_t grain;
    int threads;
};

std::string coverage_name(const ::testing::TestParamInfo<CoverageCase>& info) {
    const auto& c = info.param;
    return "n" + std::to_string(c.n) + "_grain" + std::to_string(c.grain) + "_threads" +
           std::to_string(c.threads);
}

class ParallelCoverage : public ParallelTest, public ::testing::WithParamInterface<CoverageCase> {};

TEST_P(ParallelCoverage, EveryIndexExactlyOnce) {
    const auto [n, grain, threads] = GetParam();
    set_num_threads(threads);
    std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
    std::atomic<bool> out_of_range{false};
    parallel_for(n, grain, [&](std::int64_t begin, std::int64_t end) {
        if (begin < 0 || end > n || begin >= end) {
            out_of_range = true;
            return;
        }
        for (std::int64_t i = begin; i < end; ++i) hits[static_cast<std::size_t>(i)]++;
    });
    EXPECT_FALSE(out_of_range.load());
    std::int64_t wrong = 0;
    for (std::int64_t i = 0; i < n; ++i) {
        if (hits[static_cast<std::size_t>(i)].load() != 1) ++wrong;
    }
    EXPECT_EQ(wrong, 0) << "indices not visited exactly once";
}

TEST_P(ParallelCoverage, ChunksAreDisjointAndNoLargerThanGrain) {
    const auto [n, grain, threads] = GetParam();
    const auto chunks = chunks_of(n, grain, threads);
    std::int64_t expect_begin = 0;
    for (const auto& [begin, end] : chunks) {
        EXPECT_EQ(begin, expect_begin);
        EXPECT_EQ(begin % grain, 0);
        EXPECT_EQ(end, std::min(n, begin + grain));
        expect_begin = end;
    }
    EXPECT_EQ(expect_begin, n);
}

float f(float x) { return std::sin(x) * std::exp(-x * 1e-3f) + 1.0f / (x + 1.0f); }

TEST_P(ParallelCoverage, ResultsIdenticalToOneThread) {
    const auto [n, grain, threads] = GetParam();
    auto run = [&, n = n, grain = grain](int t) {
        set_num_threads(t);
        std::vector<float> out(static_cast<std::size_t>(n));
        parallel_for(n, grain, [&](std::int64_t begin, std::int64_t end) {
            for (std::int64_t i = begin; i < end; ++i) {
                const float x = static_cast<float>(i) * 0.37f;
                out[static_cast<std::size_t>(i)] = f(x);
            }
        });
        return out;
    };
    const std::vector<float> one = run(1);
    const std::vector<float> many = run(threads);
    ASSERT_EQ(one.size(), many.size());
    for (std::size_t i = 0; i < one.size(); ++i) {
        ASSERT_EQ(one[i], many[i]) << "index " << i;
    }
    // The values are what the body computes (not, e.g., left at zero).
    if (n > 3) {
        EXPECT_FLOAT_EQ(one[3], f(3 * 0.37f));
    }
}

INSTANTIATE_TEST_SUITE_P(Sizes, ParallelCoverage,
                         ::testing::Values(CoverageCase{1, 1, 4}, CoverageCase{1, 64, 2},
                                           CoverageCase{7, 3, 2}, CoverageCase{64, 64, 4},
                                           CoverageCase{65, 64, 4}, CoverageCase{1000, 1, 3},
                                           CoverageCase{1000, 7, 1}, CoverageCase{1000, 7, 8},
                                           CoverageCase{4096, 256, 2},
                                           CoverageCase{100003, 1024, 4}),
                         coverage_name);

TEST_F(ParallelTest, ChunkBoundariesDoNotDependOnThreadCount) {
    for (const auto& [n, grain] :
         std::vector<std::pair<std::int64_t, std::int64_t>>{{10, 3}, {1000, 7}, {4096, 256}}) {
        const auto reference = chunks_of(n, grain, 3);
        EXPECT_EQ(chunks_of(n, grain, 1), reference) << "n=" << n << " grain=" << grain;
        EXPECT_EQ(chunks_of(n, grain, 2), reference) << "n=" << n << " grain=" << grain;
        EXPECT_EQ(static_cast<std::int64_t>(reference.size()), (n + grain - 1) / grain);
    }
}

TEST_F(ParallelTest, UsesSeveralThreadsIncludingTheCaller) {
    // Two chunks, two threads: each chunk waits until both chunks have started, which is only
    // possible if they run concurrently. The caller must run one of them.
    set_num_threads(2);
    std::mutex mu;
    std::condition_variable cv;
    int arrived = 0;
    bool timed_out = false;
    std::set<std::thread::id> ids;
    parallel_for(2, 1, [&](std::int64_t, std::int64_t) {
        std::unique_lock<std::mutex> lock(mu);
        ids.insert(std::this_thread::get_id());
        ++arrived;
        cv.notify_all();
        if (!cv.wait_for(lock, std::chrono::seconds(20), [&] { return arrived == 2; })) {
            timed_out = true;
        }
    });
    EXPECT_FALSE(timed_out) << "the two chunks did not run concurrently";
    EXPECT_EQ(ids.size(), 2u);
    EXPECT_EQ(ids.count(std::this_thread::get_id()), 1u);
}

TEST_F(ParallelTest, WorkersAreKeptAcrossCalls) {
    // The same two threads (the caller and one worker) serve consecutive loops.
    set_num_threads(2);
    std::set<std::thread::id> all;
    for (int call = 0; call < 20; ++call) {
        std::mutex mu;
        std::condition_variable cv;
        int arrived = 0;
        parallel_for(2, 1, [&](std::int64_t, std::int64_t) {
            std::unique_lock<std::mutex> lock(mu);
            all.insert(std::this_thread::get_id());
            ++arrived;
            cv.notify_all();
            cv.wait_for(lock, std::chrono::seconds(20), [&] { return arrived == 2; });
        });
    }
    EXPECT_EQ(all.size(), 2u) << "a new thread per call";
}

TEST_F(ParallelTest, NestedLoopsRunOnTheirThreadAndCoverEverything) {
    set_num_threads(3);
    constexpr std::int64_t kOuter = 12, kInner = 50;
    std::vector<std::atomic<int>> hits(static_cast<std::size_t>(kOuter * kInner));
    std::atomic<bool> moved{false};
    parallel_for(kOuter, 1, [&](std::int64_t begin, std::int64_t end) {
        for (std::int64_t o = begin; o < end; ++o) {
            const auto self = std::this_thread::get_id();
            parallel_for(kInner, 7, [&](std::int64_t b, std::int64_t e) {
                if (std::this_thread::get_id() != self) moved = true;
                for (std::int64_t i = b; i < e; ++i) {
                    hits[static_cast<std::size_t>(o * kInner + i)]++;
                }
            });
        }
    });
    EXPECT_FALSE(moved.load()) << "a nested loop ran on another thread";
    for (std::size_t i = 0; i < hits.size(); ++i) ASSERT_EQ(hits[i].load(), 1) << "index " << i;
}

TEST_F(ParallelTest, ConcurrentCallersEachGetTheirWholeLoop) {
    // Several threads start loops at once: one gets the workers, the others run alone; every
    // loop covers its range exactly once with the same results.
    set_num_threads(2);
    constexpr int kCallers = 4;
    constexpr std::int64_t kN = 20000;
    std::vector<std::vector<float>> out(kCallers, std::vector<float>(kN));
    std::vector<std::thread> callers;
    for (int c = 0; c < kCallers; ++c) {
        callers.emplace_back([&, c] {
            for (int round = 0; round < 20; ++round) {
                parallel_for(kN, 97, [&](std::int64_t begin, std::int64_t end) {
                    for (std::int64_t i = begin; i < end; ++i) {
                        out[c][static_cast<std::size_t>(i)] += f(static_cast<float>(i) * 0.01f);
                    }
                });
            }
        });
    }
    for (auto& t : callers) t.join();
    for (int c = 0; c < kCallers; ++c) {
        for (std::int64_t i = 0; i < kN; i += 997) {
            float expect = 0;
            for (int round = 0; round < 20; ++round) expect += f(static_cast<float>(i) * 0.01f);
            ASSERT_EQ(out[c][static_cast<std::size_t>(i)], expect) << "caller " << c << " i " << i;
        }
    }
}

TEST_F(ParallelTest, AForkedChildStartsItsOwnWorkers) {
    // The parent's workers do not exist in a forked child: its loops must still run, not wait
    // for them forever.
    set_num_threads(2);
    std::atomic<int> warm{0};
    parallel_for(8, 1, [&](std::int64_t, std::int64_t) { ++warm; });  // start the workers
    ASSERT_EQ(warm.load(), 8);
    const pid_t child = fork();
    ASSERT_GE(child, 0) << "fork failed";
    if (child == 0) {
        std::mutex mu;
        std::int64_t sum = 0;
        parallel_for(1000, 10, [&](std::int64_t begin, std::int64_t end) {
            std::lock_guard<std::mutex> lock(mu);
            for (std::int64_t i = begin; i < end; ++i) sum += i;
        });
        _exit(sum == 999 * 1000 / 2 ? 0 : 1);
    }
    int status = 0;  // (a hang would show as a timeout of the test binary)
    ASSERT_EQ(waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFEXITED(status));
    EXPECT_EQ(WEXITSTATUS(status), 0) << "the child's loop gave a wrong sum";
}

class ParallelExceptions : public ParallelTest, public ::testing::WithParamInterface<int> {};

TEST_P(ParallelExceptions, SingleFailingChunkPropagates) {
    set_num_threads(GetParam());
    for (const std::int64_t failing : {0, 5, 9}) {
        try {
            parallel_for(100, 10, [&](std::int64_t begin, std::int64_t end) {
                if (begin <= failing * 10 && failing * 10 < end) throw ChunkError(failing * 10);
            });
            ADD_FAILURE() << "no exception for failing chunk " << failing;
        } catch (const ChunkError& e) {
            EXPECT_EQ(e.begin, failing * 10);
        }
    }
}

TEST_P(ParallelExceptions, LowestFailingChunkWins) {
    set_num_threads(GetParam());
    // Chunks 2 and 7 fail; chunk 7 fails at once, chunk 2 only after a delay, so the later
    // chunk's exception is usually recorded first. The lowest chunk's exception must surface.
    try {
        parallel_for(100, 10, [&](std::int64_t begin, std::int64_t end) {
            // Item-wise, so the body is right for any chunking.
            for (std::int64_t i = begin; i < end; ++i) {
                if (i == 20) {
                    std::this_thread::sleep_for(std::chrono::milliseconds(30));
                    throw ChunkError(20);
                }
                if (i == 70) throw ChunkError(70);
            }
        });
        FAIL() << "no exception";
    } catch (const ChunkError& e) {
        EXPECT_EQ(e.begin, 20);
    }
}

TEST_P(ParallelExceptions, RethrowsOnlyAfterAllBodiesFinished) {
    set_num_threads(GetParam());
    std::atomic<int> running{0};
    std::atomic<int> finished{0};
    try {
        parallel_for(8, 1, [&](std::int64_t begin, std::int64_t) {
            ++running;
            if (begin == 0) {
                --running;
                throw std::runtime_error("first chunk");
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
            --running;
            ++finished;
        });
        FAIL() << "no exception";
    } catch (const std::runtime_error& e) {
        EXPECT_EQ(std::string(e.what()), "first chunk");
        // No body may still be running (the bodies capture locals of this frame).
        EXPECT_EQ(running.load(), 0);
    }
}

TEST_P(ParallelExceptions, StandardExceptionTypesArePreserved) {
    set_num_threads(GetParam());
    auto throw_at = [](std::int64_t item, auto make) {
        return [item, make](std::int64_t begin, std::int64_t end) {
            if (begin <= item && item < end) throw make();
        };
    };
    EXPECT_THROW(parallel_for(50, 5, throw_at(25, [] { return moelb::InvalidArgument("row"); })),
                 moelb::InvalidArgument);
    EXPECT_THROW(parallel_for(50, 5, throw_at(45, [] { return std::out_of_range("row"); })),
                 std::out_of_range);
}

INSTANTIATE_TEST_SUITE_P(Threads, ParallelExceptions, ::testing::Values(1, 2, 4),
                         [](const ::testing::TestParamInfo<int>& info) {
                             return "threads" + std::to_string(info.param);
                         });

}  // namespace
