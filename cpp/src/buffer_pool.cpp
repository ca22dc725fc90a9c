// Recycled memory for large, repeatedly built arrays (DESIGN section 8, scale;
// moelb/buffer_pool.hpp): a small process-wide pool of freed blocks.
#include "moelb/buffer_pool.hpp"

#include <algorithm>
#include <mutex>
#include <new>

namespace moelb {
namespace {

constexpr std::align_val_t kAlignment{64};

// Each block starts with a header holding its capacity (what a reuse may hold), then the data.
constexpr std::size_t kHeader = 64;

struct Block {
    void* data;
    std::size_t capacity;
};

struct Pool {
    Pool() { kept.reserve(kPooledMaxBlocks + 1); }  // so that a release never allocates
    std::mutex mutex;
    std::vector<Block> kept;  // most recently released last
    std::size_t bytes = 0;
};

// Never destroyed: arrays in static objects may be released after other statics are gone.
Pool& pool() {
    static Pool* const instance = new Pool;
    return *instance;
}

void* allocate_block(std::size_t capacity) {
    auto* base = static_cast<unsigned char*>(::operator new(kHeader + capacity, kAlignment));
    *reinterpret_cast<std::size_t*>(base) = capacity;
    return base + kHeader;
}

void free_block(void* data) noexcept {
    ::operator delete(static_cast<unsigned char*>(data) - kHeader, kAlignment);
}

std::size_t capacity_of(void* data) {
    return *reinterpret_cast<const std::size_t*>(static_cast<unsigned char*>(data) - kHeader);
}

}  // namespace

namespace detail {

void* pool_acquire(std::size_t bytes) {
    if (bytes < kPooledMinBytes) return ::operator new(std::max<std::size_t>(bytes, 1), kAlignment);
    {
        Pool& p = pool();
        std::lock_guard<std::mutex> lock(p.mutex);
        // The smallest kept block that holds `bytes` without wasting more than half of itself;
        // among equals the most recently released (its pages are likeliest in cache).
        auto best = p.kept.end();
        for (auto it = p.kept.begin(); it != p.kept.end(); ++it) {
            if (it->capacity >= bytes && it->capacity / 2 <= bytes &&
                (best == p.kept.end() || it->capacity <= best->capacity)) {
                best = it;
            }
        }
        if (best != p.kept.end()) {
            void* data = best->data;
            p.bytes -= best->capacity;
            p.kept.erase(best);
            return data;
        }
    }
    return allocate_block(bytes);
}

void pool_release(void* block, std::size_t bytes) noexcept {
    if (block == nullptr) return;
    if (bytes < kPooledMinBytes) {
        ::operator delete(block, kAlignment);
        return;
    }
    const std::size_t capacity = capacity_of(block);
    if (capacity > kPooledMaxBytes) {
        free_block(block);
        return;
    }
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    p.kept.push_back({block, capacity});
    p.bytes += capacity;
    // Over a bound: free the least recently released blocks.
    while (p.kept.size() > kPooledMaxBlocks || p.bytes > kPooledMaxBytes) {
        p.bytes -= p.kept.front().capacity;
        free_block(p.kept.front().data);
        p.kept.erase(p.kept.begin());
    }
}

}  // namespace detail

std::size_t pooled_bytes() {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    return p.bytes;
}

std::size_t pooled_blocks() {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    return p.kept.size();
}

}  // namespace moelb
