// Private: CPython's `random.Random` (Mersenne Twister MT19937 seeded as `random.Random(int)`
// seeds it), with the methods SGLang's static dispatch table draws from: `_randbelow`, `sample`
// and `shuffle`, exactly as CPython 3.10-3.13 implement them, so that the same seed gives the
// same numbers and the same permutations bit for bit (tests/python/test_dispatch.py checks this
// against Python's own `random`).
#pragma once

#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

namespace moelb::detail {

// CPython's draws over any source of MT19937 outputs `gen` (gen.genrand_uint32()): PyRandom's own
// generator, or a replay of its outputs from a cursor (the planner's SGLang table model).

inline int bit_length(std::uint32_t n) { return std::bit_width(n); }

// getrandbits(k) for 0 <= k <= 32.
template <class Gen>
std::uint32_t py_getrandbits(Gen& gen, int k) {
    return k == 0 ? 0 : gen.genrand_uint32() >> (32 - k);
}

// _randbelow_with_getrandbits(n), n >= 1.
template <class Gen>
std::uint32_t py_randbelow(Gen& gen, std::uint32_t n) {
    const int k = bit_length(n);
    std::uint32_t r = py_getrandbits(gen, k);
    while (r >= n) r = py_getrandbits(gen, k);
    return r;
}

// random.sample(population, k), 0 <= k <= len(population), into `result` (`pool`: scratch).
template <class Gen, class T>
void py_sample(Gen& gen, std::span<const T> population, std::size_t k, std::vector<T>& result,
               std::vector<T>& pool) {
    const std::size_t n = population.size();
    result.resize(k);
    std::size_t setsize = 21;  // a small set's size minus an empty list's
    if (k > 5) {
        setsize += static_cast<std::size_t>(
            std::pow(4.0, std::ceil(std::log(static_cast<double>(k * 3)) / std::log(4.0))));
    }
    if (n <= setsize) {
        pool.assign(population.begin(), population.end());
        for (std::size_t i = 0; i < k; ++i) {
            const std::size_t j = py_randbelow(gen, static_cast<std::uint32_t>(n - i));
            result[i] = pool[j];
            pool[j] = pool[n - i - 1];
        }
    } else {
        std::vector<bool> selected(n, false);
        for (std::size_t i = 0; i < k; ++i) {
            std::size_t j = py_randbelow(gen, static_cast<std::uint32_t>(n));
            while (selected[j]) j = py_randbelow(gen, static_cast<std::uint32_t>(n));
            selected[j] = true;
            result[i] = population[j];
        }
    }
}

// random.shuffle(x).
template <class Gen, class T>
void py_shuffle(Gen& gen, std::vector<T>& x) {
    for (std::size_t i = x.size(); i-- > 1;) {
        const std::size_t j = py_randbelow(gen, static_cast<std::uint32_t>(i + 1));
        std::swap(x[i], x[j]);
    }
}

class PyRandom {
  public:
    // random.Random(seed) for a non-negative integer seed (CPython's init_by_array over the
    // seed's 32-bit words, least significant first).
    explicit PyRandom(std::uint64_t seed) {
        std::array<std::uint32_t, 2> key{static_cast<std::uint32_t>(seed),
                                         static_cast<std::uint32_t>(seed >> 32)};
        init_by_array(std::span<const std::uint32_t>(key.data(), key[1] != 0 ? 2 : 1));
    }

    std::uint32_t genrand_uint32() {
        if (index_ >= kN) twist();
        std::uint32_t y = state_[static_cast<std::size_t>(index_++)];
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c5680U;
        y ^= (y << 15) & 0xefc60000U;
        return y ^ (y >> 18);
    }

    // getrandbits(k) for 0 <= k <= 32.
    std::uint32_t getrandbits(int k) { return py_getrandbits(*this, k); }

    // _randbelow_with_getrandbits(n), n >= 1.
    std::uint32_t randbelow(std::uint32_t n) { return py_randbelow(*this, n); }

    // random.sample(population, k), 0 <= k <= len(population).
    template <class T>
    std::vector<T> sample(std::span<const T> population, std::size_t k) {
        std::vector<T> result, pool;
        py_sample(*this, population, k, result, pool);
        return result;
    }

    // random.shuffle(x).
    template <class T>
    void shuffle(std::vector<T>& x) {
        py_shuffle(*this, x);
    }

  private:
    static constexpr int kN = 624;
    static constexpr int kM = 397;

    void init_genrand(std::uint32_t s) {
        state_[0] = s;
        for (int i = 1; i < kN; ++i) {
            const std::uint32_t prev = state_[static_cast<std::size_t>(i - 1)];
            state_[static_cast<std::size_t>(i)] =
                1812433253U * (prev ^ (prev >> 30)) + static_cast<std::uint32_t>(i);
        }
        index_ = kN;
    }

    void init_by_array(std::span<const std::uint32_t> key) {
        init_genrand(19650218U);
        std::size_t i = 1, j = 0;
        const std::size_t n = static_cast<std::size_t>(kN);
        for (std::size_t k = std::max(n, key.size()); k > 0; --k) {
            const std::uint32_t prev = state_[i - 1];
            state_[i] = (state_[i] ^ ((prev ^ (prev >> 30)) * 1664525U)) + key[j] +
                        static_cast<std::uint32_t>(j);
            ++i;
            ++j;
            if (i >= n) {
                state_[0] = state_[n - 1];
                i = 1;
            }
            if (j >= key.size()) j = 0;
        }
        for (std::size_t k = n - 1; k > 0; --k) {
            const std::uint32_t prev = state_[i - 1];
            state_[i] =
                (state_[i] ^ ((prev ^ (prev >> 30)) * 1566083941U)) - static_cast<std::uint32_t>(i);
            ++i;
            if (i >= n) {
                state_[0] = state_[n - 1];
                i = 1;
            }
        }
        state_[0] = 0x80000000U;
    }

    void twist() {
        constexpr std::uint32_t kUpper = 0x80000000U, kLower = 0x7fffffffU, kMatrix = 0x9908b0dfU;
        for (int i = 0; i < kN; ++i) {
            const std::uint32_t y = (state_[static_cast<std::size_t>(i)] & kUpper) |
                                    (state_[static_cast<std::size_t>((i + 1) % kN)] & kLower);
            state_[static_cast<std::size_t>(i)] = state_[static_cast<std::size_t>((i + kM) % kN)] ^
                                                  (y >> 1) ^ ((y & 1U) ? kMatrix : 0U);
        }
        index_ = 0;
    }

    std::array<std::uint32_t, kN> state_{};
    int index_ = kN;
};

}  // namespace moelb::detail
