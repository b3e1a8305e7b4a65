// SimHash signatures: bit j of row i is 1 iff (x @ planes)[i, j] > 0.
//
// The projection is never written out. planes is packed into panels of 64 columns (one
// output word each); a register-blocked AVX-512 microkernel keeps MR rows x 64 columns of
// accumulators in registers over the whole D loop, then turns them into 64 bits with
// compare-into-mask. Accumulation is in the input precision (fp32 / fp64), as the spec says.
// Bits past NB come from zero-padded plane columns: a projection of exactly 0 is not > 0.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu_features.h"
#include "kernels.h"

namespace fastattn {
namespace {

constexpr int kPanel = 64;          // plane columns per panel = bits per output word
constexpr int64_t kRowChunk = 192;  // rows per parallel task: a multiple of both MRs below

// Panel p is a (D, 64) row-major copy of planes[:, 64p : 64p + 64], zero past NB.
template <typename T>
void pack_planes(const T* planes, int64_t D, int64_t NB, int64_t W, T* packed) {
    for (int64_t p = 0; p < W; ++p) {
        const int64_t j0 = p * kPanel;
        const int64_t cols = std::min<int64_t>(kPanel, NB - j0);
        for (int64_t d = 0; d < D; ++d) {
            T* dst = packed + (p * D + d) * kPanel;
            std::memcpy(dst, planes + d * NB + j0, cols * sizeof(T));
            std::fill(dst + cols, dst + kPanel, T(0));
        }
    }
}

// Portable body: one row x one panel at a time, 64 accumulators the compiler vectorises.
template <typename T>
FA_INLINE void sign_rows_generic(const T* x, int64_t rows, int64_t D, const T* packed,
                                 int64_t W, int64_t* out) {
    for (int64_t r = 0; r < rows; ++r) {
        const T* xr = x + r * D;
        for (int64_t p = 0; p < W; ++p) {
            const T* panel = packed + p * D * kPanel;
            T acc[kPanel] = {};
            for (int64_t d = 0; d < D; ++d) {
                const T xd = xr[d];
                for (int j = 0; j < kPanel; ++j) acc[j] += xd * panel[d * kPanel + j];
            }
            uint64_t word = 0;
            for (int j = 0; j < kPanel; ++j) word |= static_cast<uint64_t>(acc[j] > T(0)) << j;
            out[r * W + p] = static_cast<int64_t>(word);
        }
    }
}

template <typename T>
void sign_rows_default(const T* x, int64_t rows, int64_t D, const T* packed, int64_t W,
                       int64_t* out) {
    sign_rows_generic(x, rows, D, packed, W, out);
}

#if FASTATTN_X86
template <typename T>
FA_TARGET_AVX2 void sign_rows_avx2(const T* x, int64_t rows, int64_t D, const T* packed,
                                   int64_t W, int64_t* out) {
    sign_rows_generic(x, rows, D, packed, W, out);
}

template <typename T>
struct Avx512;

template <>
struct Avx512<float> {
    using V = __m512;
    static constexpr int kLanes = 16;
    static constexpr int kRows = 6;  // 6 rows x 4 vectors = 24 accumulators of 32 zmm
    FA_TARGET_AVX512F static V zero() { return _mm512_setzero_ps(); }
    FA_TARGET_AVX512F static V load(const float* p) { return _mm512_load_ps(p); }
    FA_TARGET_AVX512F static V set1(float v) { return _mm512_set1_ps(v); }
    FA_TARGET_AVX512F static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    // _CMP_GT_OQ: ordered, so NaN gives 0.
    FA_TARGET_AVX512F static uint64_t positive(V v) {
        return _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ);
    }
};

template <>
struct Avx512<double> {
    using V = __m512d;
    static constexpr int kLanes = 8;
    static constexpr int kRows = 3;  // 3 rows x 8 vectors = 24 accumulators
    FA_TARGET_AVX512F static V zero() { return _mm512_setzero_pd(); }
    FA_TARGET_AVX512F static V load(const double* p) { return _mm512_load_pd(p); }
    FA_TARGET_AVX512F static V set1(double v) { return _mm512_set1_pd(v); }
    FA_TARGET_AVX512F static V fmadd(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
    FA_TARGET_AVX512F static uint64_t positive(V v) {
        return _mm512_cmp_pd_mask(v, _mm512_setzero_pd(), _CMP_GT_OQ);
    }
};

// MR rows of x against one 64-column panel: writes one word per row (row stride W).
template <typename T, int MR>
FA_TARGET_AVX512F void sign_block_avx512(const T* x, int64_t D, const T* panel, int64_t W,
                                         int64_t* out) {
    using A = Avx512<T>;
    constexpr int NV = kPanel / A::kLanes;
    typename A::V acc[MR][NV];
    for (int r = 0; r < MR; ++r)
        for (int c = 0; c < NV; ++c) acc[r][c] = A::zero();
    for (int64_t d = 0; d < D; ++d) {
        const T* b = panel + d * kPanel;
        for (int r = 0; r < MR; ++r) {
            const typename A::V xv = A::set1(x[r * D + d]);
            for (int c = 0; c < NV; ++c) acc[r][c] = A::fmadd(xv, A::load(b + c * A::kLanes), acc[r][c]);
        }
    }
    for (int r = 0; r < MR; ++r) {
        uint64_t word = 0;
        for (int c = 0; c < NV; ++c) word |= A::positive(acc[r][c]) << (c * A::kLanes);
        out[r * W] = static_cast<int64_t>(word);
    }
}

// Rows in blocks of MR; the remainder recurses into smaller register blocks.
template <typename T, int MR>
FA_TARGET_AVX512F void sign_panel_avx512(const T* x, int64_t rows, int64_t D, const T* panel,
                                         int64_t W, int64_t* out) {
    int64_t r = 0;
    for (; r + MR <= rows; r += MR) sign_block_avx512<T, MR>(x + r * D, D, panel, W, out + r * W);
    if constexpr (MR > 1) {
        if (r < rows) sign_panel_avx512<T, MR - 1>(x + r * D, rows - r, D, panel, W, out + r * W);
    }
}

// Panel-outer: one panel (D x 64, 32 KiB for D = 128 fp32) stays in L1 while the rows of
// the chunk stream past it.
template <typename T>
void sign_rows_avx512(const T* x, int64_t rows, int64_t D, const T* packed, int64_t W,
                      int64_t* out) {
    for (int64_t p = 0; p < W; ++p)
        sign_panel_avx512<T, Avx512<T>::kRows>(x, rows, D, packed + p * D * kPanel, W, out + p);
}

// ---- fp32 on AMX-BF16 tiles ------------------------------------------------------------
// Split x = xh + xl + xr and planes p = ph + pl + pr into bf16 hi/lo parts (|xr| <= 2^-16|x|).
// One bf16 GEMM with K = 3·Dp computes xh·ph + xl·ph + xh·pl in fp32 (two parts, K = 2·Dp,
// when the planes are exact in bf16, as make_planes draws them: pl = pr = 0). Per term the
// dropped products are at most 3.01·2^-16·|x_i||p_i| (1.01·2^-16 with two parts), and the
// tile's fp32 sum of K products adds at most K·2^-24 of sum|x_i||p_i| <= ||x||·||p_j||. A bit
// whose approximate projection lies within tau·||x||·||p_j|| of zero (tau: those bounds, an
// fp32 evaluation's own D·2^-24, and a 1.25 margin) is recomputed in fp32; every other bit
// already has the sign of the exact projection, so the result equals the fp32 kernels' bits
// everywhere outside DESIGN's 1e-5 zone. The tiles flush bf16 and fp32 subnormals: rows whose
// norm lies outside [kNormMin, kNormMax] (and non-finite rows) take the fp32 kernel whole,
// which bounds the flushed amounts far below the zone and rules out overflow.
constexpr int64_t kTile = 16;        // tile rows; 16 fp32 columns per C tile
constexpr int64_t kKStep = 32;       // bf16 per A tile row (64 bytes)
constexpr float kNormMin = 1e-15f, kNormMax = 1e15f;

struct AmxPlan {
    int64_t D = 0, NB = 0, W = 0, Dp = 0, K = 0, KS = 0, CT = 0;
    AlignedBuffer<uint16_t> b;    // (KS, CT) tiles of 16 x 32 bf16, VNNI pairs along K
    AlignedBuffer<float> pt;      // planes transposed (NB, D), for the fix-up
    AlignedBuffer<float> zone;    // (CT·16,) tau·||p_j||; -1 for padding columns
    bool ok = false;              // plane norms in range: the tiles may be used
};

inline uint16_t to_bf16(float f) {  // round to nearest even (finite f)
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}
inline float from_bf16(uint16_t h) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

void plan_amx(const float* planes, int64_t D, int64_t NB, int64_t W, AmxPlan& plan) {
    plan.D = D;
    plan.NB = NB;
    plan.W = W;
    plan.Dp = (D + kKStep - 1) / kKStep * kKStep;
    plan.CT = W * (kPanel / kTile);
    bool exact = true;  // planes exact in bf16: two parts suffice
    double norm_min = INFINITY, norm_max = 0;
    plan.pt.resize(static_cast<size_t>(NB * D));
    std::vector<double> norm(NB, 0.0);
    for (int64_t d = 0; d < D; ++d)
        for (int64_t j = 0; j < NB; ++j) {
            const float v = planes[d * NB + j];
            plan.pt.data()[j * D + d] = v;
            norm[j] += static_cast<double>(v) * v;
            if (std::isfinite(v) && from_bf16(to_bf16(v)) != v) exact = false;
        }
    for (int64_t j = 0; j < NB; ++j) {
        norm[j] = std::sqrt(norm[j]);
        norm_min = std::min(norm_min, norm[j]);
        norm_max = std::max(norm_max, norm[j]);
    }
    plan.ok = std::isfinite(norm_max) && norm_min >= kNormMin && norm_max <= kNormMax;
    if (!plan.ok) return;
    const int64_t parts = exact ? 2 : 3;
    plan.K = parts * plan.Dp;
    plan.KS = plan.K / kKStep;
    const double u16 = std::ldexp(1.0, -16), u24 = std::ldexp(1.0, -24);
    const double tau = 1.25 * ((exact ? 1.01 : 3.01) * u16 + (plan.K + 2) * u24 * 1.01 + D * u24);
    plan.zone.resize(static_cast<size_t>(plan.CT * kTile));
    for (int64_t j = 0; j < plan.CT * kTile; ++j)
        plan.zone.data()[j] = j < NB ? static_cast<float>(tau * norm[j]) : -1.0f;
    // B' = [ph; ph; pl] (or [ph; ph]) against A' = [xh | xl | xh], each part Dp long.
    auto value = [&](int64_t k, int64_t n) -> uint16_t {
        const int64_t part = k / plan.Dp, d = k % plan.Dp;
        if (d >= D || n >= NB) return 0;
        const float v = planes[d * NB + n];
        const uint16_t h = to_bf16(v);
        return part == 2 ? to_bf16(v - from_bf16(h)) : h;
    };
    plan.b.resize(static_cast<size_t>(plan.KS * plan.CT * kTile * kKStep));
    uint16_t* b = plan.b.data();
    for (int64_t s = 0; s < plan.KS; ++s)
        for (int64_t t = 0; t < plan.CT; ++t)
            for (int64_t kk = 0; kk < kKStep / 2; ++kk)
                for (int64_t n = 0; n < kTile; ++n)
                    for (int64_t e = 0; e < 2; ++e)
                        b[((s * plan.CT + t) * kTile + kk) * kKStep + n * 2 + e] =
                            value(s * kKStep + kk * 2 + e, t * kTile + n);
}

// Per-thread scratch of the AMX path: A' rows of a chunk, one 32 x 32 C block, row norms.
struct AmxScratch {
    int64_t K = 0;
    AlignedBuffer<uint16_t> a;
    AlignedBuffer<float> c;
    AlignedBuffer<float> norm;
    void size_for(int64_t k) {
        K = k;
        a.resize(static_cast<size_t>(kRowChunk * k));
        c.resize(2 * kTile * 2 * kTile);
        norm.resize(kRowChunk);
    }
};

struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// Signs n <= kRowChunk rows; row i is x + rows[i]·D (rows == nullptr: x + i·D). `packed` is
// the fp32 kernel's panels, for the rows the tiles must not take.
FA_TARGET_AMX void sign_rows_amx(const float* x, const int64_t* rows, int64_t n,
                                 const AmxPlan& plan, const float* packed, AmxScratch& scratch,
                                 int64_t* out) {
    const int64_t D = plan.D, Dp = plan.Dp, K = plan.K, W = plan.W;
    uint16_t* a = scratch.a.data();
    float* norm = scratch.norm.data();
    auto row = [&](int64_t i) { return x + (rows != nullptr ? rows[i] : i) * D; };
    // A' = [xh | xl | xh] (the third part only with three), zero past D and past n rows.
    const int64_t n_pad = (n + 2 * kTile - 1) / (2 * kTile) * (2 * kTile);
    for (int64_t i = 0; i < n_pad; ++i) {
        uint16_t* ai = a + i * K;
        if (i >= n) {
            std::memset(ai, 0, K * sizeof(uint16_t));
            continue;
        }
        if (rows != nullptr && i + 8 < n) {
            const float* ahead = row(i + 8);
            for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(ahead + d);
        }
        const float* xi = row(i);
        __m512 sq = _mm512_setzero_ps();
        for (int64_t d = 0; d < Dp; d += 16) {
            const int64_t left = D - d;
            const __mmask16 m = left >= 16 ? 0xFFFF
                                : left <= 0 ? 0
                                            : static_cast<__mmask16>((1u << left) - 1);
            const __m512 v = _mm512_maskz_loadu_ps(m, xi + d);
            sq = _mm512_fmadd_ps(v, v, sq);
            const __m256bh h = _mm512_cvtneps_pbh(v);
            const __m512 hf = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(h)), 16));
            const __m256bh l = _mm512_cvtneps_pbh(_mm512_sub_ps(v, hf));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(ai + d), reinterpret_cast<__m256i>(h));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(ai + Dp + d), reinterpret_cast<__m256i>(l));
            if (K > 2 * Dp)
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(ai + 2 * Dp + d), reinterpret_cast<__m256i>(h));
        }
        norm[i] = std::sqrt(_mm512_reduce_add_ps(sq));
    }
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = kTile;
    }
    _tile_loadconfig(&cfg);
    float* c = scratch.c.data();
    const uint16_t* b = plan.b.data();
    const float* zone = plan.zone.data();
    uint32_t* half = reinterpret_cast<uint32_t*>(out);  // 32 bits per C block, little endian
    for (int64_t i0 = 0; i0 < n; i0 += 2 * kTile) {
        const uint16_t* a0 = a + i0 * K;
        const uint16_t* a1 = a0 + kTile * K;
        for (int64_t t = 0; t < plan.CT; t += 2) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t s = 0; s < plan.KS; ++s) {
                const uint16_t* bs = b + (s * plan.CT + t) * kTile * kKStep;
                _tile_loadd(4, a0 + s * kKStep, K * 2);
                _tile_loadd(6, bs, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_loadd(7, bs + kTile * kKStep, 64);
                _tile_dpbf16ps(1, 4, 7);
                _tile_loadd(5, a1 + s * kKStep, K * 2);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, c, 128);
            _tile_stored(1, c + kTile, 128);
            _tile_stored(2, c + kTile * 32, 128);
            _tile_stored(3, c + kTile * 32 + kTile, 128);
            const int64_t j0 = t * kTile;
            const __m512 z0 = _mm512_loadu_ps(zone + j0), z1 = _mm512_loadu_ps(zone + j0 + kTile);
            for (int64_t r = 0; r < 2 * kTile && i0 + r < n; ++r) {
                const float* cr = c + r * 32;
                const __m512 v0 = _mm512_loadu_ps(cr), v1 = _mm512_loadu_ps(cr + kTile);
                uint32_t bits = _mm512_cmp_ps_mask(v0, _mm512_setzero_ps(), _CMP_GT_OQ) |
                                (static_cast<uint32_t>(_mm512_cmp_ps_mask(v1, _mm512_setzero_ps(), _CMP_GT_OQ)) << 16);
                const __m512 nr = _mm512_set1_ps(norm[i0 + r]);
                uint32_t fix = _mm512_cmp_ps_mask(_mm512_abs_ps(v0), _mm512_mul_ps(nr, z0), _CMP_LE_OQ) |
                               (static_cast<uint32_t>(_mm512_cmp_ps_mask(_mm512_abs_ps(v1), _mm512_mul_ps(nr, z1), _CMP_LE_OQ)) << 16);
                const float* xi = row(i0 + r);
                while (fix != 0) {
                    const int bit = __builtin_ctz(fix);
                    fix &= fix - 1;
                    const uint32_t one = 1u << bit;
                    bits = dot(xi, plan.pt.data() + (j0 + bit) * D, D) > 0.0f ? bits | one : bits & ~one;
                }
                half[(i0 + r) * W * 2 + j0 / 32] = bits;
            }
        }
    }
    _tile_release();
    // Rows the tiles must not take (norm out of range, NaN or Inf): the fp32 kernel, whole.
    for (int64_t i = 0; i < n; ++i) {
        const float nr = norm[i];
        if (nr >= kNormMin && nr <= kNormMax) continue;
        for (int64_t p = 0; p < W; ++p)
            sign_block_avx512<float, 1>(row(i), D, packed + p * D * kPanel, W, out + i * W + p);
    }
}
#endif  // FASTATTN_X86

// Copies rows[0 .. n) of the table x (row stride D) into buf, prefetching a few rows ahead:
// the rows are scattered across a table far larger than the caches, so without the
// prefetch each one waits for its own misses. The copy then sits in L2 while the kernel
// reads it W times.
template <typename T>
FA_INLINE void gather_rows(const T* x, const int64_t* rows, int64_t n, int64_t D, T* buf) {
    constexpr int64_t kAhead = 8;
    const int64_t line = 64 / sizeof(T);
    for (int64_t r = 0; r < n; ++r) {
        if (r + kAhead < n) {
            const T* ahead = x + rows[r + kAhead] * D;
            for (int64_t d = 0; d < D; d += line) __builtin_prefetch(ahead + d);
        }
        std::memcpy(buf + r * D, x + rows[r] * D, D * sizeof(T));
    }
}

// rows == nullptr: sign x's N rows; else sign x[rows[i]] for i < N (rows already checked).
template <typename T>
void simhash_sign_impl(const T* x, const int64_t* rows, const T* planes, int64_t N, int64_t D,
                       int64_t NB, int64_t* out, int nthreads) {
    const int64_t W = (NB + kPanel - 1) / kPanel;
    if (N == 0 || W == 0) return;
    AlignedBuffer<T> packed(static_cast<size_t>(W * D * kPanel));
    pack_planes(planes, D, NB, W, packed.data());

    using RowsFn = void (*)(const T*, int64_t, int64_t, const T*, int64_t, int64_t*);
    RowsFn rows_fn = sign_rows_default<T>;
#if FASTATTN_X86
    if (use_avx512f()) {
        rows_fn = sign_rows_avx512<T>;
    } else if (use_avx2()) {
        rows_fn = sign_rows_avx2<T>;
    }
#endif
    const int64_t chunks = (N + kRowChunk - 1) / kRowChunk;
    const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, chunks)));
#if FASTATTN_X86
    if constexpr (std::is_same_v<T, float>) {
        if (use_amx_bf16()) {
            AmxPlan plan;
            plan_amx(planes, D, NB, W, plan);
            if (plan.ok) {
                std::vector<AmxScratch> scratch(threads);
                for (auto& sc : scratch) sc.size_for(plan.K);
                const float* pk = packed.data();
#pragma omp parallel for num_threads(threads) schedule(static)
                for (int64_t c = 0; c < chunks; ++c) {
                    const int64_t r0 = c * kRowChunk;
                    const int64_t n = std::min(kRowChunk, N - r0);
                    sign_rows_amx(rows != nullptr ? x : x + r0 * D,
                                  rows != nullptr ? rows + r0 : nullptr, n, plan, pk,
                                  scratch[omp_get_thread_num()], out + r0 * W);
                }
                return;
            }
        }
    }
#endif
    // One gather buffer per thread, allocated before the parallel region (an allocation
    // failure inside it could not be reported).
    AlignedBuffer<T> gathered(rows != nullptr ? static_cast<size_t>(threads * kRowChunk * D) : 0);
    const T* pk = packed.data();
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t r0 = c * kRowChunk;
        const int64_t n = std::min(kRowChunk, N - r0);
        const T* src = x + r0 * D;
        if (rows != nullptr) {
            T* buf = gathered.data() + omp_get_thread_num() * kRowChunk * D;
            gather_rows(x, rows + r0, n, D, buf);
            src = buf;
        }
        rows_fn(src, n, D, pk, W, out + r0 * W);
    }
}

// Gathered rows are signed in increasing row order, then scattered back: a batch's distinct
// rows (first-occurrence order) are scattered over a table far larger than the caches and
// the TLB, and read in that order each one costs a page walk and a miss (measured 3x the
// whole signing time on a 1M x 128 table). Each row's signature depends on that row only,
// so the result is the same bit for bit. Below kSortMin rows the sort does not pay.
constexpr int64_t kSortMin = 4096;
constexpr int kRadixBits = 11;

// Stable LSD radix sort of rows[0 .. M) (values in [0, n_table)): sorted[i] = rows[order[i]].
void sort_rows(const int64_t* rows, int64_t M, int64_t n_table, std::vector<int64_t>& sorted,
               std::vector<int64_t>& order) {
    int bits = 0;
    while (bits < 63 && (int64_t(1) << bits) < n_table) ++bits;
    sorted.assign(rows, rows + M);
    order.resize(M);
    for (int64_t i = 0; i < M; ++i) order[i] = i;
    std::vector<int64_t> key2(M), ord2(M);
    std::vector<int64_t> count(int64_t(1) << kRadixBits);
    for (int shift = 0; shift < bits; shift += kRadixBits) {
        const int64_t mask = (int64_t(1) << kRadixBits) - 1;
        std::fill(count.begin(), count.end(), 0);
        for (int64_t i = 0; i < M; ++i) ++count[(sorted[i] >> shift) & mask];
        int64_t sum = 0;
        for (auto& c : count) {
            const int64_t n = c;
            c = sum;
            sum += n;
        }
        for (int64_t i = 0; i < M; ++i) {
            const int64_t at = count[(sorted[i] >> shift) & mask]++;
            key2[at] = sorted[i];
            ord2[at] = order[i];
        }
        sorted.swap(key2);
        order.swap(ord2);
    }
}

template <typename T>
void simhash_sign_rows_impl(const T* x, int64_t n_table, const int64_t* rows, const T* planes,
                            int64_t M, int64_t D, int64_t NB, int64_t* out, int nthreads) {
    check_range(rows, M, 0, n_table, "simhash_sign_rows", "rows");
    const int64_t W = (NB + kPanel - 1) / kPanel;
    if (M < kSortMin || W == 0) {
        simhash_sign_impl(x, rows, planes, M, D, NB, out, nthreads);
        return;
    }
    std::vector<int64_t> sorted, order;
    sort_rows(rows, M, n_table, sorted, order);
    std::vector<int64_t> sig(static_cast<size_t>(M * W));
    simhash_sign_impl(x, sorted.data(), planes, M, D, NB, sig.data(), nthreads);
    const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, M / kSortMin)));
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < M; ++i)
        std::memcpy(out + order[i] * W, sig.data() + i * W, W * sizeof(int64_t));
}

}  // namespace

std::string simhash_impl() {
#if FASTATTN_X86
    if (use_amx_bf16()) return "amx_bf16";  // fp32; fp64 runs avx512f
    if (use_avx512f()) return "avx512f";
    if (use_avx2()) return "avx2";
#endif
    return "default";
}

void simhash_sign(const float* x, const float* planes, int64_t N, int64_t D, int64_t NB,
                  int64_t* out, int nthreads) {
    simhash_sign_impl(x, static_cast<const int64_t*>(nullptr), planes, N, D, NB, out, nthreads);
}

void simhash_sign(const double* x, const double* planes, int64_t N, int64_t D, int64_t NB,
                  int64_t* out, int nthreads) {
    simhash_sign_impl(x, static_cast<const int64_t*>(nullptr), planes, N, D, NB, out, nthreads);
}

void simhash_sign_rows(const float* x, int64_t n_table, const int64_t* rows, const float* planes,
                       int64_t M, int64_t D, int64_t NB, int64_t* out, int nthreads) {
    simhash_sign_rows_impl(x, n_table, rows, planes, M, D, NB, out, nthreads);
}

void simhash_sign_rows(const double* x, int64_t n_table, const int64_t* rows,
                       const double* planes, int64_t M, int64_t D, int64_t NB, int64_t* out,
                       int nthreads) {
    simhash_sign_rows_impl(x, n_table, rows, planes, M, D, NB, out, nthreads);
}

}  // namespace fastattn
