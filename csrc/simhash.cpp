// SimHash signatures: bit j of row i is 1 iff (x @ planes)[i, j] > 0.
//
// The projection is never written out. planes is packed into panels of 64 columns (one
// output word each); a register-blocked AVX-512 microkernel keeps MR rows x 64 columns of
// accumulators in registers over the whole D loop, then turns them into 64 bits with
// compare-into-mask. Accumulation is in the input precision (fp32 / fp64), as the spec says.
// Bits past NB come from zero-padded plane columns: a projection of exactly 0 is not > 0.
#include <omp.h>

#include <algorithm>
#include <cstring>

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

}  // namespace

std::string simhash_impl() {
#if FASTATTN_X86
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
    check_range(rows, M, 0, n_table, "simhash_sign_rows", "rows");
    simhash_sign_impl(x, rows, planes, M, D, NB, out, nthreads);
}

void simhash_sign_rows(const double* x, int64_t n_table, const int64_t* rows,
                       const double* planes, int64_t M, int64_t D, int64_t NB, int64_t* out,
                       int nthreads) {
    check_range(rows, M, 0, n_table, "simhash_sign_rows", "rows");
    simhash_sign_impl(x, rows, planes, M, D, NB, out, nthreads);
}

}  // namespace fastattn
