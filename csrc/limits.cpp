// Machine-limit micro-kernels for the benchmark roofline (fastattn.bench.measure).
//
// The roofline's XOR+popcount ceiling must come from a loop that does nothing else, never
// from a product kernel (a kernel "at 100% of itself" says nothing about the hardware).
// popcount_limit is that loop: queries register-blocked against in-cache keys laid out
// word-major, 8 keys per zmm (4 per ymm on AVX2), keeping only a running minimum per query
// lane, so that no store, selection or branch competes with XOR, POPCNT and ADD.
//
// Work per call: nq * n * kW words XOR+popcounted; the return value (the sum of the
// per-query minimum distances) keeps the compiler from dropping the loop and lets a test
// check the arithmetic against a plain computation.
#include <omp.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "common.h"
#include "cpu_features.h"
#include "kernels.h"

namespace fastattn {
namespace {

constexpr int kW = 4;   // 256-bit signatures, the benchmarks' size
constexpr int kQB = 4;  // queries per key load: 4 x kW broadcast words + accumulators fit in 32 zmm

// keys: n / kLanes blocks; block j holds word w of keys j*kLanes .. j*kLanes + kLanes - 1 as
// kLanes consecutive uint64 (the tile layout of hamming.cpp). q: kQB queries of kW words.
// Returns the sum over the kQB queries of their minimum distance.

uint64_t block_portable(const uint64_t* keys, int64_t n, const uint64_t* q) {
    uint64_t mn[kQB];
    for (int j = 0; j < kQB; ++j) mn[j] = ~uint64_t(0);
    for (int64_t b = 0; b < n / 8; ++b) {
        const uint64_t* t = keys + b * 8 * kW;
        for (int i = 0; i < 8; ++i) {
            for (int j = 0; j < kQB; ++j) {
                uint64_t d = 0;
                for (int w = 0; w < kW; ++w)
                    d += static_cast<uint64_t>(__builtin_popcountll(t[w * 8 + i] ^ q[j * kW + w]));
                mn[j] = std::min(mn[j], d);
            }
        }
    }
    uint64_t s = 0;
    for (int j = 0; j < kQB; ++j) s += mn[j];
    return s;
}

#if FASTATTN_X86
FA_TARGET_POPCNT uint64_t block_popcnt(const uint64_t* keys, int64_t n, const uint64_t* q) {
    return block_portable(keys, n, q);  // the same loop, compiled with the POPCNT instruction
}

FA_TARGET_AVX512_VPOPCNT uint64_t block_avx512(const uint64_t* keys, int64_t n,
                                               const uint64_t* q) {
    __m512i qv[kQB][kW], mn[kQB];
    for (int j = 0; j < kQB; ++j) {
        for (int w = 0; w < kW; ++w) qv[j][w] = _mm512_set1_epi64(static_cast<long long>(q[j * kW + w]));
        mn[j] = _mm512_set1_epi64(-1);
    }
    for (int64_t b = 0; b < n / 8; ++b) {
        const uint64_t* t = keys + b * 8 * kW;
        __m512i acc[kQB];
        for (int w = 0; w < kW; ++w) {
            const __m512i kv = _mm512_loadu_si512(t + w * 8);
            for (int j = 0; j < kQB; ++j) {
                const __m512i c = _mm512_popcnt_epi64(_mm512_xor_si512(kv, qv[j][w]));
                acc[j] = w == 0 ? c : _mm512_add_epi64(acc[j], c);
            }
        }
        for (int j = 0; j < kQB; ++j) mn[j] = _mm512_min_epu64(mn[j], acc[j]);
    }
    uint64_t s = 0;
    for (int j = 0; j < kQB; ++j) s += _mm512_reduce_min_epu64(mn[j]);
    return s;
}

// AVX2 has no vector popcount: bytes are counted by two 16-entry table lookups (VPSHUFB on
// the low and high nibbles), summed over the kW words (at most 8 * kW = 32 per byte, no
// overflow), and VPSADBW adds each key's 8 byte counts. A 4-key block is half a tile block.
FA_TARGET_AVX2 uint64_t block_avx2(const uint64_t* keys, int64_t n, const uint64_t* q) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i zero = _mm256_setzero_si256();
    const __m256i high = _mm256_set1_epi64x(static_cast<long long>(0xFFFFFFFF00000000ull));
    __m256i qv[kQB][kW], mn[kQB];
    for (int j = 0; j < kQB; ++j) {
        for (int w = 0; w < kW; ++w) qv[j][w] = _mm256_set1_epi64x(static_cast<long long>(q[j * kW + w]));
        mn[j] = _mm256_set1_epi32(-1);
    }
    for (int64_t b = 0; b < n / 8; ++b) {
        for (int half = 0; half < 2; ++half) {
            const uint64_t* t = keys + b * 8 * kW + half * 4;
            __m256i acc[kQB];
            for (int w = 0; w < kW; ++w) {
                const __m256i kv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + w * 8));
                for (int j = 0; j < kQB; ++j) {
                    const __m256i x = _mm256_xor_si256(kv, qv[j][w]);
                    const __m256i c = _mm256_add_epi8(
                        _mm256_shuffle_epi8(lut, _mm256_and_si256(x, low)),
                        _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x, 4), low)));
                    acc[j] = w == 0 ? c : _mm256_add_epi8(acc[j], c);
                }
            }
            // Each key's count sits in the low half of a 64-bit lane; setting the high halves
            // to all ones lets a 32-bit unsigned min (AVX2 has no 64-bit one) keep the counts.
            for (int j = 0; j < kQB; ++j)
                mn[j] = _mm256_min_epu32(mn[j], _mm256_or_si256(_mm256_sad_epu8(acc[j], zero), high));
        }
    }
    uint64_t s = 0;
    for (int j = 0; j < kQB; ++j) {
        alignas(32) uint32_t m[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(m), mn[j]);
        s += *std::min_element(m, m + 8);
    }
    return s;
}
#endif

using BlockFn = uint64_t (*)(const uint64_t*, int64_t, const uint64_t*);

BlockFn pick(const std::string& isa) {
#if FASTATTN_X86
    if (isa == "avx512") {
        if (!use_avx512_vpopcnt()) throw std::invalid_argument("popcount_limit: AVX-512 VPOPCNTQ is not available here");
        return block_avx512;
    }
    if (isa == "avx2") {
        if (!use_avx2()) throw std::invalid_argument("popcount_limit: AVX2 is not available here");
        return block_avx2;
    }
    if (isa == "popcnt") {
        if (!use_popcnt()) throw std::invalid_argument("popcount_limit: POPCNT is not available here");
        return block_popcnt;
    }
#endif
    if (isa == "default") return block_portable;
    throw std::invalid_argument("popcount_limit: isa must be avx512, avx2, popcnt or default "
                                "(as this CPU allows), got '" + isa + "'");
}

}  // namespace

std::vector<std::string> popcount_limit_isas() {
    std::vector<std::string> out;
#if FASTATTN_X86
    if (use_avx512_vpopcnt()) out.push_back("avx512");
    if (use_avx2()) out.push_back("avx2");
    if (use_popcnt()) out.push_back("popcnt");
#endif
    out.push_back("default");
    return out;
}

uint64_t popcount_limit(const int64_t* keys, int64_t n, const int64_t* q, int64_t nq,
                        const std::string& isa, int nthreads) {
    const BlockFn block = pick(isa);
    const uint64_t* const t = reinterpret_cast<const uint64_t*>(keys);
    const uint64_t* const qq = reinterpret_cast<const uint64_t*>(q);
    const int64_t nqb = nq / kQB;
    uint64_t total = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+ : total)
    for (int64_t i = 0; i < nqb; ++i) total += block(t, n, qq + i * kQB * kW);
    return total;
}

}  // namespace fastattn
