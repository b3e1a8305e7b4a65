// unique_rows: the distinct ids of a batch of histories in order of first occurrence, and
// each position's index among them (the indexed form that hamming_topk_rows reads).
//
// Hashing only (no sort), each thread in tables of its own (no atomics on them), and an
// output that does not depend on the thread count:
//  1. Local dedup. The valid positions, in row-major order, are cut into chunks. Each
//     chunk's ids go through a table of its own (id -> local index): its distinct ids in
//     order of first occurrence form segment c, and each position gets its local index.
//     Repeats, most of a skewed batch, stop here.
//  2. Global dedup of the segments concatenated in chunk order ("entries"): an id's first
//     entry there is its global first occurrence. The entries are hash-partitioned by a
//     counting scatter that keeps every partition in entry order; one thread dedups a
//     whole partition (id -> first entry) and flags the first entries; a popcount prefix
//     over the flags ranks them: rank = index in unique_ids.
//  3. Each chunk reads back its entries from each partition in the order it scattered
//     them (one cursor per partition), which gives the rank of each of its entries with no
//     random writes, then writes hist_rows of its positions.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <vector>

#include "common.h"
#include "cpu_features.h"
#include "kernels.h"

namespace fastattn {
namespace {

// Positions per chunk of step 1. Larger chunks leave fewer entries to step 2 but need larger
// tables; 2^19 measured best on Zipf batches (a table of ~2-4 MiB), and a chunk is cut
// smaller when that gives each thread at least 4.
constexpr int64_t kMaxChunk = int64_t(1) << 19;
constexpr int64_t kMinChunk = 4096;
constexpr int64_t kBlock = 256;      // ids hashed at once
constexpr int64_t kAhead = 16;       // table slots are prefetched this many ids early
constexpr int kLogPartEntries = 14;  // ~16k entries per partition of step 2: a table in L2
constexpr int kMaxLogParts = 10;     // few enough write streams for the scatter

// splitmix64's finaliser: every input bit affects every output bit, so both the top bits
// (partition) and the low bits (table slot) are usable, whatever the ids look like.
FA_INLINE uint64_t mix64(int64_t id) {
    uint64_t x = static_cast<uint64_t>(id);
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

// out[i] = mix64(x[i]) for i < n; 8 at a time where the CPU allows (a 64-bit product by a
// constant as three 32 x 32 -> 64-bit products: AVX-512F has no 64-bit multiply).
using HashBlockFn = void (*)(const int64_t*, int64_t, uint64_t*);

void hash_block_default(const int64_t* x, int64_t n, uint64_t* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = mix64(x[i]);
}

#if FASTATTN_X86
// (maskz forms, as in hamming.cpp, for GCC's maybe-uninitialized warning)
FA_INLINE FA_TARGET_AVX512F __m512i mul_const_avx512(__m512i x, uint64_t k) {
    const __m512i klo = _mm512_set1_epi64(static_cast<long long>(k & 0xFFFFFFFFu));
    const __m512i khi = _mm512_set1_epi64(static_cast<long long>(k >> 32));
    const __m512i cross = _mm512_add_epi64(
        _mm512_maskz_mul_epu32(0xFF, _mm512_maskz_srli_epi64(0xFF, x, 32), klo),
        _mm512_maskz_mul_epu32(0xFF, x, khi));
    return _mm512_add_epi64(_mm512_maskz_mul_epu32(0xFF, x, klo),
                            _mm512_maskz_slli_epi64(0xFF, cross, 32));
}
FA_INLINE FA_TARGET_AVX512F __m512i xor_shift_avx512(__m512i x, unsigned s) {
    return _mm512_xor_si512(x, _mm512_maskz_srli_epi64(0xFF, x, s));
}
FA_TARGET_AVX512F void hash_block_avx512(const int64_t* x, int64_t n, uint64_t* out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m512i v = _mm512_loadu_si512(x + i);
        v = mul_const_avx512(xor_shift_avx512(v, 30), 0xbf58476d1ce4e5b9ULL);
        v = mul_const_avx512(xor_shift_avx512(v, 27), 0x94d049bb133111ebULL);
        _mm512_storeu_si512(out + i, xor_shift_avx512(v, 31));
    }
    for (; i < n; ++i) out[i] = mix64(x[i]);
}
#endif

HashBlockFn pick_hash_block() {
#if FASTATTN_X86
    if (cpu_features().avx512f) return hash_block_avx512;
#endif
    return hash_block_default;
}

// Portable popcount (__builtin_popcountll is a library call without -mpopcnt).
FA_INLINE int popcount64(uint64_t x) {
    x = x - ((x >> 1) & 0x5555555555555555ULL);
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return static_cast<int>((x * 0x0101010101010101ULL) >> 56);
}

// Bit k = (f[k] != 0) for the 64 bytes f[0..64).
FA_INLINE uint64_t pack_flags(const uint8_t* f) {
    uint64_t m = 0;
#if FASTATTN_X86
    const __m128i zero = _mm_setzero_si128();
    for (int k = 0; k < 4; ++k) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(f + 16 * k));
        const uint64_t z = static_cast<uint32_t>(_mm_movemask_epi8(_mm_cmpeq_epi8(v, zero)));
        m |= (~z & 0xFFFFu) << (16 * k);
    }
#else
    for (int k = 0; k < 64; ++k) m |= static_cast<uint64_t>(f[k] != 0) << k;
#endif
    return m;
}

// Open-addressing table (linear probing, at most half full): id -> index of the id in
// insertion order. Slots are marked empty by index 0 (indices are stored + 1), as any
// int64 may be an id.
template <typename T>
class IdTable {
   public:
    // For up to n ids. Sized after the previous use (the tables of one call see similar
    // data), so that it rarely grows.
    void reset(int64_t n) {
        const int64_t want = std::min(n, std::max<int64_t>(kMinIds, used_ + used_ / 4));
        size_ = 16;
        while (size_ < 2 * want) size_ *= 2;
        slots_.resize(static_cast<size_t>(size_));
        std::memset(static_cast<void*>(slots_.data()), 0, size_ * sizeof(Slot));
        used_ = 0;
    }
    int64_t size() const { return used_; }

    // out[i] = index of x[i] (hash h[i]) for i < n, inserting the new ids; on_new(i, index)
    // is called for each insertion. Slots are prefetched kAhead ids early so that misses
    // overlap; the slot pointer and mask stay in registers.
    template <class OnNew>
    FA_INLINE void index_block(const int64_t* x, const uint64_t* h, int64_t n, T* out,
                               OnNew&& on_new) {
        const Slot* s = slots_.data();
        uint64_t mask = static_cast<uint64_t>(size_ - 1);
        for (int64_t i = 0; i < std::min(n, kAhead); ++i) __builtin_prefetch(s + (h[i] & mask));
        for (int64_t i = 0; i < n; ++i) {
            if (i + kAhead < n) __builtin_prefetch(s + (h[i + kAhead] & mask));
            const int64_t id = x[i];
            uint64_t j = h[i] & mask;
            while (s[j].index != 0 && s[j].id != id) j = (j + 1) & mask;
            T d;
            if (s[j].index != 0) {
                d = s[j].index - 1;
            } else {
                d = insert(j, id);
                s = slots_.data();
                mask = static_cast<uint64_t>(size_ - 1);
                on_new(i, d);
            }
            out[i] = d;
        }
    }

   private:
    static constexpr int64_t kMinIds = 1024;
    struct Slot {
        int64_t id;
        T index;  // index + 1; 0 = empty
    };

    // Fills empty slot j; grows the table once it is half full.
    T insert(uint64_t j, int64_t id) {
        slots_.data()[j] = {id, static_cast<T>(++used_)};
        if (2 * used_ > size_) grow();
        return static_cast<T>(used_ - 1);
    }

    __attribute__((noinline)) void grow() {
        std::vector<Slot> old(slots_.data(), slots_.data() + size_);
        size_ *= 2;
        slots_.resize(static_cast<size_t>(size_));
        Slot* const s = slots_.data();
        std::memset(static_cast<void*>(s), 0, size_ * sizeof(Slot));
        const uint64_t mask = static_cast<uint64_t>(size_ - 1);
        for (const Slot& o : old) {
            if (o.index == 0) continue;
            uint64_t j = mix64(o.id) & mask;
            while (s[j].index != 0) j = (j + 1) & mask;
            s[j] = o;
        }
    }

    AlignedBuffer<Slot> slots_;
    int64_t size_ = 0;
    int64_t used_ = 0;
};

// Calls f(u, l0, l1, v) for the runs of valid positions u * L + l0 .. u * L + l1 - 1 (v:
// valid index of the first) that cover the valid indices v0 .. v1 - 1, in row-major order
// (vstart[u] = number of valid positions before row u, vstart[U] = total).
template <class F>
FA_INLINE void for_runs(const std::vector<int64_t>& vstart, const int64_t* lengths, int64_t v0,
                        int64_t v1, F&& f) {
    // The row holding v0 (empty rows share its vstart and come before it).
    int64_t u = std::upper_bound(vstart.begin(), vstart.end(), v0) - vstart.begin() - 1;
    for (int64_t v = v0; v < v1; ++u) {
        const int64_t l0 = v - vstart[u];
        const int64_t l1 = std::min(lengths[u], l0 + (v1 - v));
        if (l1 > l0) f(u, l0, l1, v);
        v += l1 - l0;
    }
}

// hist_rows is written once and not read back here: past the caches, with no read for
// ownership (half the memory traffic of a plain store).
FA_INLINE void stream_store(int64_t* p, int64_t x) {
#if FASTATTN_X86
    _mm_stream_si64(reinterpret_cast<long long*>(p), x);
#else
    *p = x;
#endif
}
FA_INLINE void stream_fence() {
#if FASTATTN_X86
    _mm_sfence();
#endif
}

// The O(U·L) scratch of step 1, kept between calls (ScratchLease, common.h: measured 20-40 ms
// of page faults in a 4M-position call otherwise). Holds ~14 bytes per position of the
// largest call so far.
struct StepOneScratch {
    AlignedBuffer<int64_t> seg_id;
    AlignedBuffer<uint16_t> seg_part;
    AlignedBuffer<uint64_t> loc;  // Pos[V], as 8-byte words
};

// Pos: the type of a valid index, entry or local index (uint32_t when U * L allows: half
// the scratch and table traffic).
template <typename Pos>
std::vector<int64_t> unique_rows_impl(const int64_t* ids, const int64_t* lengths, int64_t U,
                                      int64_t L, int64_t* hist_rows, int nthreads) {
    std::vector<int64_t> vstart(U + 1, 0);
    for (int64_t u = 0; u < U; ++u) vstart[u + 1] = vstart[u] + lengths[u];
    const int64_t V = vstart[U];

    // Positions past the lengths first: they take no part in the rest.
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 16)
    for (int64_t u = 0; u < U; ++u)
        std::fill(hist_rows + u * L + lengths[u], hist_rows + (u + 1) * L, int64_t(-1));
    if (V == 0) return {};

    // At least 4 chunks per thread (balance) unless that makes them tiny.
    const int64_t chunk = std::max(kMinChunk, std::min(kMaxChunk, (V + 4 * nthreads - 1) / (4 * nthreads)));
    const int64_t C = (V + chunk - 1) / chunk;
    // Partitions are the top bits of the hash: counted in step 1 for up to V entries, then
    // merged for the S entries there are. ((h >> 1) >> (63 - b) is 0 for b = 0, where
    // h >> 64 would be undefined.)
    int log_p1 = 0;
    while (log_p1 < kMaxLogParts && (V >> (log_p1 + kLogPartEntries)) > 0) ++log_p1;
    const int64_t P1 = int64_t(1) << log_p1;
    auto part1 = [log_p1](uint64_t h) { return static_cast<uint16_t>((h >> 1) >> (63 - log_p1)); };

    // 1. Local dedup. Segment c (seg_id, seg_part: its ids and their partitions) starts at
    //    c * chunk, of which it fills the first seg_n[c] slots (the untouched rest of the
    //    buffers costs no memory); loc[v] = local index of valid position v;
    //    count1[c * P1 + p] = entries of segment c in partition p.
    const HashBlockFn hash_block = pick_hash_block();
    ScratchLease<StepOneScratch> lease;
    lease.s->seg_id.resize(V);
    lease.s->seg_part.resize(V);
    lease.s->loc.resize((V * sizeof(Pos) + 7) / 8);
    int64_t* const seg_id = lease.s->seg_id.data();
    uint16_t* const seg_part = lease.s->seg_part.data();
    Pos* const loc = reinterpret_cast<Pos*>(lease.s->loc.data());
    std::vector<int64_t> seg_n(C);
    std::vector<int64_t> count1(C * P1, 0);
#pragma omp parallel num_threads(nthreads)
    {
        // kept per thread between calls (the OpenMP pool's threads persist): no fresh pages
        static thread_local IdTable<Pos> table;
        uint64_t hs[kBlock];
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < C; ++c) {
            const int64_t v0 = c * chunk, v1 = std::min(V, v0 + chunk);
            int64_t* const sid = seg_id + v0;
            uint16_t* const spart = seg_part + v0;
            int64_t* const cnt = count1.data() + c * P1;
            table.reset(v1 - v0);
            for_runs(vstart, lengths, v0, v1, [&](int64_t u, int64_t l0, int64_t l1, int64_t v) {
                for (int64_t b = l0; b < l1; b += kBlock) {
                    const int64_t* const x = ids + u * L + b;
                    const int64_t n = std::min(kBlock, l1 - b);
                    hash_block(x, n, hs);
                    table.index_block(x, hs, n, loc + v + (b - l0), [&](int64_t i, Pos d) {
                        sid[d] = x[i];
                        ++cnt[spart[d] = part1(hs[i])];
                    });
                }
            });
            seg_n[c] = table.size();
        }
    }
    std::vector<int64_t> soff(C + 1, 0);  // entry e = soff[c] + d is (segment c, index d)
    for (int64_t c = 0; c < C; ++c) soff[c + 1] = soff[c] + seg_n[c];
    const int64_t S = soff[C];

    // 2. Partition p = p1 >> shift holds slots pstart[p] .. pstart[p + 1]; count[c * P + p]
    //    = the first slot of segment c in partition p.
    int log_p = 0;
    while (log_p < log_p1 && (S >> (log_p + kLogPartEntries)) > 0) ++log_p;
    const int shift = log_p1 - log_p;
    const int64_t P = int64_t(1) << log_p;
    std::vector<int64_t> count(C * P, 0);
    for (int64_t c = 0; c < C; ++c)
        for (int64_t p1 = 0; p1 < P1; ++p1) count[c * P + (p1 >> shift)] += count1[c * P1 + p1];
    std::vector<int64_t> pstart(P + 1, 0);
    for (int64_t p = 0, off = 0; p < P; ++p) {
        pstart[p] = off;
        for (int64_t c = 0; c < C; ++c) {
            const int64_t n = count[c * P + p];
            count[c * P + p] = off;
            off += n;
        }
    }
    pstart[P] = S;
    AlignedBuffer<int64_t> part_id_buf(S);
    AlignedBuffer<Pos> part_entry_buf(S);  // the slot's entry; after the dedup, its id's first
    int64_t* const part_id = part_id_buf.data();
    Pos* const part_entry = part_entry_buf.data();
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t c = 0; c < C; ++c) {
        std::vector<int64_t> cur(count.begin() + c * P, count.begin() + (c + 1) * P);
        const int64_t* const sid = seg_id + c * chunk;
        const uint16_t* const spart = seg_part + c * chunk;
        for (int64_t d = 0; d < seg_n[c]; ++d) {
            const int64_t j = cur[spart[d] >> shift]++;
            part_id[j] = sid[d];
            part_entry[j] = static_cast<Pos>(soff[c] + d);
        }
    }

    // Dedup each partition: is_first[e] = 1 for the first entry of each id. Flags are bytes
    // (whole words of 64), so that threads never write the same word.
    const int64_t nwords = (S + 63) / 64;
    AlignedBuffer<uint8_t> is_first_buf(nwords * 64);
    uint8_t* const is_first = is_first_buf.data();
    std::memset(is_first, 0, nwords * 64);
#pragma omp parallel num_threads(nthreads)
    {
        // kept per thread between calls (the OpenMP pool's threads persist): no fresh pages
        static thread_local IdTable<Pos> table;
        std::vector<Pos> first;  // the first entry of each id of the partition
        uint64_t hs[kBlock];
        Pos index[kBlock];
#pragma omp for schedule(dynamic, 1)
        for (int64_t p = 0; p < P; ++p) {
            table.reset(pstart[p + 1] - pstart[p]);
            first.clear();
            for (int64_t b = pstart[p]; b < pstart[p + 1]; b += kBlock) {
                const int64_t n = std::min(kBlock, pstart[p + 1] - b);
                Pos* const entry = part_entry + b;
                hash_block(part_id + b, n, hs);
                table.index_block(part_id + b, hs, n, index, [&](int64_t i, Pos) {
                    first.push_back(entry[i]);
                    is_first[entry[i]] = 1;
                });
                for (int64_t i = 0; i < n; ++i) entry[i] = first[index[i]];
            }
        }
    }
    part_id_buf = AlignedBuffer<int64_t>();  // freed before the next allocations

    // bits[w]: the flags of entries 64 w .. 64 w + 63; word_rank[w] = first entries before
    // word w (a blocked parallel prefix sum); unique_ids = ids of the first entries.
    AlignedBuffer<uint64_t> bits_buf(nwords);
    AlignedBuffer<Pos> word_rank_buf(nwords);
    uint64_t* const bits = bits_buf.data();
    Pos* const word_rank = word_rank_buf.data();
    const int64_t nblk = std::min<int64_t>(nwords, 4 * nthreads);
    std::vector<int64_t> blk_sum(nblk + 1, 0);
    auto blk_begin = [nwords, nblk](int64_t b) { return nwords / nblk * b + std::min(b, nwords % nblk); };
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t b = 0; b < nblk; ++b) {
        int64_t s = 0;
        for (int64_t w = blk_begin(b); w < blk_begin(b + 1); ++w) {
            bits[w] = pack_flags(is_first + 64 * w);
            s += popcount64(bits[w]);
        }
        blk_sum[b + 1] = s;
    }
    is_first_buf = AlignedBuffer<uint8_t>();
    for (int64_t b = 0; b < nblk; ++b) blk_sum[b + 1] += blk_sum[b];
    std::vector<int64_t> unique_ids(blk_sum[nblk]);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t b = 0; b < nblk; ++b) {
        int64_t r = blk_sum[b];
        int64_t c = 0;  // the segment holding entry e (e only grows)
        for (int64_t w = blk_begin(b); w < blk_begin(b + 1); ++w) {
            word_rank[w] = static_cast<Pos>(r);
            for (uint64_t m = bits[w]; m; m &= m - 1) {
                const int64_t e = w * 64 + __builtin_ctzll(m);
                while (soff[c + 1] <= e) ++c;
                unique_ids[r++] = seg_id[c * chunk + e - soff[c]];
            }
        }
    }

    // 3. Per chunk: the rank of each entry of its segment, from its slots of each partition
    //    in scatter order, then hist_rows of its positions.
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<Pos> rank;
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < C; ++c) {
            std::vector<int64_t> cur(count.begin() + c * P, count.begin() + (c + 1) * P);
            const uint16_t* const spart = seg_part + c * chunk;
            rank.resize(seg_n[c]);
            for (int64_t d = 0; d < seg_n[c]; ++d) {
                const Pos f = part_entry[cur[spart[d] >> shift]++];
                const uint64_t below = bits[f >> 6] & ((uint64_t(1) << (f & 63)) - 1);
                rank[d] = static_cast<Pos>(word_rank[f >> 6] + popcount64(below));
            }
            for_runs(vstart, lengths, c * chunk, std::min(V, (c + 1) * chunk),
                     [&](int64_t u, int64_t l0, int64_t l1, int64_t v) {
                         int64_t* const out = hist_rows + u * L;
                         const Pos* const lv = loc + v - l0;
                         for (int64_t l = l0; l < l1; ++l) stream_store(out + l, rank[lv[l]]);
                     });
        }
        stream_fence();
    }
    return unique_ids;
}

}  // namespace

std::vector<int64_t> unique_rows(const int64_t* ids, const int64_t* lengths, int64_t U,
                                 int64_t L, int64_t* hist_rows, int nthreads) {
    check_range(lengths, U, 0, L + 1, "unique_rows", "lengths");
    if (U * L < (int64_t(1) << 31))
        return unique_rows_impl<uint32_t>(ids, lengths, U, L, hist_rows, nthreads);
    return unique_rows_impl<uint64_t>(ids, lengths, U, L, hist_rows, nthreads);
}

}  // namespace fastattn
