// Deterministic parallel loops (DESIGN section 8; moelb/parallel.hpp): chunks independent of the
// thread count, the lowest failing chunk's exception rethrown.
#include "moelb/parallel.hpp"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include "moelb/errors.hpp"

namespace moelb {
namespace {

std::atomic<int> g_num_threads{0};

int default_num_threads() {
    const unsigned hw = std::thread::hardware_concurrency();
    return hw == 0 ? 1 : static_cast<int>(hw);
}

// One parallel_for call: its chunks are claimed in increasing order; which thread runs a chunk
// does not change its result. After a failure, chunks above the lowest failed one are skipped,
// while every chunk below it still runs, so the exception rethrown is always that of the lowest
// failing chunk.
struct Loop {
    std::int64_t n, grain, num_chunks;
    const std::function<void(std::int64_t, std::int64_t)>& body;
    std::atomic<std::int64_t> next{0};
    std::atomic<std::int64_t> first_failed;
    std::vector<std::exception_ptr> errors;

    Loop(std::int64_t n, std::int64_t grain,
         const std::function<void(std::int64_t, std::int64_t)>& body)
        : n(n),
          grain(grain),
          num_chunks((n + grain - 1) / grain),
          body(body),
          first_failed(num_chunks),
          errors(static_cast<std::size_t>(num_chunks)) {}

    void work() {
        for (;;) {
            const std::int64_t c = next.fetch_add(1);
            if (c >= num_chunks) return;
            if (c > first_failed.load()) continue;
            const std::int64_t begin = c * grain;
            const std::int64_t end = std::min(n, begin + grain);
            try {
                body(begin, end);
            } catch (...) {
                errors[static_cast<std::size_t>(c)] = std::current_exception();
                std::int64_t seen = first_failed.load();
                while (c < seen && !first_failed.compare_exchange_weak(seen, c)) {
                }
            }
        }
    }
};

// Set on pool workers and on a thread while it runs a parallel_for: a parallel_for started there
// (a nested loop) runs on that thread alone.
thread_local bool t_in_parallel_for = false;

// Spins for up to kSpin before blocking, so that loops in quick succession (rebalance runs two)
// find the threads awake: waking a blocked thread costs tens of microseconds.
constexpr auto kSpin = std::chrono::microseconds(100);
constexpr int kMaxWorkersPerCore = 2;

template <typename Ready>
bool spin_until(const Ready& ready, bool spin) {
    if (!spin) return ready();
    const auto until = std::chrono::steady_clock::now() + kSpin;
    for (int i = 1;; ++i) {
        if (ready()) return true;
        if (i % 64 == 0) {
            if (std::chrono::steady_clock::now() > until) return false;
            std::this_thread::yield();  // lets others run when threads outnumber cores
        }
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }
}

// Worker threads kept across calls (starting threads per call cost more than a small loop). One
// parallel_for at a time uses the pool; a concurrent caller runs its loop on its own thread, which
// gives the same result. The caller never waits for a worker that has not joined its loop yet
// (a sleeping worker can take long to wake on a busy machine): once the caller finds no chunk
// left, it closes the loop and waits only for the workers inside it, which finish the chunks they
// claimed. Workers are detached and the pool is never destroyed, so a process can exit (or a
// Python interpreter shut down) at any time; a forked child starts a new pool.
class Pool {
  public:
    // Runs loop on the calling thread and up to `helpers` workers (started as needed).
    void run(Loop& loop, int helpers) {
        {
            std::lock_guard<std::mutex> lock(mu_);
            // At most kMaxWorkersPerCore workers per core stay (a larger thread count runs its
            // loops on fewer threads: the same result).
            helpers = std::min(helpers, kMaxWorkersPerCore * default_num_threads());
            try {
                while (workers_started_ < helpers) {
                    std::thread([this, id = workers_started_] { worker(id); }).detach();
                    ++workers_started_;
                }
            } catch (const std::system_error&) {
                helpers = workers_started_;  // no more threads to be had: fewer helpers
            }
            loop_ = &loop;
            helpers_.store(helpers, std::memory_order_relaxed);
            // Spinning only pays while every thread has a core of its own.
            spin_.store(helpers < default_num_threads(), std::memory_order_relaxed);
            open_.store(true);
            generation_.fetch_add(1, std::memory_order_release);
        }
        wake_.notify_all();
        loop.work();
        // No chunk is left to claim: close the loop, then wait for the workers inside it. (A
        // worker joins by counting itself in `inside_`, then checking `open_`; the caller closes,
        // then checks `inside_`: sequentially consistent, so either the worker sees it closed or
        // the caller sees the worker.)
        open_.store(false);
        const auto done = [this] { return inside_.load() == 0; };
        if (!spin_until(done, spin_.load(std::memory_order_relaxed))) {
            std::unique_lock<std::mutex> lock(mu_);
            done_.wait(lock, done);
        }
    }

    std::mutex& caller_mutex() { return caller_mu_; }

  private:
    void worker(int id) {
        t_in_parallel_for = true;
        std::uint64_t seen = 0;
        for (;;) {
            const auto fresh = [&] { return generation_.load(std::memory_order_acquire) != seen; };
            if (!spin_until(fresh, spin_.load(std::memory_order_relaxed))) {
                std::unique_lock<std::mutex> lock(mu_);
                wake_.wait(lock, fresh);
            }
            seen = generation_.load(std::memory_order_acquire);
            if (id >= helpers_.load(std::memory_order_relaxed)) continue;  // not in this loop
            inside_.fetch_add(1);
            if (open_.load() && generation_.load() == seen) loop_->work();
            if (inside_.fetch_sub(1) == 1) {
                std::lock_guard<std::mutex> lock(mu_);
                done_.notify_one();
            }
        }
    }

    std::mutex caller_mu_;  // held by the one parallel_for using the pool
    std::mutex mu_;         // for blocking waits, and guards starting workers
    std::condition_variable wake_, done_;
    Loop* loop_ = nullptr;  // the current loop (written before generation_ moves on)
    std::atomic<std::uint64_t> generation_{0};
    std::atomic<int> helpers_{0};    // workers 0..helpers_-1 may join the current loop
    std::atomic<bool> open_{false};  // the current loop may still be joined
    std::atomic<int> inside_{0};     // workers inside a loop
    std::atomic<bool> spin_{true};   // whether waits spin before blocking
    int workers_started_ = 0;
};

std::mutex g_pool_mu;
Pool* g_pool = nullptr;  // never freed (see Pool)
pid_t g_pool_pid = 0;

Pool& pool() {
    std::lock_guard<std::mutex> lock(g_pool_mu);
    if (g_pool == nullptr || g_pool_pid != getpid()) {
        g_pool = new Pool;  // a forked child's old pool has no threads: leave it
        g_pool_pid = getpid();
    }
    return *g_pool;
}

}  // namespace

void set_num_threads(int n) { g_num_threads.store(n > 0 ? n : 0); }

int get_num_threads() {
    const int n = g_num_threads.load();
    return n > 0 ? n : default_num_threads();
}

void parallel_for(std::int64_t n, std::int64_t grain,
                  const std::function<void(std::int64_t, std::int64_t)>& body) {
    MOELB_CHECK(grain > 0, "parallel_for grain must be positive, got " << grain);
    if (n <= 0) return;
    Loop loop(n, grain, body);
    const int num_threads =
        static_cast<int>(std::min<std::int64_t>(get_num_threads(), loop.num_chunks));
    if (num_threads <= 1 || t_in_parallel_for) {
        loop.work();
    } else {
        Pool& p = pool();
        std::unique_lock<std::mutex> caller(p.caller_mutex(), std::try_to_lock);
        t_in_parallel_for = true;
        if (caller.owns_lock()) {
            p.run(loop, num_threads - 1);
        } else {
            loop.work();  // another thread's loop has the pool
        }
        t_in_parallel_for = false;
    }
    const std::int64_t failed = loop.first_failed.load();
    if (failed < loop.num_chunks) {
        std::rethrow_exception(loop.errors[static_cast<std::size_t>(failed)]);
    }
}

}  // namespace moelb
