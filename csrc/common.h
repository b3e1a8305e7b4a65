// Helpers shared by the kernel families (no pybind11 here: kernels see raw pointers only).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_features.h"

namespace fastattn {

// a·b over n elements, the summation vectorised by the compiler. FA_INLINE: each ISA-specific
// caller compiles it for its own target.
template <typename T>
FA_INLINE T dot(const T* a, const T* b, int64_t n) {
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
}

// A 64-byte aligned, uninitialised array, so that vector loads never split cache lines.
template <typename T>
class AlignedBuffer {
   public:
    AlignedBuffer() = default;
    explicit AlignedBuffer(size_t n) { resize(n); }
    void resize(size_t n) {
        if (n <= size_) return;
        const size_t bytes = ((n * sizeof(T) + 63) / 64) * 64;
        void* p = std::aligned_alloc(64, bytes);
        if (p == nullptr) throw std::bad_alloc();
        ptr_.reset(static_cast<T*>(p));
        size_ = n;
    }
    T* data() { return ptr_.get(); }
    const T* data() const { return ptr_.get(); }

   private:
    struct Free {
        void operator()(T* p) const { std::free(p); }
    };
    std::unique_ptr<T[], Free> ptr_;
    size_t size_ = 0;
};

// Scratch of type S kept between calls: fresh pages cost a fault each, and on a VM that costs
// more than a kernel's own pass over them (~1 ms per MB measured). One S per process (per
// type); a call that finds it taken by a concurrent call, or that is told not to use it
// (``pooled`` false, e.g. for a scratch too large to keep), gets a fresh one of its own.
template <typename S>
class ScratchLease {
   public:
    explicit ScratchLease(bool pooled = true)
        : pooled_(pooled && lock().try_lock()), s(pooled_ ? &pool() : new S()) {}
    ~ScratchLease() {
        if (pooled_) lock().unlock();
        else delete s;
    }
    ScratchLease(const ScratchLease&) = delete;
    ScratchLease& operator=(const ScratchLease&) = delete;

   private:
    static S& pool() {
        static S p;
        return p;
    }
    static std::mutex& lock() {
        static std::mutex m;
        return m;
    }
    const bool pooled_;

   public:
    S* const s;
};

// Queries grouped by the history they read: order[start[u] .. start[u+1]) are the queries of
// history u, in increasing query order (a stable counting sort), so that work per history
// (and summation order in scatter-add) does not depend on the thread count.
struct HistoryGroups {
    std::vector<int64_t> start;  // (U + 1,)
    std::vector<int64_t> order;  // (B,)
};

inline HistoryGroups group_by_history(const int64_t* hist, int64_t B, int64_t U) {
    HistoryGroups g;
    g.start.assign(U + 1, 0);
    g.order.resize(B);
    for (int64_t b = 0; b < B; ++b) ++g.start[hist[b] + 1];
    for (int64_t u = 0; u < U; ++u) g.start[u + 1] += g.start[u];
    std::vector<int64_t> next(g.start.begin(), g.start.end() - 1);
    for (int64_t b = 0; b < B; ++b) g.order[next[hist[b]]++] = b;
    return g;
}

// Index arrays come from Python: an out-of-range value must raise, not corrupt memory.
inline void check_range(const int64_t* a, int64_t n, int64_t lo, int64_t hi, const char* fn,
                        const char* name) {
    for (int64_t i = 0; i < n; ++i) {
        if (a[i] < lo || a[i] >= hi) {
            throw std::out_of_range(std::string(fn) + ": " + name + "[" + std::to_string(i) +
                                    "] = " + std::to_string(a[i]) + " is outside [" +
                                    std::to_string(lo) + ", " + std::to_string(hi) + ")");
        }
    }
}

// Prefetches the n elements of row[0, n), one request per 64-byte line.
template <typename T>
FA_INLINE void prefetch_row(const T* row, int64_t n) {
    const char* p = reinterpret_cast<const char*>(row);
    for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64)
        __builtin_prefetch(p + off);
}

}  // namespace fastattn
