// Recycled memory for large arrays that are built again and again (a plan's logical_to_physical):
// a freed block is kept in a small process-wide pool and handed to the next request of a similar
// size, so its pages stay mapped. A fresh block of a few hundred KiB costs one page fault per 4 KiB
// page on first touch (the kernel zeroes every page; ~2 us each on a virtual machine), which can
// exceed the time spent computing what is stored in it.
//
// Blocks of at least kPooledMinBytes go through the pool; smaller ones are plain allocations. The
// pool keeps at most kPooledMaxBlocks blocks and kPooledMaxBytes bytes (beyond that, a released
// block is freed), and reuses a kept block only for a request of at least half its size.
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

namespace moelb {

inline constexpr std::size_t kPooledMinBytes = std::size_t{64} << 10;
inline constexpr std::size_t kPooledMaxBlocks = 8;
inline constexpr std::size_t kPooledMaxBytes = std::size_t{64} << 20;

namespace detail {
// At least `bytes` bytes, 64-byte aligned: a kept block when one fits, else a new one. Throws
// std::bad_alloc when memory runs out.
void* pool_acquire(std::size_t bytes);
// Returns a block from pool_acquire (its `bytes` as requested) to the pool, or frees it.
void pool_release(void* block, std::size_t bytes) noexcept;
}  // namespace detail

// The bytes and blocks the pool keeps now (for tests and diagnostics).
std::size_t pooled_bytes();
std::size_t pooled_blocks();

// A std::allocator-like allocator drawing large arrays from the pool.
template <class T>
struct PooledAllocator {
    using value_type = T;
    PooledAllocator() noexcept = default;
    template <class U>
    PooledAllocator(const PooledAllocator<U>&) noexcept {}
    T* allocate(std::size_t n) { return static_cast<T*>(detail::pool_acquire(n * sizeof(T))); }
    void deallocate(T* p, std::size_t n) noexcept { detail::pool_release(p, n * sizeof(T)); }
    // Default-initialises, so resize(n) leaves trivial elements unwritten: the owner writes every
    // element itself (in parallel, say), sparing a serial pass over a large block.
    template <class U>
    void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
        ::new (static_cast<void*>(p)) U;
    }
    template <class U, class... Args>
    void construct(U* p, Args&&... args) {
        ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
    }
    template <class U>
    bool operator==(const PooledAllocator<U>&) const noexcept {
        return true;
    }
};

template <class T>
using PooledVector = std::vector<T, PooledAllocator<T>>;

}  // namespace moelb
