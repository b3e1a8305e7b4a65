// Hamming distance and fused Hamming top-k over packed SimHash signatures.
//
// hamming_topk never materialises the B x L distance matrix. Each query streams its
// history once through a TopkSelector: a candidate buffer that admits a key only if its
// distance beats the current threshold, and that is periodically cut back to the k best.
// Distances are small integers (<= 64 W), so cutting and the final ordering are counting
// sorts; keys enter the buffer in position order and every step is stable, which gives the
// (distance, position) order of the spec, ties included, with no comparison sort.
//
// The AVX-512 path computes the distances of 8 keys at once as W x (XOR, VPOPCNTQ, ADD) on
// vectors that hold one word of each of the 8 keys, so no horizontal reduction is needed.
// A history read by many queries (the serving layout) is first re-laid out by all threads
// together as such blocks ("tile": word w of keys 8j..8j+7 is one 512-bit vector), and then
// its queries are split between threads. A history read by few queries (the training
// layout) goes whole to one thread, which gathers the words from the row-major keys.
// Up to 4 queries share each loaded key vector.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common.h"
#include "cpu_features.h"
#include "kernels.h"

namespace fastattn {
namespace {

constexpr int kBlockKeys = 8;    // keys per tile block: the uint64 lanes of one zmm
constexpr int kMaxQueries = 4;   // queries sharing one pass over the keys
constexpr int kMaxStaticW = 5;   // W = 1..5 get fully unrolled kernels; larger W loops

// Candidates are packed as (distance << 32) | position, so that the AVX-512 scan appends
// a whole vector of them with one compress + store.
class TopkSelector {
   public:
    TopkSelector(int64_t k, int64_t L, int64_t W) : k_(k), bins_(64 * W + 1), count_(bins_) {
        // Slack between cuts: larger means fewer cuts, smaller a tighter threshold sooner.
        // When the buffer could never fill (k + slack > L) it is sized for all of L instead.
        const int64_t slack = 2 * std::max<int64_t>(k, 64);
        cap_ = k + slack <= L ? k + slack : L + 1;
        // + one block: a vector append stores 8 entries at size() < capacity.
        buf_.resize(static_cast<size_t>(std::min(cap_, L) + kBlockKeys));
    }

    void reset() {
        n_ = 0;
        threshold_ = static_cast<uint64_t>(bins_);  // 64 W + 1: admits every distance
    }

    // Keys with distance >= threshold() can no longer enter the top k (see cut()).
    uint64_t threshold() const { return threshold_; }

    // Raw append interface for vector scans: write entries at end(), then grow(); call
    // cut() as soon as full().
    uint64_t* end() { return buf_.data() + n_; }
    void grow(int64_t m) { n_ += m; }
    bool full() const { return n_ >= cap_; }

    // Keys must arrive in increasing position order.
    FA_INLINE void push(uint64_t d, int64_t p) {
        if (d < threshold_) {
            buf_.data()[n_] = (d << 32) | static_cast<uint64_t>(p);
            if (++n_ == cap_) cut();
        }
    }

    // Keeps the k best entries (still in position order) and lowers the threshold to the
    // k-th distance t: the k kept entries all have distance <= t and earlier positions than
    // any later key, so a later key needs distance < t to displace one of them.
    void cut() {
        int64_t below = 0;
        const uint64_t t = kth_distance(k_, &below);
        int64_t ties = k_ - below;
        uint64_t* const e = buf_.data();
        const int64_t n = n_;
        int64_t m = 0;
        for (int64_t i = 0; i < n; ++i) {  // branch-free stable compaction
            const uint64_t x = e[i];
            const uint64_t d = x >> 32;
            const bool keep = d < t || (d == t && ties > 0);
            ties -= d == t;
            e[m] = x;
            m += keep;
        }
        n_ = m;
        threshold_ = t;
    }

    // Writes the k best, ordered by (distance, position), then the empty-slot tail.
    void finish(int32_t* out_dist, int64_t* out_idx) {
        const int64_t take = std::min(k_, n_);
        int64_t below = 0;
        const uint64_t t = kth_distance(take, &below);
        // count_[d] becomes the next output slot of distance d (a stable counting sort).
        int64_t offset = 0;
        for (uint64_t d = 0; d <= t && take > 0; ++d) {
            const int64_t c = count_[d];
            count_[d] = offset;
            offset += c;
        }
        const uint64_t* const e = buf_.data();
        int64_t* const slot = count_.data();
        const int64_t n = n_;
        for (int64_t i = 0; i < n; ++i) {
            const uint64_t d = e[i] >> 32;
            // Ties at t fill their slots in position order until `take` slots are used.
            if (d < t || (d == t && slot[t] < take)) {
                const int64_t s = slot[d]++;
                out_dist[s] = static_cast<int32_t>(d);
                out_idx[s] = static_cast<int64_t>(e[i] & 0xFFFFFFFFu);
            }
        }
        for (int64_t s = take; s < k_; ++s) {
            out_dist[s] = static_cast<int32_t>(bins_);  // 64 W + 1
            out_idx[s] = -1;
        }
    }

   private:
    // Histogram of the buffer; returns the distance t of the take-th smallest entry and the
    // number of entries strictly below t.
    uint64_t kth_distance(int64_t take, int64_t* below) {
        // Every entry has distance <= threshold_ (<= 64 W), so only those bins are used.
        const uint64_t hi = std::min<uint64_t>(threshold_, bins_ - 1);
        int64_t* const count = count_.data();
        std::fill(count, count + hi + 1, 0);
        const uint64_t* const e = buf_.data();
        const int64_t n = n_;
        for (int64_t i = 0; i < n; ++i) ++count[e[i] >> 32];
        uint64_t t = 0;
        int64_t b = 0;
        if (take > 0) {
            while (b + count[t] < take) b += count[t++];
        }
        *below = b;
        return t;
    }

    int64_t k_;
    int64_t bins_;
    int64_t cap_;
    int64_t n_ = 0;
    uint64_t threshold_ = 0;
    AlignedBuffer<uint64_t> buf_;
    std::vector<int64_t> count_;
};

// ------------------------------------------------------------------ portable row scans

template <int WT>
FA_INLINE uint32_t distance_row(const uint64_t* a, const uint64_t* b, int64_t W_rt) {
    const int64_t W = WT ? WT : W_rt;
    uint32_t d = 0;
    for (int64_t w = 0; w < W; ++w) d += static_cast<uint32_t>(__builtin_popcountll(a[w] ^ b[w]));
    return d;
}

template <int WT>
FA_INLINE void scan_rows(const uint64_t* keys, int64_t n, int64_t W_rt, const uint64_t* q,
                         TopkSelector& sel) {
    const int64_t W = WT ? WT : W_rt;
    for (int64_t l = 0; l < n; ++l) sel.push(distance_row<WT>(q, keys + l * W, W), l);
}

template <int WT>
FA_INLINE void distance_rows(const uint64_t* keys, int64_t n, int64_t W_rt, const uint64_t* q,
                             int32_t* out) {
    const int64_t W = WT ? WT : W_rt;
    for (int64_t l = 0; l < n; ++l) out[l] = static_cast<int32_t>(distance_row<WT>(q, keys + l * W, W));
}

// Instantiates a row kernel, specialised for W = 1..5, for one ISA target.
#define FA_W_SWITCH(CALL)                 \
    switch (W) {                          \
        case 1: return CALL(1);           \
        case 2: return CALL(2);           \
        case 3: return CALL(3);           \
        case 4: return CALL(4);           \
        case 5: return CALL(5);           \
        default: return CALL(0);          \
    }
#define FA_SCAN_ROWS(WT) scan_rows<WT>(keys, n, W, q, sel)
#define FA_DISTANCE_ROWS(WT) distance_rows<WT>(keys, n, W, q, out)
#define FA_ROW_KERNELS(SUFFIX, TARGET)                                                         \
    TARGET void scan_rows_##SUFFIX(const uint64_t* keys, int64_t n, int64_t W,                 \
                                   const uint64_t* q, TopkSelector& sel) {                     \
        FA_W_SWITCH(FA_SCAN_ROWS)                                                              \
    }                                                                                          \
    TARGET void distance_rows_##SUFFIX(const uint64_t* keys, int64_t n, int64_t W,             \
                                       const uint64_t* q, int32_t* out) {                      \
        FA_W_SWITCH(FA_DISTANCE_ROWS)                                                          \
    }

FA_ROW_KERNELS(default, )
#if FASTATTN_X86
FA_ROW_KERNELS(popcnt, FA_TARGET_POPCNT)
// Distances only (top-k uses the tiled scan there): GCC vectorises the W-unrolled loop
// with VPOPCNTQ under this target.
FA_TARGET_AVX512_VPOPCNT void distance_rows_avx512(const uint64_t* keys, int64_t n, int64_t W,
                                                   const uint64_t* q, int32_t* out) {
    FA_W_SWITCH(FA_DISTANCE_ROWS)
}
#endif
#undef FA_ROW_KERNELS
#undef FA_DISTANCE_ROWS
#undef FA_SCAN_ROWS
#undef FA_W_SWITCH

using ScanRowsFn = void (*)(const uint64_t*, int64_t, int64_t, const uint64_t*, TopkSelector&);
using DistanceRowsFn = void (*)(const uint64_t*, int64_t, int64_t, const uint64_t*, int32_t*);

ScanRowsFn pick_scan_rows() {
#if FASTATTN_X86
    if (use_popcnt()) return scan_rows_popcnt;
#endif
    return scan_rows_default;
}

DistanceRowsFn pick_distance_rows() {
#if FASTATTN_X86
    if (use_avx512_vpopcnt()) return distance_rows_avx512;
    if (use_popcnt()) return distance_rows_popcnt;
#endif
    return distance_rows_default;
}

// ------------------------------------------------------------------ AVX-512 block scans

// Block j of the tile holds words w = 0..W-1 of keys 8j..8j+7 as 8 consecutive uint64;
// keys at positions >= n are zero (and masked out by the scan).
void tile_block(const uint64_t* keys, int64_t n, int64_t W, int64_t block, uint64_t* tile) {
    uint64_t* t = tile + block * kBlockKeys * W;
    for (int i = 0; i < kBlockKeys; ++i) {
        const int64_t l = block * kBlockKeys + i;
        for (int64_t w = 0; w < W; ++w) t[w * kBlockKeys + i] = l < n ? keys[l * W + w] : 0;
    }
}

#if FASTATTN_X86
using ScanTileFn = int64_t (*)(const uint64_t*, int64_t, int64_t, int64_t,
                               const uint64_t* const*, TopkSelector* const*);

// Word w of a block's 8 keys: one load from a tile, or a gather from row-major keys
// (masked, so that the last block never reads past key n - 1).
template <bool kRows>
FA_INLINE FA_TARGET_AVX512_VPOPCNT __m512i load_words(const uint64_t* t, int64_t w,
                                                      __mmask8 valid, __m512i row_words) {
    if constexpr (kRows) {
        return _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), valid, row_words, t + w, 8);
    } else {
        return _mm512_load_si512(t + w * kBlockKeys);
    }
}

// Scans key blocks [blk, nblocks) for QB queries and appends every key that beats a
// query's threshold to its selector. A leaf loop with no calls, so that query words,
// thresholds and accumulators stay in registers; it returns early (with the next block to
// scan) as soon as a selector is full and must be cut.
template <int WT, int QB, bool kRows>
FA_TARGET_AVX512_VPOPCNT int64_t scan_tile_avx512(const uint64_t* tile, int64_t blk,
                                                  int64_t n, int64_t W_rt,
                                                  const uint64_t* const* q,
                                                  TopkSelector* const* sel) {
    const int64_t W = WT ? WT : W_rt;
    // Query words as broadcast vectors; the runtime-W variant broadcasts them on the fly.
    __m512i qv[QB][WT ? WT : 1];
    if constexpr (WT != 0) {
        for (int j = 0; j < QB; ++j)
            for (int w = 0; w < WT; ++w) qv[j][w] = _mm512_set1_epi64(static_cast<long long>(q[j][w]));
    }
    __m512i thr[QB];
    for (int j = 0; j < QB; ++j) thr[j] = _mm512_set1_epi64(static_cast<long long>(sel[j]->threshold()));
    const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    const int64_t nblocks = (n + kBlockKeys - 1) / kBlockKeys;
    const int64_t nfull = n / kBlockKeys;
    const __mmask8 tail = static_cast<__mmask8>((1u << (n % kBlockKeys)) - 1);
    const __m512i row_words = _mm512_set_epi64(7 * W, 6 * W, 5 * W, 4 * W, 3 * W, 2 * W, W, 0);

    for (; blk < nblocks; ++blk) {
        const uint64_t* t = tile + blk * kBlockKeys * W;
        const __mmask8 valid = blk < nfull ? __mmask8(0xFF) : tail;
        __m512i acc[QB];
        if constexpr (WT != 0) {
            for (int w = 0; w < WT; ++w) {
                const __m512i kv = load_words<kRows>(t, w, valid, row_words);
                for (int j = 0; j < QB; ++j) {
                    const __m512i c = _mm512_popcnt_epi64(_mm512_xor_si512(kv, qv[j][w]));
                    acc[j] = w == 0 ? c : _mm512_add_epi64(acc[j], c);
                }
            }
        } else {
            for (int j = 0; j < QB; ++j) {
                acc[j] = _mm512_setzero_si512();
                for (int64_t w = 0; w < W; ++w) {
                    const __m512i kv = load_words<kRows>(t, w, valid, row_words);
                    const __m512i qw = _mm512_set1_epi64(static_cast<long long>(q[j][w]));
                    acc[j] = _mm512_add_epi64(acc[j], _mm512_popcnt_epi64(_mm512_xor_si512(kv, qw)));
                }
            }
        }
        __mmask8 m[QB];
        unsigned any = 0;
        for (int j = 0; j < QB; ++j) {
            m[j] = _mm512_mask_cmplt_epu64_mask(valid, acc[j], thr[j]);
            any |= m[j];
        }
        if (__builtin_expect(any == 0, 1)) continue;
        // Append the hits as (distance << 32 | position), in position order.
        const __m512i pos = _mm512_add_epi64(_mm512_set1_epi64(blk * kBlockKeys), lane);
        // No per-query branches: a query without hits stores an empty vector and grows by 0.
        bool cut = false;
        for (int j = 0; j < QB; ++j) {
            const __m512i e = _mm512_or_si512(_mm512_maskz_slli_epi64(m[j], acc[j], 32), pos);
            _mm512_storeu_si512(sel[j]->end(), _mm512_maskz_compress_epi64(m[j], e));
            sel[j]->grow(__builtin_popcount(m[j]));
            cut |= sel[j]->full();
        }
        if (cut) return blk + 1;
    }
    return nblocks;
}

template <int WT, bool kRows>
ScanTileFn scan_tile_for(int qb) {
    switch (qb) {
        case 1: return scan_tile_avx512<WT, 1, kRows>;
        case 2: return scan_tile_avx512<WT, 2, kRows>;
        case 3: return scan_tile_avx512<WT, 3, kRows>;
        default: return scan_tile_avx512<WT, 4, kRows>;
    }
}

template <bool kRows>
ScanTileFn pick_scan_tile(int64_t W, int qb) {
    static_assert(kMaxQueries == 4 && kMaxStaticW == 5, "update the dispatch tables");
    switch (W) {
        case 1: return scan_tile_for<1, kRows>(qb);
        case 2: return scan_tile_for<2, kRows>(qb);
        case 3: return scan_tile_for<3, kRows>(qb);
        case 4: return scan_tile_for<4, kRows>(qb);
        case 5: return scan_tile_for<5, kRows>(qb);
        default: return scan_tile_for<0, kRows>(qb);
    }
}

// Per-thread state of the AVX-512 top-k: one selector per query of a block.
class TileWorker {
   public:
    TileWorker(const int64_t* q, int64_t W, int64_t L, int64_t topk, int32_t* out_dist,
               int64_t* out_idx)
        : q_(q), W_(W), topk_(topk), out_dist_(out_dist), out_idx_(out_idx) {
        for (int j = 0; j < kMaxQueries; ++j) sels_.emplace_back(topk, L, W);
    }

    // Top-k of queries ids[0..count) (count <= kMaxQueries) against the first n keys of a
    // tile (kRows = false) or of row-major keys (kRows = true).
    template <bool kRows>
    void run(const uint64_t* keys, int64_t n, const int64_t* ids, int count) {
        const uint64_t* qs[kMaxQueries];
        TopkSelector* sel[kMaxQueries];
        for (int j = 0; j < count; ++j) {
            qs[j] = reinterpret_cast<const uint64_t*>(q_) + ids[j] * W_;
            sel[j] = &sels_[j];
            sel[j]->reset();
        }
        const ScanTileFn scan = pick_scan_tile<kRows>(W_, count);
        const int64_t nblocks = (n + kBlockKeys - 1) / kBlockKeys;
        for (int64_t blk = 0; blk < nblocks;) {
            blk = scan(keys, blk, n, W_, qs, sel);
            for (int j = 0; j < count; ++j)
                if (sel[j]->full()) sel[j]->cut();
        }
        for (int j = 0; j < count; ++j)
            sel[j]->finish(out_dist_ + ids[j] * topk_, out_idx_ + ids[j] * topk_);
    }

   private:
    const int64_t* q_;
    int64_t W_, topk_;
    int32_t* out_dist_;
    int64_t* out_idx_;
    std::vector<TopkSelector> sels_;
};

void hamming_topk_avx512(const int64_t* q, const int64_t* k, const int64_t* lengths,
                         const int64_t* hist_index, int64_t B, int64_t U, int64_t L, int64_t W,
                         int64_t topk, int32_t* out_dist, int64_t* out_idx, int nthreads) {
    const HistoryGroups g = group_by_history(hist_index, B, U);
    // A history is "hot" when it holds a sizeable share of the queries (the serving
    // layout): all threads tile it together, then split its queries. Other histories (the
    // training layout: one query each) go whole to one thread, which gathers the key words
    // straight from the row-major keys: a tile would cost a pass for a single use.
    std::vector<int64_t> hot, cold;
    const int64_t hot_min = std::max<int64_t>({8, nthreads, B / (4 * nthreads)});
    for (int64_t u = 0; u < U; ++u) {
        const int64_t c = g.start[u + 1] - g.start[u];
        if (c == 0) continue;
        (c >= hot_min ? hot : cold).push_back(u);
    }
    const int64_t tile_words = (L + kBlockKeys - 1) / kBlockKeys * kBlockKeys * W;
    AlignedBuffer<uint64_t> shared_tile(hot.empty() ? 0 : tile_words);
    uint64_t* const shared = shared_tile.data();
    const uint64_t* const keys = reinterpret_cast<const uint64_t*>(k);

#pragma omp parallel num_threads(nthreads)
    {
        TileWorker worker(q, W, L, topk, out_dist, out_idx);
        for (const int64_t u : hot) {
            const int64_t n = lengths[u];
            const int64_t nblocks = (n + kBlockKeys - 1) / kBlockKeys;
#pragma omp for schedule(static)
            for (int64_t blk = 0; blk < nblocks; ++blk) tile_block(keys + u * L * W, n, W, blk, shared);
            // Blocks small enough that every thread gets work, up to kMaxQueries.
            const int64_t nq = g.start[u + 1] - g.start[u];
            const int64_t qb = std::min<int64_t>(kMaxQueries, (nq + nthreads - 1) / nthreads);
            const int64_t nqb = (nq + qb - 1) / qb;
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < nqb; ++i) {
                const int64_t first = i * qb;
                worker.run<false>(shared, n, g.order.data() + g.start[u] + first,
                           static_cast<int>(std::min(qb, nq - first)));
            }
            // (the implicit barrier keeps the next hot history from overwriting the tile)
        }
#pragma omp for schedule(dynamic, 1)
        for (size_t i = 0; i < cold.size(); ++i) {
            const int64_t u = cold[i];
            for (int64_t first = g.start[u]; first < g.start[u + 1]; first += kMaxQueries) {
                worker.run<true>(keys + u * L * W, lengths[u], g.order.data() + first,
                           static_cast<int>(std::min<int64_t>(kMaxQueries, g.start[u + 1] - first)));
            }
        }
    }
}
#endif  // FASTATTN_X86

}  // namespace

std::string hamming_impl() {
#if FASTATTN_X86
    if (use_avx512_vpopcnt()) return "avx512_vpopcntdq";
    if (use_popcnt()) return "popcnt";
#endif
    return "default";
}

void hamming_distance(const int64_t* q, const int64_t* k, const int64_t* qi, const int64_t* ki,
                      int64_t Nq, int64_t Nk, int64_t N, int64_t L, int64_t W, int32_t* out,
                      int nthreads) {
    check_range(qi, N, 0, Nq, "hamming_distance", "qi");
    check_range(ki, N, 0, Nk, "hamming_distance", "ki");
    if (N == 0 || L == 0) return;
    const DistanceRowsFn rows = pick_distance_rows();
    // Chunks of a row keep threads busy when N is small and L long.
    constexpr int64_t kChunk = 4096;
    const int64_t chunks = (L + kChunk - 1) / kChunk;
    const uint64_t* qq = reinterpret_cast<const uint64_t*>(q);
    const uint64_t* kk = reinterpret_cast<const uint64_t*>(k);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t t = 0; t < N * chunks; ++t) {
        const int64_t n = t / chunks;
        const int64_t l0 = (t % chunks) * kChunk;
        const int64_t len = std::min(kChunk, L - l0);
        rows(kk + (ki[n] * L + l0) * W, len, W, qq + qi[n] * W, out + n * L + l0);
    }
}

void hamming_topk(const int64_t* q, const int64_t* k, const int64_t* lengths,
                  const int64_t* hist_index, int64_t B, int64_t U, int64_t L, int64_t W,
                  int64_t topk, int32_t* out_dist, int64_t* out_idx, int nthreads) {
    check_range(hist_index, B, 0, U, "hamming_topk", "hist_index");
    check_range(lengths, U, 0, L + 1, "hamming_topk", "lengths");
    if (B == 0 || topk == 0) return;
#if FASTATTN_X86
    if (use_avx512_vpopcnt()) {
        hamming_topk_avx512(q, k, lengths, hist_index, B, U, L, W, topk, out_dist, out_idx, nthreads);
        return;
    }
#endif
    const ScanRowsFn scan = pick_scan_rows();
    const uint64_t* qq = reinterpret_cast<const uint64_t*>(q);
    const uint64_t* kk = reinterpret_cast<const uint64_t*>(k);
#pragma omp parallel num_threads(nthreads)
    {
        TopkSelector sel(topk, L, W);
#pragma omp for schedule(dynamic, 4)
        for (int64_t b = 0; b < B; ++b) {
            const int64_t u = hist_index[b];
            sel.reset();
            scan(kk + u * L * W, lengths[u], W, qq + b * W, sel);
            sel.finish(out_dist + b * topk, out_idx + b * topk);
        }
    }
}

}  // namespace fastattn
