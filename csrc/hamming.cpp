// Hamming distance and fused Hamming top-k over packed SimHash signatures.
//
// hamming_topk never materialises the B x L distance matrix. Distances are small integers
// (<= 64 W), so every selection is a counting sort over candidates kept in position order,
// which gives the (distance, position) order of the spec, ties included, with no
// comparison sort.
//
// Portable paths stream each query's history through a TopkSelector, which admits a key
// only if it beats the exact running k-th distance.
//
// The AVX-512 path computes the distances of 8 keys at once as W x (XOR, VPOPCNTQ, ADD) on
// vectors that hold one word of each of the 8 keys, so no horizontal reduction is needed,
// and selects in two passes (see scan_packed and TileWorker::run) so that the per-key work
// stays branch-free vector code. It serves W <= kMaxTileW (uint16 distances); wider
// signatures take the portable path. A history read by many queries (the serving layout) is first
// re-laid out by all threads together as such blocks ("tile": word w of keys 8j..8j+7 is
// one 512-bit vector), and then its queries are split between threads. A history read by
// few queries (the training layout) goes whole to one thread, which gathers the words from
// the row-major keys. Up to 4 queries share each loaded key vector.
//
// hamming_topk_rows runs the same code on indexed histories: position l of history u has
// the key table[rows[u, l]]. Only how a key is addressed differs (DenseKeys / TableKeys
// below), so its output is that of hamming_topk on the gathered keys, bit for bit.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu_features.h"
#include "kernels.h"

namespace fastattn {
namespace {

constexpr int kBlockKeys = 8;    // keys per tile block: the uint64 lanes of one zmm
constexpr int kMaxQueries = 4;   // queries sharing one pass over the keys
constexpr int kMaxStaticW = 5;   // W = 1..5 get fully unrolled kernels; larger W loops
// The AVX-512 top-k stores distances as uint16 with 0xFFFF marking "no key", so it serves
// W <= 1023 (64 W <= 65472); wider signatures take the portable scan (uint32 distances).
constexpr int64_t kMaxTileW = 1023;

// How the AVX-512 scan loads the words of 8 keys: from a tile (one aligned load per word), or
// gathered from dense row-major keys (stride W) or from table rows (rows[l] * W).
enum class Layout { kTile, kDense, kTable };

// The keys of one history, as the scans address them: key(l, W) points at the W words of
// position l. The AVX-512 cold path gathers through (keys, rows) according to kLayout.
struct DenseKeys {  // k (U, L, W): keys = k[u]
    static constexpr Layout kLayout = Layout::kDense;
    const uint64_t* keys;
    const int64_t* rows;  // unused (nullptr)
    static DenseKeys of(const uint64_t* k, const int64_t*, int64_t u, int64_t L, int64_t W) {
        return {k + u * L * W, nullptr};
    }
    FA_INLINE const uint64_t* key(int64_t l, int64_t W) const { return keys + l * W; }
};
struct TableKeys {  // table (N, W), rows (U, L): keys = table, rows = rows[u]
    static constexpr Layout kLayout = Layout::kTable;
    const uint64_t* keys;
    const int64_t* rows;
    static TableKeys of(const uint64_t* k, const int64_t* rows, int64_t u, int64_t L, int64_t) {
        return {k, rows + u * L};
    }
    FA_INLINE const uint64_t* key(int64_t l, int64_t W) const { return keys + rows[l] * W; }
};

// Candidates are packed as (distance << 32) | position, so that the AVX-512 scan appends
// a whole vector of them with one compress + store.
//
// The threshold is kept exact at every step: t is the k-th smallest distance admitted so
// far (64 W + 1 until k keys are in), and count_[d] counts the admitted keys of distance
// d < t. Keys arrive in position order, so a later key displaces an admitted one only if its
// distance is < t (a tie loses on position). Admitting one key is O(1) amortised (t only
// goes down), so no key is admitted on a stale threshold and no per-query work scales with
// the buffer: the buffer keeps admitted entries that a later drop of t made useless (those
// with d > t, and the excess at d == t), which finish() skips; it is compacted only if it
// fills up, which takes an adversarial key order.
class TopkSelector {
   public:
    TopkSelector(int64_t k, int64_t L, int64_t W) : k_(k), bins_(64 * W + 1), count_(bins_ + 1) {
        // A random key order admits about k (1 + ln(L / k)) keys, well under this.
        cap_ = k + std::max<int64_t>(k, 512);
        // + one block: a vector append stores 8 entries at size() < capacity.
        buf_.resize(static_cast<size_t>(std::min(cap_, L) + kBlockKeys));
    }

    void reset() {
        n_ = 0;
        t_ = bins_;  // 64 W + 1: admits every distance
        below_ = 0;
        std::fill(count_.begin(), count_.end(), 0);  // ~1 KiB at W = 4
    }

    // Keys with distance >= threshold() can no longer enter the top k.
    uint64_t threshold() const { return static_cast<uint64_t>(t_); }

    // Keys must arrive in increasing position order.
    FA_INLINE void push(uint64_t d, int64_t p) {
        if (d < threshold()) {
            buf_.data()[n_++] = (d << 32) | static_cast<uint64_t>(p);
            count(d);
            if (n_ >= cap_) compact();
        }
    }

    // Vector appends: store up to kBlockKeys entries at end() (in position order, each with
    // distance < threshold() when the block was scanned), then admit(m) takes the first m.
    uint64_t* end() { return buf_.data() + n_; }
    FA_INLINE void admit(int m) {
        // Every entry of the block beat the threshold it was scanned with, so all are
        // counted (a count for a bin >= t is never read again) and t is lowered once per
        // block: no per-entry branch.
        const uint64_t* const e = buf_.data() + n_;
        int32_t* const count = count_.data();
        for (int i = 0; i < m; ++i) ++count[e[i] >> 32];
        n_ += m;
        below_ += m;
        lower();
        if (n_ >= cap_) compact();
    }

    // Writes the k best, ordered by (distance, position), then the empty-slot tail.
    void finish(int32_t* out_dist, int64_t* out_idx) {
        // Fewer than k admitted: t never dropped, every entry counts and has d < t.
        const int64_t take = t_ == bins_ ? below_ : k_;
        // count_[d] becomes the next output slot of distance d (a stable counting sort);
        // distance t takes the remaining take - below_ slots, earliest positions first.
        int64_t offset = 0;
        for (int64_t d = 0; d < t_; ++d) {
            const int64_t c = count_[d];
            count_[d] = static_cast<int32_t>(offset);
            offset += c;
        }
        count_[t_] = static_cast<int32_t>(below_);
        const uint64_t* const e = buf_.data();
        int32_t* const slot = count_.data();
        const uint64_t t = threshold();
        for (int64_t i = 0; i < n_; ++i) {
            const uint64_t d = e[i] >> 32;
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
    // Counts an entry with d < t, then lowers t while at least k entries lie below it.
    FA_INLINE void count(uint64_t d) {
        ++count_[d];
        ++below_;
        lower();
    }
    FA_INLINE void lower() {
        while (below_ >= k_) below_ -= count_[--t_];
    }

    // Drops the entries finish() would skip: d > t, and those at d == t past the first
    // k - below_. Leaves k entries (the buffer only fills once k were admitted).
    __attribute__((noinline)) void compact() {
        uint64_t* const e = buf_.data();
        const uint64_t t = threshold();
        int64_t ties = k_ - below_;
        int64_t m = 0;
        for (int64_t i = 0; i < n_; ++i) {
            const uint64_t d = e[i] >> 32;
            const bool keep = d < t || (d == t && ties > 0);
            ties -= d == t;
            e[m] = e[i];
            m += keep;
        }
        n_ = m;
    }

    int64_t k_;
    int64_t bins_;
    int64_t cap_;
    int64_t n_ = 0;
    int64_t t_ = 0;
    int64_t below_ = 0;  // entries with d < t_ (all counted in count_)
    AlignedBuffer<uint64_t> buf_;
    std::vector<int32_t> count_;  // bins 0 .. 64 W + 1
};

// ------------------------------------------------------------------ portable row scans

template <int WT>
FA_INLINE uint32_t distance_row(const uint64_t* a, const uint64_t* b, int64_t W_rt) {
    const int64_t W = WT ? WT : W_rt;
    uint32_t d = 0;
    for (int64_t w = 0; w < W; ++w) d += static_cast<uint32_t>(__builtin_popcountll(a[w] ^ b[w]));
    return d;
}

template <int WT, class Keys>
FA_INLINE void scan_rows(Keys keys, int64_t n, int64_t W_rt, const uint64_t* q,
                         TopkSelector& sel) {
    const int64_t W = WT ? WT : W_rt;
    for (int64_t l = 0; l < n; ++l) sel.push(distance_row<WT>(q, keys.key(l, W), W), l);
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
#define FA_SCAN_ROWS(WT) scan_rows<WT, Keys>(keys, n, W, q, sel)
#define FA_DISTANCE_ROWS(WT) distance_rows<WT>(keys, n, W, q, out)
#define FA_ROW_KERNELS(SUFFIX, TARGET)                                                         \
    template <class Keys>                                                                      \
    TARGET void scan_rows_##SUFFIX(Keys keys, int64_t n, int64_t W, const uint64_t* q,         \
                                   TopkSelector& sel) {                                        \
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

template <class Keys>
using ScanRowsFn = void (*)(Keys, int64_t, int64_t, const uint64_t*, TopkSelector&);
using DistanceRowsFn = void (*)(const uint64_t*, int64_t, int64_t, const uint64_t*, int32_t*);

template <class Keys>
ScanRowsFn<Keys> pick_scan_rows() {
#if FASTATTN_X86
    if (use_popcnt()) return scan_rows_popcnt<Keys>;
#endif
    return scan_rows_default<Keys>;
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
template <class Keys>
void tile_block(Keys keys, int64_t n, int64_t W, int64_t block, uint64_t* tile) {
    uint64_t* t = tile + block * kBlockKeys * W;
    for (int i = 0; i < kBlockKeys; ++i) {
        const int64_t l = block * kBlockKeys + i;
        const uint64_t* key = l < n ? keys.key(l, W) : nullptr;
        for (int64_t w = 0; w < W; ++w) t[w * kBlockKeys + i] = key ? key[w] : 0;
    }
}

#if FASTATTN_X86
// The AVX-512 top-k makes two passes per block of up to kMaxQueries queries, so that no
// branch or scalar work depends on how often a key beats a running threshold (the
// k (1 + ln(L / k)) "records" of a streaming top-k each cost a mispredicted branch and a
// buffer update, which was most of the time at L ~ 1000):
//  1. one scan over the keys computes each 8-key block's distances to all queries of the
//     block (register-blocked: every loaded key vector serves every query) and stores them
//     packed, the 4 queries' uint16 distances of one key in one 64-bit lane: one store per
//     block whatever the query count, and one uint16 minimum per block keeps, per lane, query
//     and group of R consecutive blocks, the smallest distance;
//  2. the k-th smallest of a query's minima, g, bounds its k-th distance (the minima belong
//     to distinct keys), and it is tight: about 4k minima of L / 4k keys each are taken, so
//     only ~k keys have d <= g. One vector compare per block against the 4 queries' g lists
//     the hits of all 4 queries in one list, in position order, and one counting sort over
//     (query, distance) bins gives the exact answer.
using ScanFn = int64_t (*)(const uint64_t*, const int64_t*, int64_t, int64_t, int64_t,
                           const uint64_t* const*, __m512i*, __m512i*, uint64_t, uint32_t*);

constexpr uint16_t kNoKey = 0xFFFF;  // distance of a tail lane or an unused query slot
static_assert(64 * kMaxTileW < kNoKey, "uint16 distances must stay below kNoKey");
static_assert(kMaxQueries * 16 == 64, "the packed distances of one key fill one uint64");

// Word w of a block's 8 keys: one load from a tile, or a gather of t[offsets[i] + w] (masked,
// so that the last block never reads past key n - 1).
template <Layout kLayout>
FA_INLINE FA_TARGET_AVX512_VPOPCNT __m512i load_words(const uint64_t* t, int64_t w,
                                                      __mmask8 valid, __m512i offsets) {
    if constexpr (kLayout != Layout::kTile) {
        return _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), valid, offsets, t + w, 8);
    } else {
        return _mm512_load_si512(t + w * kBlockKeys);
    }
}

// rows[0..8) * W, the word offsets of 8 table rows; lanes outside valid are neither loaded
// nor used. (Two 32 x 32 -> 64-bit products, as VPMULLQ needs AVX512DQ; the maskz forms
// avoid GCC's maybe-uninitialized warning on the unmasked intrinsics' undefined operand.)
FA_INLINE FA_TARGET_AVX512_VPOPCNT __m512i row_offsets(const int64_t* rows, __mmask8 valid,
                                                       int64_t W) {
    const __m512i r = _mm512_maskz_loadu_epi64(valid, rows);
    const __m512i w = _mm512_set1_epi64(W);
    const __m512i hi = _mm512_maskz_mul_epu32(0xFF, _mm512_maskz_srli_epi64(0xFF, r, 32), w);
    return _mm512_add_epi64(_mm512_maskz_mul_epu32(0xFF, r, w), _mm512_maskz_slli_epi64(0xFF, hi, 32));
}

// Pass 1 for QB queries over n keys: packed[b], lane i = the distances of key 8b + i to
// queries 0..QB-1 in bits 16j..16j+15 (kNoKey in unused slots and tail lanes), and mins[g] =
// the uint16 minimum of packed[] over the blocks of group g (R blocks each). Returns the
// number of groups. With masks (bounds known before the scan: bound = the 4 queries' uint16
// bounds packed as in a lane), no minima: masks[b] = the block's compare mask against them
// (bit 4i + j: key 8b + i, query j has d <= bound j), and 0 is returned. A leaf loop with
// no calls, so that query words and accumulators stay in registers. keys is a tile, a
// history's dense (L, W) keys, or a table read through rows.
template <int WT, int QB, Layout kLayout>
FA_TARGET_AVX512_VPOPCNT int64_t scan_packed(const uint64_t* keys, const int64_t* rows,
                                             int64_t n, int64_t W_rt, int64_t R,
                                             const uint64_t* const* q, __m512i* packed,
                                             __m512i* mins, uint64_t bound, uint32_t* masks) {
    const int64_t W = WT ? WT : W_rt;
    // Query words as broadcast vectors; the runtime-W variant broadcasts them on the fly.
    __m512i qv[QB][WT ? WT : 1];
    if constexpr (WT != 0) {
        for (int j = 0; j < QB; ++j)
            for (int w = 0; w < WT; ++w) qv[j][w] = _mm512_set1_epi64(static_cast<long long>(q[j][w]));
    }
    const __m512i none = _mm512_set1_epi64(-1);
    // kNoKey in the slots of absent queries, zero in the others.
    const __m512i unused = _mm512_set1_epi64(static_cast<long long>(QB == kMaxQueries ? 0 : ~0ull << (16 * QB)));
    const int64_t nblocks = (n + kBlockKeys - 1) / kBlockKeys;
    const int64_t nfull = n / kBlockKeys;
    const __mmask8 tail = static_cast<__mmask8>((1u << (n % kBlockKeys)) - 1);
    const __m512i row_words = _mm512_set_epi64(7 * W, 6 * W, 5 * W, 4 * W, 3 * W, 2 * W, W, 0);
    // One block: its 8 keys' distances to the QB queries, packed; tail lanes (outside valid)
    // get kNoKey only when kTail, so that full blocks carry no per-block mask logic.
    auto block = [&](int64_t blk, auto tail_block) FA_TARGET_AVX512_VPOPCNT {
        constexpr bool kTail = decltype(tail_block)::value;
        const __mmask8 valid = kTail ? tail : __mmask8(0xFF);
        const uint64_t* t = keys + blk * kBlockKeys * W;
        __m512i offsets = row_words;
        if constexpr (kLayout == Layout::kTable) {
            t = keys;
            offsets = row_offsets(rows + blk * kBlockKeys, valid, W);
        }
        __m512i acc[QB];
        if constexpr (WT != 0) {
            for (int w = 0; w < WT; ++w) {
                const __m512i kv = load_words<kLayout>(t, w, valid, offsets);
                for (int j = 0; j < QB; ++j) {
                    const __m512i c = _mm512_popcnt_epi64(_mm512_xor_si512(kv, qv[j][w]));
                    acc[j] = w == 0 ? c : _mm512_add_epi64(acc[j], c);
                }
            }
        } else {
            for (int j = 0; j < QB; ++j) {
                acc[j] = _mm512_setzero_si512();
                for (int64_t w = 0; w < W; ++w) {
                    const __m512i kv = load_words<kLayout>(t, w, valid, offsets);
                    const __m512i qw = _mm512_set1_epi64(static_cast<long long>(q[j][w]));
                    acc[j] = _mm512_add_epi64(acc[j], _mm512_popcnt_epi64(_mm512_xor_si512(kv, qw)));
                }
            }
        }
        __m512i p = unused;
        for (int j = 0; j < QB; ++j)
            p = _mm512_or_si512(p, j == 0 ? acc[0] : _mm512_slli_epi64(acc[j], 16 * j));
        if constexpr (kTail) p = _mm512_mask_mov_epi64(none, valid, p);
        _mm512_store_si512(packed + blk, p);
        return p;
    };
    if (masks != nullptr) {
        const __m512i bv = _mm512_set1_epi64(static_cast<long long>(bound));
        for (int64_t blk = 0; blk < nfull; ++blk)
            masks[blk] = _mm512_cmple_epu16_mask(block(blk, std::false_type{}), bv);
        if (nblocks > nfull) masks[nfull] = _mm512_cmple_epu16_mask(block(nfull, std::true_type{}), bv);
        return 0;
    }
    int64_t ng = 0;
    for (int64_t g0 = 0; g0 < nblocks; g0 += R) {
        __m512i mn = none;
        const int64_t g1 = std::min(nblocks, g0 + R);
        const int64_t f1 = std::min(g1, nfull);
        for (int64_t blk = g0; blk < f1; ++blk) mn = _mm512_min_epu16(mn, block(blk, std::false_type{}));
        if (g1 > f1) mn = _mm512_min_epu16(mn, block(f1, std::true_type{}));  // the last, partial block
        _mm512_store_si512(mins + ng++, mn);
    }
    return ng;
}

template <int WT, Layout kLayout>
ScanFn scan_for(int qb) {
    switch (qb) {
        case 1: return scan_packed<WT, 1, kLayout>;
        case 2: return scan_packed<WT, 2, kLayout>;
        case 3: return scan_packed<WT, 3, kLayout>;
        default: return scan_packed<WT, 4, kLayout>;
    }
}

template <Layout kLayout>
ScanFn pick_scan(int64_t W, int qb) {
    static_assert(kMaxQueries == 4 && kMaxStaticW == 5, "update the dispatch tables");
    switch (W) {
        case 1: return scan_for<1, kLayout>(qb);
        case 2: return scan_for<2, kLayout>(qb);
        case 3: return scan_for<3, kLayout>(qb);
        case 4: return scan_for<4, kLayout>(qb);
        case 5: return scan_for<5, kLayout>(qb);
        default: return scan_for<0, kLayout>(qb);
    }
}

// The 4 uint16 slots of every lane set to g[0..4): a packed vector to compare against.
FA_INLINE FA_TARGET_AVX512_VPOPCNT __m512i packed_of(const uint16_t* g) {
    uint64_t v = 0;
    for (int j = 0; j < kMaxQueries; ++j) v |= static_cast<uint64_t>(g[j]) << (16 * j);
    return _mm512_set1_epi64(static_cast<long long>(v));
}

// g[j] = the k-th smallest of query j's minima (slot j of mins[0..ng)), all queries at once by
// bisection on vector counts; 64 W (every key) when query j has fewer than k minima.
// dmin[j] = the smallest of them: query j's smallest distance (<= g[j]). A guess > 0 (a g of
// the previous block of queries of the same history: the k-th distances of one history's
// queries lie close together) starts the search there, then probes outwards in steps of 1,
// 2, 4, ... until the answer is bracketed, then bisects: about 3 probes instead of 5-6 when
// the guess is close, at most twice bisection's count when it is not.
constexpr int64_t kMaxPackedCount = 65535 / kBlockKeys;
FA_TARGET_AVX512_VPOPCNT void bounds(const __m512i* mins, int64_t ng, int64_t k, int64_t W,
                                     uint16_t guess, uint16_t* g, uint16_t* dmin) {
    // The answer lies between a query's smallest and largest minimum (the largest only when
    // all 8 ng minima are real keys, >= k of them): one min/max pass narrows the bisection.
    __m512i vmin = _mm512_set1_epi16(-1), vmax = _mm512_setzero_si512();
    for (int64_t i = 0; i < ng; ++i) {
        const __m512i m = _mm512_load_si512(mins + i);
        vmin = _mm512_min_epu16(vmin, m);
        vmax = _mm512_max_epu16(vmax, m);
    }
    alignas(64) uint16_t mn16[32], mx16[32];
    _mm512_store_si512(mn16, vmin);
    _mm512_store_si512(mx16, vmax);
    uint16_t lo[kMaxQueries], hi[kMaxQueries];
    for (int j = 0; j < kMaxQueries; ++j) {
        uint16_t a = mn16[j], b = mx16[j];
        for (int i = 1; i < kBlockKeys; ++i) {
            a = std::min(a, mn16[4 * i + j]);
            b = std::max(b, mx16[4 * i + j]);
        }
        const uint16_t all = static_cast<uint16_t>(64 * W);
        hi[j] = kBlockKeys * ng >= k && b <= all ? b : all;
        lo[j] = std::min(a, hi[j]);
        dmin[j] = lo[j];
    }
    constexpr uint32_t kSlot = 0x11111111u;  // bit 4i + j of a 16-bit compare mask: lane i, query j
    // Per query: the next probe, the step of the outward search, and whether a probe has
    // counted >= k yet (hi came from a probe) or < k (lo did); both: bisection.
    uint16_t mid[kMaxQueries];
    int step[kMaxQueries];
    bool above[kMaxQueries], below[kMaxQueries];
    for (int j = 0; j < kMaxQueries; ++j) {
        mid[j] = guess ? std::clamp(guess, lo[j], hi[j])
                       : static_cast<uint16_t>((lo[j] + hi[j]) / 2);
        step[j] = 1;
        above[j] = below[j] = guess == 0;
    }
    for (;;) {
        bool open = false;
        for (int j = 0; j < kMaxQueries; ++j) open |= lo[j] < hi[j];
        if (!open) break;
        const __m512i mv = packed_of(mid);
        int64_t c[kMaxQueries] = {0, 0, 0, 0};
        if (ng <= kMaxPackedCount) {
            // One masked uint16 increment per vector counts all 4 queries' minima <= mid (a
            // lane's counters stay <= ng); the 64-bit sum over the 8 lanes then holds query
            // j's count in bits 16j..16j+15 (<= 8 ng < 65536: no carry between slots).
            // (four accumulators, each a merge-masked add of one: the compare and one add
            // per vector, no mask-to-vector move)
            const __m512i one = _mm512_set1_epi16(1);
            __m512i a[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                            _mm512_setzero_si512()};
            int64_t i = 0;
            for (; i + 4 <= ng; i += 4) {
                for (int u = 0; u < 4; ++u)
                    a[u] = _mm512_mask_add_epi16(a[u], _mm512_cmple_epu16_mask(_mm512_load_si512(mins + i + u), mv), a[u], one);
            }
            for (; i < ng; ++i)
                a[0] = _mm512_mask_add_epi16(a[0], _mm512_cmple_epu16_mask(_mm512_load_si512(mins + i), mv), a[0], one);
            const __m512i acc = _mm512_add_epi16(_mm512_add_epi16(a[0], a[1]), _mm512_add_epi16(a[2], a[3]));
            alignas(64) uint64_t lane[kBlockKeys];
            _mm512_store_si512(lane, acc);
            uint64_t sum = 0;
            for (int i = 0; i < kBlockKeys; ++i) sum += lane[i];
            for (int j = 0; j < kMaxQueries; ++j) c[j] = static_cast<int64_t>((sum >> (16 * j)) & 0xFFFF);
        } else {  // (a huge k: one group per block)
            for (int64_t i = 0; i < ng; ++i) {
                const uint32_t m = _mm512_cmple_epu16_mask(_mm512_load_si512(mins + i), mv);
                for (int j = 0; j < kMaxQueries; ++j) c[j] += __builtin_popcount(m & (kSlot << j));
            }
        }
        for (int j = 0; j < kMaxQueries; ++j) {
            if (lo[j] >= hi[j]) continue;
            if (c[j] >= k) {
                hi[j] = mid[j];
                above[j] = true;
            } else {
                lo[j] = static_cast<uint16_t>(mid[j] + 1);
                below[j] = true;
            }
            if (above[j] && below[j]) {
                mid[j] = static_cast<uint16_t>((lo[j] + hi[j]) / 2);
            } else if (above[j]) {
                mid[j] = static_cast<uint16_t>(std::max(int(lo[j]), hi[j] - step[j]));
                step[j] *= 2;
            } else {
                mid[j] = static_cast<uint16_t>(std::min(int(hi[j]), lo[j] - 1 + step[j]));
                step[j] *= 2;
            }
        }
    }
    for (int j = 0; j < kMaxQueries; ++j) g[j] = lo[j];
}

// Pass 2 collects the hits (d <= g) of all queries of a block in one list, in position order:
// entry (id << 16) | d, id = 4 (key - c0) + j for query j (a chunk holds <= 16384 keys, so
// id < 65536), i.e. key << 18 | j << 16 | d. Slot s of a block's packed vector (its key
// 8 blk + s / 4, query s % 4) has id 32 blk + s.

// The top-k's selection also takes BMI2 (PEXT) and AVX512-VBMI2 (VPCOMPRESSW):
// FA_TARGET_TOPK, dispatched by use_avx512_topk() (cpu_features.h).
alignas(64) constexpr uint16_t kSlotIds[32] = {0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10,
                                               11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
                                               22, 23, 24, 25, 26, 27, 28, 29, 30, 31};

// Exact selection of count queries from their running top k and the chunk's shared hit list:
// one stable counting sort over the bins (query, distance), so that entries of equal distance
// stay in position order (the running entries, all earlier, first). For query j: run[j] holds
// its running best (take[j] entries (d << 32) | pos in (distance, position) order) and every
// entry has lo[j] <= d <= hi[j]. All of a query's entries are sorted, none dropped, into its
// own region of out (the regions follow each other, query 0 first; out holds 4 k + nh
// entries), so that a bin counter holds an absolute output slot: placing an entry is one
// read-modify-write with no clamp. Bin of (query j, distance d): j S + d, S a power of two
// > 64 W, taken from a hit entry (key << 18 | j << 16 | d) by one PEXT. On return best[j] is
// query j's region and take[j] = min(k, its entries): its first take[j] entries are its
// running top k. With raw (only when no query has running entries: a first chunk), the hit
// entries themselves are placed, in raw at the same slots, and best[j] is their offset in
// raw (as out + offset). bins: kMaxQueries * S.
FA_TARGET_TOPK void select_hits(const uint32_t* hits, int64_t nh, int64_t c0, const uint64_t* const* run,
                 int64_t* take, const int64_t* lo, const int64_t* hi, int count, int64_t k,
                 int log2S, int32_t* bins, uint64_t* out, uint64_t** best, uint32_t* raw) {
    const int64_t S = int64_t(1) << log2S;
    for (int j = 0; j < count; ++j) {
        int32_t* const c = bins + j * S;
        std::fill(c + lo[j], c + hi[j] + 1, 0);
        for (int64_t s = 0; s < take[j]; ++s) ++c[run[j][s] >> 32];
    }
    const uint32_t field = (3u << 16) | static_cast<uint32_t>(S - 1);  // j << log2S | d
    for (int64_t i = 0; i < nh; ++i) ++bins[_pext_u32(hits[i], field)];
    int64_t base = 0;
    for (int j = 0; j < count; ++j) {
        int32_t* const c = bins + j * S;
        // One vector pass over bins lo..hi: the first non-empty bin (the prefix starts there).
        int64_t first = hi[j] + 1;
        for (int64_t d = lo[j]; d <= hi[j]; d += 16) {
            const __mmask16 in = d + 16 <= hi[j] + 1 ? __mmask16(0xFFFF)
                                                     : static_cast<__mmask16>((1u << (hi[j] + 1 - d)) - 1);
            const __m512i v = _mm512_maskz_loadu_epi32(in, c + d);
            const __mmask16 nz = _mm512_test_epi32_mask(v, v);
            if (nz) {
                first = d + __builtin_ctz(nz);
                break;
            }
        }
        // c[d] becomes the first output slot of distance d.
        int64_t offset = base;
        for (int64_t d = first; d <= hi[j]; ++d) {
            const int64_t n = c[d];
            c[d] = static_cast<int32_t>(offset);
            offset += n;
        }
        best[j] = out + base;
        const int64_t n = offset - base;
        base = offset;
        for (int64_t s = 0; s < take[j]; ++s) out[c[run[j][s] >> 32]++] = run[j][s];
        take[j] = std::min<int64_t>(k, n);
    }
    if (raw != nullptr) {  // no running entries: the hits themselves are placed
        for (int64_t i = 0; i < nh; ++i) {
            const uint32_t e = hits[i];
            raw[bins[_pext_u32(e, field)]++] = e;
        }
        return;
    }
    for (int64_t i = 0; i < nh; ++i) {
        const uint32_t e = hits[i];
        const int32_t s = bins[_pext_u32(e, field)]++;
        out[s] = (static_cast<uint64_t>(e & 0xFFFF) << 32) | static_cast<uint64_t>(c0 + (e >> 18));
    }
}

// The running entries (d << 32) | (c0 + key) of n raw hit entries key << 18 | j << 16 | d.
FA_INLINE FA_TARGET_AVX512_VPOPCNT void entries_of_hits(const uint32_t* e, int64_t n, int64_t c0,
                                                        uint64_t* out) {
    const __m512i c = _mm512_set1_epi64(c0);
    const __m512i low16 = _mm512_set1_epi64(0xFFFF);
    for (int64_t i = 0; i < n; i += kBlockKeys) {
        const __mmask8 in = static_cast<__mmask8>((1u << std::min<int64_t>(kBlockKeys, n - i)) - 1);
        const __m512i x = _mm512_cvtepu32_epi64(_mm256_maskz_loadu_epi32(in, e + i));
        const __m512i v = _mm512_or_si512(_mm512_slli_epi64(_mm512_and_si512(x, low16), 32),
                                          _mm512_add_epi64(_mm512_srli_epi64(x, 18), c));
        _mm512_mask_storeu_epi64(out + i, in, v);
    }
}

// Writes one query's output row from its take best entries (d << 32) | pos: distances and
// positions, then the empty-slot tail (distance none, position -1), 8 slots per vector.
FA_INLINE FA_TARGET_AVX512_VPOPCNT void write_row(const uint64_t* best, int64_t take, int64_t k,
                                                  int64_t none, int32_t* od, int64_t* oi) {
    const __m512i low32 = _mm512_set1_epi64(0xFFFFFFFF);
    const __m512i empty_d = _mm512_set1_epi64(none);
    const __m512i empty_i = _mm512_set1_epi64(-1);
    for (int64_t s = 0; s < k; s += kBlockKeys) {
        const int64_t n = std::min<int64_t>(kBlockKeys, k - s);
        const __mmask8 in = static_cast<__mmask8>((1u << n) - 1);
        const int64_t m = std::max<int64_t>(0, std::min<int64_t>(n, take - s));
        const __mmask8 full = static_cast<__mmask8>((1u << m) - 1);
        const __m512i e = _mm512_maskz_loadu_epi64(full, best + s);
        const __m512i d = _mm512_mask_mov_epi64(empty_d, full, _mm512_srli_epi64(e, 32));
        _mm256_mask_storeu_epi32(od + s, in, _mm512_cvtepi64_epi32(d));
        _mm512_mask_storeu_epi64(oi + s, in, _mm512_mask_mov_epi64(empty_i, full, _mm512_and_si512(e, low32)));
    }
}

// write_row for a history scanned in one chunk (c0 = 0): its take best raw hit entries
// key << 18 | j << 16 | d are the output row, with no running list between; 16 slots per
// vector.
FA_INLINE FA_TARGET_AVX512_VPOPCNT void write_row_hits(const uint32_t* e, int64_t take,
                                                       int64_t k, int64_t none, int32_t* od,
                                                       int64_t* oi) {
    const __m512i low16 = _mm512_set1_epi32(0xFFFF);
    const __m512i empty_d = _mm512_set1_epi32(static_cast<int>(none));
    const __m512i empty_i = _mm512_set1_epi64(-1);
    for (int64_t s = 0; s < k; s += 16) {
        const int64_t n = std::min<int64_t>(16, k - s);
        const __mmask16 in = static_cast<__mmask16>((1u << n) - 1);
        const int64_t m = std::max<int64_t>(0, std::min<int64_t>(n, take - s));
        const __mmask16 full = static_cast<__mmask16>((1u << m) - 1);
        const __m512i x = _mm512_maskz_loadu_epi32(full, e + s);
        _mm512_mask_storeu_epi32(od + s, in, _mm512_mask_and_epi32(empty_d, full, x, low16));
        const __m512i pos = _mm512_srli_epi32(x, 18);
        const __m512i lo = _mm512_cvtepu32_epi64(_mm512_castsi512_si256(pos));
        const __m512i hi = _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(pos, 1));
        _mm512_mask_storeu_epi64(oi + s, static_cast<__mmask8>(in),
                                 _mm512_mask_mov_epi64(empty_i, static_cast<__mmask8>(full), lo));
        if (n > 8) {
            const __mmask8 full_hi = static_cast<__mmask8>(full >> 8);
            _mm512_mask_storeu_epi64(oi + s + 8, static_cast<__mmask8>(in >> 8),
                                     _mm512_mask_mov_epi64(empty_i, full_hi, hi));
        }
    }
}

// Keys are scanned in chunks of up to kChunkKeys, so that a chunk of the tile (512 KiB at
// W = 4) and its packed distances stay in L2 while every query block of a group reads it;
// each query carries its running top k from chunk to chunk.
constexpr int64_t kChunkKeys = 16384;
static_assert(kChunkKeys * kMaxQueries <= 65536, "hit ids (4 (key - c0) + j) must fit 16 bits");
constexpr int64_t kGroupBlocks = 8;  // query blocks sharing each chunk

// Per-thread scratch of the AVX-512 top-k: packed distances and minima of one block of
// queries over one chunk, each query's candidate list, and the running top k of the queries
// of a group.
class TileWorker {
   public:
    TileWorker(const int64_t* q, int64_t W, int64_t L, int64_t topk, int32_t* out_dist,
               int64_t* out_idx)
        : q_(q), W_(W), topk_(topk), out_dist_(out_dist), out_idx_(out_idx),
          nblocks_((std::min(L, kChunkKeys) + kBlockKeys - 1) / kBlockKeys),
          log2S_(64 - __builtin_clzll(static_cast<uint64_t>(64 * W + 1))),
          count_(static_cast<size_t>(kMaxQueries) << log2S_) {
        packed_.resize(static_cast<size_t>(kBlockKeys * std::max<int64_t>(nblocks_, 1)));
        mins_.resize(static_cast<size_t>(kBlockKeys * std::max<int64_t>(nblocks_, 1)));
        // every slot of every block, + one vector store
        hits_.resize(static_cast<size_t>(kMaxQueries * kBlockKeys * std::max<int64_t>(nblocks_, 1) + 16));
        hd_.resize(static_cast<size_t>(kMaxQueries * kBlockKeys * std::max<int64_t>(nblocks_, 1) + 32));
        hid_.resize(static_cast<size_t>(kMaxQueries * kBlockKeys * std::max<int64_t>(nblocks_, 1) + 32));
        // every running entry and hit of a block of queries
        slot_.resize(static_cast<size_t>(kMaxQueries * topk + kMaxQueries * kBlockKeys * std::max<int64_t>(nblocks_, 1)));
        masks_.resize(static_cast<size_t>(nblocks_ + 64));
        run_.resize(static_cast<size_t>(kGroupBlocks * kMaxQueries * topk));
    }

    // Top-k of queries ids[0..nq) (nq <= kGroupBlocks * qb), in blocks of qb <= kMaxQueries,
    // against the first n keys of a tile, or of a history's keys (see scan_packed).
    template <Layout kLayout>
    FA_TARGET_TOPK void run(const uint64_t* keys, const int64_t* rows, int64_t n,
                                      const int64_t* ids, int64_t nq, int64_t qb) {
        const int64_t nblk = (nq + qb - 1) / qb;
        std::fill(take_, take_ + kGroupBlocks * kMaxQueries, 0);
        guess_ = 0;  // (a run reads one history; a guess from another may be far off)
        // A history of one chunk: step writes the output rows itself (no running lists).
        const bool one_chunk = n > 0 && n <= kChunkKeys;
        for (int64_t c0 = 0; c0 < n; c0 += kChunkKeys) {
            const int64_t nc = std::min(kChunkKeys, n - c0);
            const uint64_t* ck = kLayout == Layout::kTable ? keys : keys + c0 * W_;
            const int64_t* cr = kLayout == Layout::kTable ? rows + c0 : rows;
            for (int64_t b = 0; b < nblk; ++b) {
                step<kLayout>(ck, cr, c0, nc, ids + b * qb,
                              static_cast<int>(std::min(qb, nq - b * qb)), b * kMaxQueries,
                              one_chunk);
            }
        }
        if (one_chunk) return;
        for (int64_t i = 0; i < nq; ++i) {
            const int64_t r = (i / qb) * kMaxQueries + i % qb;
            write_row(run_.data() + r * topk_, take_[r], topk_, 64 * W_ + 1,
                      out_dist_ + ids[i] * topk_, out_idx_ + ids[i] * topk_);
        }
    }

   private:
    // One block of count queries over the n keys of the chunk starting at position c0: merges
    // each query's candidates of the chunk into its running top k (run_ at r0 + j), or, when
    // the chunk is the whole history (only), writes the queries' output rows.
    template <Layout kLayout>
    FA_TARGET_TOPK void step(const uint64_t* keys, const int64_t* rows, int64_t c0,
                                       int64_t n, const int64_t* ids, int count, int64_t r0,
                                       bool only) {
        const uint64_t* qs[kMaxQueries];
        for (int j = 0; j < count; ++j) qs[j] = reinterpret_cast<const uint64_t*>(q_) + ids[j] * W_;
        const int64_t nblocks = (n + kBlockKeys - 1) / kBlockKeys;
        __m512i* const packed = reinterpret_cast<__m512i*>(packed_.data());
        __m512i* const mins = reinterpret_cast<__m512i*>(mins_.data());
        uint32_t* const masks = masks_.data();
        const ScanFn scan = pick_scan<kLayout>(W_, count);
        // A query whose running list is full admits no key beyond its k-th distance t (a
        // later key of equal distance loses on position), so g = t - 1 bounds its hits.
        const uint64_t* run[kMaxQueries];
        // Every entry of query j has lo[j] <= d <= hi[j] (lo bounds the bins selection clears).
        int64_t take[kMaxQueries], lo[kMaxQueries] = {0, 0, 0, 0}, hi[kMaxQueries];
        uint16_t g[kMaxQueries] = {0, 0, 0, 0};
        bool full = true;
        for (int j = 0; j < count; ++j) {
            take[j] = take_[r0 + j];
            run[j] = run_.data() + (r0 + j) * topk_;
            full &= take[j] == topk_;
        }
        if (full) {
            // Every query's bound is known before the scan (chunks after the first): the
            // scan compares each block against the bounds itself, with no minima, bounds()
            // or mask pass. (Absent queries' slots hold kNoKey > g = 0.)
            for (int j = 0; j < count; ++j) {
                const int64_t t = static_cast<int64_t>(run[j][topk_ - 1] >> 32);
                hi[j] = t;
                g[j] = static_cast<uint16_t>(std::max<int64_t>(t - 1, 0));
            }
            uint64_t gbits = 0;
            for (int j = 0; j < kMaxQueries; ++j) gbits |= static_cast<uint64_t>(g[j]) << (16 * j);
            scan(keys, rows, n, W_, 1, qs, packed, nullptr, gbits, masks);
        } else {
            // Groups of R blocks give about 4k minima: enough that the k-th of them is close
            // to the k-th distance, few enough that finding it is cheap.
            const int64_t R = std::max<int64_t>(1, nblocks / (4 * topk_ / kBlockKeys + 1));
            const int64_t ng = scan(keys, rows, n, W_, R, qs, packed, mins, 0, nullptr);
            uint16_t dmin[kMaxQueries];
            bounds(mins, ng, topk_, W_, guess_, g, dmin);
            guess_ = g[0];
            for (int j = 0; j < kMaxQueries; ++j) {
                hi[j] = g[j];
                lo[j] = dmin[j];
                if (j >= count || take[j] == 0) continue;
                lo[j] = std::min<int64_t>(lo[j], static_cast<int64_t>(run[j][0] >> 32));
                const int64_t t = static_cast<int64_t>(run[j][take[j] - 1] >> 32);
                hi[j] = std::max<int64_t>(g[j], t);
                if (take[j] == topk_) g[j] = static_cast<uint16_t>(std::min<int64_t>(g[j], t));
            }
            const __m512i gv = packed_of(g);
            for (int64_t i = 0; i < nblocks; ++i)
                masks[i] = _mm512_cmple_epu16_mask(_mm512_load_si512(packed + i), gv);
        }
        std::fill(masks + nblocks, masks + nblocks + 64, 0u);  // the last batch's padding

        // The hits (d <= g) of all queries in one pass: bit 4i + j of a block's compare mask
        // is key 8 blk + i for query j (absent queries' slots and tail lanes hold kNoKey > g).
        // Only ~k keys per query qualify, so most blocks of a long chunk have none: a bitmap
        // of the non-empty blocks of each batch of 64 (4 vector tests of the stored masks)
        // leads to them; a visited block's hits, of all queries, are appended in position
        // order by two compresses, with no per-query or per-hit branch.
        // A visited block appends its hits' uint16 distances and ids (slot s: 32 blk + s) to
        // two lists by one VPCOMPRESSW each; the entries (id << 16 | d) are then made 16 at
        // a time (the lists hold a vector of padding).
        const __m512i slots = _mm512_load_si512(kSlotIds);
        uint16_t* const hd = hd_.data();
        uint16_t* const hid = hid_.data();
        uint32_t* const hits = hits_.data();
        int64_t nh = 0;
        for (int64_t b0 = 0; b0 < nblocks; b0 += 64) {
            uint64_t hit = 0;
            for (int v = 0; v < 4; ++v) {
                const __m512i m = _mm512_loadu_si512(masks + b0 + 16 * v);
                hit |= static_cast<uint64_t>(_mm512_test_epi32_mask(m, m)) << (16 * v);
            }
            for (; hit; hit &= hit - 1) {
                const int64_t i = __builtin_ctzll(hit);
                const __m512i p = _mm512_load_si512(packed + b0 + i);
                const __m512i id = _mm512_add_epi16(slots, _mm512_set1_epi16(static_cast<short>(32 * (b0 + i))));
                const __mmask32 m = masks[b0 + i];
                _mm512_storeu_si512(hd + nh, _mm512_maskz_compress_epi16(m, p));
                _mm512_storeu_si512(hid + nh, _mm512_maskz_compress_epi16(m, id));
                nh += __builtin_popcount(m);
            }
        }
        for (int64_t i = 0; i < nh; i += 16) {
            const __m512i d = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(hd + i)));
            const __m512i id = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(hid + i)));
            _mm512_storeu_si512(hits + i, _mm512_or_si512(_mm512_slli_epi32(id, 16), d));
        }
        uint64_t* best[kMaxQueries];
        bool fresh = true;  // no running entries yet: the selection moves 32-bit hits
        for (int j = 0; j < count; ++j) fresh &= take[j] == 0;
        uint32_t* const raw = reinterpret_cast<uint32_t*>(slot_.data());
        select_hits(hits, nh, c0, run, take, lo, hi, count, topk_, log2S_, count_.data(),
                    slot_.data(), best, fresh ? raw : nullptr);
        if (only) {  // (fresh) the history's only chunk: its best hits are the answer
            for (int j = 0; j < count; ++j)
                write_row_hits(raw + (best[j] - slot_.data()), take[j], topk_, 64 * W_ + 1,
                               out_dist_ + ids[j] * topk_, out_idx_ + ids[j] * topk_);
            return;
        }
        for (int j = 0; j < count; ++j) {
            uint64_t* const r = run_.data() + (r0 + j) * topk_;
            if (fresh) entries_of_hits(raw + (best[j] - slot_.data()), take[j], c0, r);
            else std::copy(best[j], best[j] + take[j], r);
            take_[r0 + j] = take[j];
        }
    }

    const int64_t* q_;
    int64_t W_, topk_;
    int32_t* out_dist_;
    int64_t* out_idx_;
    int64_t nblocks_;  // blocks of the longest chunk
    int log2S_;        // bins per query in count_: 2^log2S_ > 64 W
    AlignedBuffer<uint64_t> packed_, mins_;  // one 8-lane vector per block / per group
    AlignedBuffer<uint32_t> hits_;
    AlignedBuffer<uint16_t> hd_, hid_;  // the hits' distances and ids, before hits_
    AlignedBuffer<uint32_t> masks_;  // one compare mask per block, + a batch of padding  // the hit list of one block of queries over one chunk
    AlignedBuffer<uint64_t> slot_;  // the selection's output: every entry of a block of queries
    AlignedBuffer<uint64_t> run_;   // the running top k of each query of a group
    int64_t take_[kGroupBlocks * kMaxQueries];
    uint16_t guess_ = 0;  // bounds' g of the previous block of this run (0: none yet)
    std::vector<int32_t> count_;
};

template <class Keys>
void hamming_topk_avx512(const int64_t* q, const int64_t* k, const int64_t* rows,
                         const int64_t* lengths, const int64_t* hist_index, int64_t B, int64_t U,
                         int64_t L, int64_t W, int64_t topk, int32_t* out_dist, int64_t* out_idx,
                         int nthreads) {
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

    // Per-thread scratch allocated before the region: a bad_alloc thrown inside it would
    // end in std::terminate instead of reaching Python as MemoryError.
    std::vector<TileWorker> workers;
    workers.reserve(static_cast<size_t>(nthreads));
    for (int i = 0; i < nthreads; ++i) workers.emplace_back(q, W, L, topk, out_dist, out_idx);

#pragma omp parallel num_threads(nthreads)
    {
        TileWorker& worker = workers[static_cast<size_t>(omp_get_thread_num())];
        for (const int64_t u : hot) {
            const int64_t n = lengths[u];
            const int64_t nblocks = (n + kBlockKeys - 1) / kBlockKeys;
#pragma omp for schedule(static)
            for (int64_t blk = 0; blk < nblocks; ++blk)
                tile_block(Keys::of(keys, rows, u, L, W), n, W, blk, shared);
            // Blocks small enough that every thread gets work, up to kMaxQueries; groups of
            // up to kGroupBlocks blocks share each chunk of keys.
            const int64_t nq = g.start[u + 1] - g.start[u];
            const int64_t qb = std::min<int64_t>(kMaxQueries, (nq + nthreads - 1) / nthreads);
            const int64_t nqb = (nq + qb - 1) / qb;
            const int64_t gb = std::max<int64_t>(1, std::min<int64_t>(kGroupBlocks, nqb / (4 * nthreads)));
            const int64_t ngroups = (nqb + gb - 1) / gb;
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < ngroups; ++i) {
                const int64_t first = i * gb * qb;
                worker.run<Layout::kTile>(shared, nullptr, n, g.order.data() + g.start[u] + first,
                                          std::min(gb * qb, nq - first), qb);
            }
            // (the implicit barrier keeps the next hot history from overwriting the tile)
        }
#pragma omp for schedule(dynamic, 1)
        for (size_t i = 0; i < cold.size(); ++i) {
            const int64_t u = cold[i];
            const Keys hk = Keys::of(keys, rows, u, L, W);
            constexpr int64_t kGroup = kGroupBlocks * kMaxQueries;
            for (int64_t first = g.start[u]; first < g.start[u + 1]; first += kGroup) {
                worker.run<Keys::kLayout>(hk.keys, hk.rows, lengths[u], g.order.data() + first,
                                          std::min<int64_t>(kGroup, g.start[u + 1] - first),
                                          kMaxQueries);
            }
        }
    }
}
#endif  // FASTATTN_X86

// The top-k of every query over the histories that Keys addresses (index values checked).
template <class Keys>
void hamming_topk_impl(const int64_t* q, const int64_t* k, const int64_t* rows,
                       const int64_t* lengths, const int64_t* hist_index, int64_t B, int64_t U,
                       int64_t L, int64_t W, int64_t topk, int32_t* out_dist, int64_t* out_idx,
                       int nthreads) {
    if (B == 0 || topk == 0) return;
#if FASTATTN_X86
    if (use_avx512_topk() && W <= kMaxTileW) {
        hamming_topk_avx512<Keys>(q, k, rows, lengths, hist_index, B, U, L, W, topk, out_dist,
                                  out_idx, nthreads);
        return;
    }
#endif
    const ScanRowsFn<Keys> scan = pick_scan_rows<Keys>();
    const uint64_t* qq = reinterpret_cast<const uint64_t*>(q);
    const uint64_t* kk = reinterpret_cast<const uint64_t*>(k);
    std::vector<TopkSelector> selectors;  // allocated before the region (see above)
    selectors.reserve(static_cast<size_t>(nthreads));
    for (int i = 0; i < nthreads; ++i) selectors.emplace_back(topk, L, W);
#pragma omp parallel num_threads(nthreads)
    {
        TopkSelector& sel = selectors[static_cast<size_t>(omp_get_thread_num())];
#pragma omp for schedule(dynamic, 4)
        for (int64_t b = 0; b < B; ++b) {
            const int64_t u = hist_index[b];
            sel.reset();
            scan(Keys::of(kk, rows, u, L, W), lengths[u], W, qq + b * W, sel);
            sel.finish(out_dist + b * topk, out_idx + b * topk);
        }
    }
}

// Every row map entry at a valid position must address the table (they come from Python,
// and the kernels read table rows unchecked). The scan is split into chunks of positions so
// that one long history also spreads over the threads; the reported position is the first
// bad one in row-major order, whatever the thread count, and the throw happens outside the
// parallel region.
void check_rows(const int64_t* rows, const int64_t* lengths, int64_t U, int64_t L, int64_t N,
                const char* fn, int nthreads) {
    constexpr int64_t kChunk = 1 << 14;
    const int64_t chunks = (L + kChunk - 1) / kChunk;
    const int64_t none = U * L;
    int64_t first = none;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(min : first)
    for (int64_t t = 0; t < U * chunks; ++t) {
        const int64_t u = t / chunks;
        const int64_t lo = (t % chunks) * kChunk;
        const int64_t hi = std::min(lengths[u], lo + kChunk);
        const int64_t* r = rows + u * L;
        // Branch-free test first (one unsigned compare covers r < 0 too), search only on failure.
        bool bad = false;
        for (int64_t l = lo; l < hi; ++l) bad |= static_cast<uint64_t>(r[l]) >= static_cast<uint64_t>(N);
        if (!bad) continue;
        for (int64_t l = lo; l < hi; ++l) {
            if (static_cast<uint64_t>(r[l]) >= static_cast<uint64_t>(N)) {
                first = std::min(first, u * L + l);
                break;
            }
        }
    }
    if (first == none) return;
    const int64_t u = first / L, l = first % L;
    // (named after the op-level argument, hist_rows, which is what the user passed)
    throw std::invalid_argument(std::string(fn) + ": hist_rows[" + std::to_string(u) + ", " +
                                std::to_string(l) + "] = " + std::to_string(rows[first]) +
                                " is outside [0, N=" + std::to_string(N) +
                                ") at a valid position (l < lengths[" + std::to_string(u) +
                                "] = " + std::to_string(lengths[u]) + ")");
}

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
    hamming_topk_impl<DenseKeys>(q, k, nullptr, lengths, hist_index, B, U, L, W, topk, out_dist,
                                 out_idx, nthreads);
}

void hamming_topk_rows(const int64_t* q, const int64_t* k, const int64_t* rows,
                       const int64_t* lengths, const int64_t* hist_index, int64_t B, int64_t N,
                       int64_t U, int64_t L, int64_t W, int64_t topk, int32_t* out_dist,
                       int64_t* out_idx, int nthreads) {
    const char* fn = "hamming_topk_rows";
    check_range(hist_index, B, 0, U, fn, "hist_index");
    check_range(lengths, U, 0, L + 1, fn, "lengths");
    check_rows(rows, lengths, U, L, N, fn, nthreads);
    hamming_topk_impl<TableKeys>(q, k, rows, lengths, hist_index, B, U, L, W, topk, out_dist,
                                 out_idx, nthreads);
}
}  // namespace fastattn
