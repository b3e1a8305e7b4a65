// Fused MIMN kernels (DESIGN.md §5): NTM read/write with MUR, the MIU gather-GRU, and the
// whole scan over T steps, forward and backward.
//
// Row tiles. Batch rows are independent; the scan runs them in tiles of kTileRows rows
// (rows sorted by length, longest first, so that the rows still running at step t are a
// prefix of their tile), one tile per thread at a time, all of a tile's rows step by step
// together. Each gate and head mat-vec of the step is then a small GEMM (tile rows x weight
// columns) whose weights stay in L1 across the tile, done by an explicitly vectorised
// register-blocked kernel (mimn_simd.inc; AVX-512 or AVX2 picked at run time). The
// elementwise sigmoid/tanh of the GRUs and heads are vectorised too (fp32; fp64 keeps the
// libm functions). The addressing and read/write (O(m·D) per row) stay per row, run stage
// by stage over the tile's rows.
//
// Every GEMM sums each output element in a fixed order that does not depend on the other
// rows of the tile, and tiles are formed from the sorted row order alone: results are
// independent of the thread count and deterministic.
//
// Backward: one forward step records a "tape" of the intermediates its backward needs
// (gate activations, cosine pieces, softmaxes), so the backward never re-derives them.
// The scan backward replays one chunk at a time from its checkpoint into a per-thread
// scratch of `chunk` states + tapes per tile row, then runs that chunk's steps in reverse,
// accumulating the tile's parameter gradients (weight-gradient GEMMs over the tile rows).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu_features.h"
#include "kernels.h"
#include "mimn.h"

namespace fastattn {
namespace {

// Rows stepped together: enough to amortise each weight load over 16 FMAs per row group,
// few enough that a tile's chunk of states and tapes stays in L2 (~1 MB at T=200, fp32).
constexpr int64_t kTileRows = 16;
// Smaller batches (a serving step: B = 1) use one tile of B rows.
inline int64_t tile_rows(int64_t B) { return std::min<int64_t>(kTileRows, std::max<int64_t>(B, 1)); }
// The work of ntm_address: 3 m vectors of up to 16 lanes.
inline int64_t addr_work(int64_t m) { return 3 * m * 16; }
// ntm_bwd's work per row: [dwt, dww, dwr, cr_dot, cr_M, cw_dot, cw_M, dlog, t1, t2] (m
// each) and [ckr, ckw, dβr, dβw].
inline int64_t ntm_bwd_work(int64_t m) { return 10 * m + 4; }

// The A operand of the tile GEMMs (mimn_simd.inc gemm): A(i, k) of a strided matrix, or of
// rows given by pointers (states and inputs read in place, no packing copy).
template <typename T>
struct StridedA {
    const T* p;
    int64_t si, sk;
    T at(int64_t r, int64_t k) const { return p[r * si + k * sk]; }
    StridedA rows(int64_t i) const { return {p + i * si, si, sk}; }
};
template <typename T>
struct RowsA {
    const T* const* p;  // row r starts at p[r] + off
    int64_t off;
    T at(int64_t r, int64_t k) const { return p[r][off + k]; }
    RowsA rows(int64_t i) const { return {p + i, off}; }
};

// ----------------------------------------------------------------------------- vector traits

#if FASTATTN_X86
#define FA_V512 static inline __attribute__((target("avx512f,fma"), always_inline))
#define FA_V256 static inline __attribute__((target("avx2,fma,popcnt"), always_inline))
struct F512 {
    using T = float;
    using V = __m512;
    static constexpr int W = 16;
    FA_V512 V load(const T* p) { return _mm512_loadu_ps(p); }
    FA_V512 void store(T* p, V v) { _mm512_storeu_ps(p, v); }
    FA_V512 V set1(T a) { return _mm512_set1_ps(a); }
    FA_V512 V zero() { return _mm512_setzero_ps(); }
    FA_V512 V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    FA_V512 V add(V a, V b) { return _mm512_add_ps(a, b); }
    FA_V512 V sub(V a, V b) { return _mm512_sub_ps(a, b); }
    FA_V512 V mul(V a, V b) { return _mm512_mul_ps(a, b); }
    FA_V512 V div(V a, V b) { return _mm512_div_ps(a, b); }
    FA_V512 V min(V a, V b) { return _mm512_min_ps(a, b); }  // b when either is NaN
    FA_V512 V max(V a, V b) { return _mm512_max_ps(a, b); }
    FA_V512 V round(V a) {
        return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    FA_V512 V ldexp(V p, V n) { return _mm512_scalef_ps(p, n); }
    FA_V512 V abs(V a) {
        return _mm512_castsi512_ps(
            _mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32(0x7fffffff)));
    }
    FA_V512 V copysign(V mag, V s) {
        const __m512i sign = _mm512_and_si512(_mm512_castps_si512(s),
                                              _mm512_set1_epi32(static_cast<int>(0x80000000u)));
        return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(mag), sign));
    }
    FA_V512 V select_lt(V x, V c, V a, V b) {  // x < c ? a : b
        return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, c, _CMP_LT_OQ), b, a);
    }
    // the first n < W elements (the rest read as 0 / not written)
    FA_V512 V load_n(const T* p, int n) {
        return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
    }
    FA_V512 void store_n(T* p, V v, int n) {
        _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v);
    }
    // the first n < W elements, the rest `fill`
    FA_V512 V load_n_or(const T* p, int n, T fill) {
        return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), static_cast<__mmask16>((1u << n) - 1),
                                    p);
    }
    // Lane l <- / -> p[l][off] for l < n, through the rows' pointers as 64-bit gather and
    // scatter addresses (base 0, scale 1); the lanes from n on read as 0 and are not written.
    FA_V512 __m512i addr8(const T* const* p, int n, int64_t off) {
        const __m512i a = _mm512_maskz_loadu_epi64(static_cast<__mmask8>((1u << n) - 1), p);
        return _mm512_add_epi64(a, _mm512_set1_epi64(off * int64_t(sizeof(T))));
    }
    FA_V512 V gather(const T* const* p, int n, int64_t off) {
        const __m256 lo = _mm512_mask_i64gather_ps(
            _mm256_setzero_ps(), static_cast<__mmask8>((1u << std::min(n, 8)) - 1),
            addr8(p, std::min(n, 8), off), nullptr, 1);
        const __m256 hi =
            n <= 8 ? _mm256_setzero_ps()
                   : _mm512_mask_i64gather_ps(_mm256_setzero_ps(),
                                              static_cast<__mmask8>((1u << (n - 8)) - 1),
                                              addr8(p + 8, n - 8, off), nullptr, 1);
        return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)),
                                                   _mm256_castps_pd(hi), 1));
    }
    FA_V512 void scatter(T* const* p, int n, int64_t off, V v) {
        _mm512_mask_i64scatter_ps(nullptr, static_cast<__mmask8>((1u << std::min(n, 8)) - 1),
                                  addr8(p, std::min(n, 8), off), _mm512_castps512_ps256(v), 1);
        if (n > 8)
            _mm512_mask_i64scatter_ps(
                nullptr, static_cast<__mmask8>((1u << (n - 8)) - 1), addr8(p + 8, n - 8, off),
                _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)), 1);
    }
    // the sum / max of the lanes (a fixed shuffle tree)
    FA_V512 T hsum(V a) { return _mm512_reduce_add_ps(a); }
    FA_V512 T hmax(V a) { return _mm512_reduce_max_ps(a); }
    // out[j] = the sum of v[j]'s lanes, j < 16: a transposing shuffle tree (15 shuffle
    // pairs and adds for all 16 sums, instead of a horizontal sum per vector)
    FA_V512 void hsum_rows(const V* v, T* out) {
        V t[8], u[4];
        for (int j = 0; j < 8; ++j)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
            t[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]),
                                 _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
        for (int k = 0; k < 4; ++k)  // per 128-bit lane: the lane's sums of v[4k..4k+3]
            u[k] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * k], t[2 * k + 1], 0x44),
                                 _mm512_shuffle_ps(t[2 * k], t[2 * k + 1], 0xEE));
        const V w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88),
                                   _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
        const V w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88),
                                   _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
        _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88),
                                            _mm512_shuffle_f32x4(w0, w1, 0xDD)));
    }
};
struct D512 {
    using T = double;
    using V = __m512d;
    static constexpr int W = 8;
    FA_V512 V load(const T* p) { return _mm512_loadu_pd(p); }
    FA_V512 void store(T* p, V v) { _mm512_storeu_pd(p, v); }
    FA_V512 V set1(T a) { return _mm512_set1_pd(a); }
    FA_V512 V zero() { return _mm512_setzero_pd(); }
    FA_V512 V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
};
struct F256 {
    using T = float;
    using V = __m256;
    static constexpr int W = 8;
    FA_V256 V load(const T* p) { return _mm256_loadu_ps(p); }
    FA_V256 void store(T* p, V v) { _mm256_storeu_ps(p, v); }
    FA_V256 V set1(T a) { return _mm256_set1_ps(a); }
    FA_V256 V zero() { return _mm256_setzero_ps(); }
    FA_V256 V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    FA_V256 V add(V a, V b) { return _mm256_add_ps(a, b); }
    FA_V256 V sub(V a, V b) { return _mm256_sub_ps(a, b); }
    FA_V256 V mul(V a, V b) { return _mm256_mul_ps(a, b); }
    FA_V256 V div(V a, V b) { return _mm256_div_ps(a, b); }
    FA_V256 V min(V a, V b) { return _mm256_min_ps(a, b); }  // b when either is NaN
    FA_V256 V max(V a, V b) { return _mm256_max_ps(a, b); }
    FA_V256 V round(V a) {
        return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    // 2^n through the exponent field: n is in [-126, 127] after vexp's clamp.
    FA_V256 V ldexp(V p, V n) {
        const __m256i e = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    }
    FA_V256 V abs(V a) {
        return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
    }
    FA_V256 V copysign(V mag, V s) {
        const V sign = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0x80000000u)));
        return _mm256_or_ps(mag, _mm256_and_ps(s, sign));
    }
    FA_V256 V select_lt(V x, V c, V a, V b) {
        return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, c, _CMP_LT_OQ));
    }
    FA_V256 __m256i mask_n(int n) {
        return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    }
    FA_V256 V load_n(const T* p, int n) { return _mm256_maskload_ps(p, mask_n(n)); }
    FA_V256 void store_n(T* p, V v, int n) { _mm256_maskstore_ps(p, mask_n(n), v); }
    FA_V256 V load_n_or(const T* p, int n, T fill) {
        const __m256i m = mask_n(n);
        return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m),
                                _mm256_castsi256_ps(m));
    }
    // as F512::gather / scatter (AVX2 has no scatter: the lanes are stored one by one)
    FA_V256 __m128 gather4(const T* const* p, int n, int64_t off) {
        const __m256i lanes =
            _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
        const __m256i a =
            _mm256_add_epi64(_mm256_maskload_epi64(reinterpret_cast<const long long*>(p), lanes),
                             _mm256_set1_epi64x(off * int64_t(sizeof(T))));
        const __m128 m4 =
            _mm_castsi128_ps(_mm_cmpgt_epi32(_mm_set1_epi32(n), _mm_setr_epi32(0, 1, 2, 3)));
        return _mm256_mask_i64gather_ps(_mm_setzero_ps(), static_cast<const float*>(nullptr), a,
                                        m4, 1);
    }
    FA_V256 V gather(const T* const* p, int n, int64_t off) {
        const __m128 lo = gather4(p, std::min(n, 4), off);
        const __m128 hi = n <= 4 ? _mm_setzero_ps() : gather4(p + 4, n - 4, off);
        return _mm256_set_m128(hi, lo);
    }
    FA_V256 void scatter(T* const* p, int n, int64_t off, V v) {
        alignas(32) T lane[8];
        _mm256_store_ps(lane, v);
        for (int l = 0; l < n; ++l) p[l][off] = lane[l];
    }
    FA_V256 T hsum(V a) {
        __m128 v = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
    }
    FA_V256 T hmax(V a) {
        __m128 v = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        v = _mm_max_ps(v, _mm_movehl_ps(v, v));
        return _mm_cvtss_f32(_mm_max_ss(v, _mm_movehdup_ps(v)));
    }
    // out[j] = the sum of v[j]'s lanes, j < 8 (as F512::hsum_rows)
    FA_V256 void hsum_rows(const V* v, T* out) {
        V t[4], u[2];
        for (int j = 0; j < 4; ++j)
            t[j] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * j], v[2 * j + 1]),
                                 _mm256_unpackhi_ps(v[2 * j], v[2 * j + 1]));
        for (int k = 0; k < 2; ++k)
            u[k] = _mm256_add_ps(_mm256_shuffle_ps(t[2 * k], t[2 * k + 1], 0x44),
                                 _mm256_shuffle_ps(t[2 * k], t[2 * k + 1], 0xEE));
        _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20),
                                            _mm256_permute2f128_ps(u[0], u[1], 0x31)));
    }
};
struct D256 {
    using T = double;
    using V = __m256d;
    static constexpr int W = 4;
    FA_V256 V load(const T* p) { return _mm256_loadu_pd(p); }
    FA_V256 void store(T* p, V v) { _mm256_storeu_pd(p, v); }
    FA_V256 V set1(T a) { return _mm256_set1_pd(a); }
    FA_V256 V zero() { return _mm256_setzero_pd(); }
    FA_V256 V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
};
#undef FA_V512
#undef FA_V256

// Where mimn_simd.inc's ntm_address reads and writes in an NTM record (Layout's fields).
struct NtmAddr {
    int64_t m, D, act, beta_r, beta_w, nM, rd, wd, Pm, sum, wt;
    bool mur;
};

#define FA_SIMD_ATTR FA_TARGET_AVX512F
namespace simd512 {
#include "mimn_simd.inc"
}  // namespace simd512
#undef FA_SIMD_ATTR
#define FA_SIMD_ATTR FA_TARGET_AVX2
namespace simd256 {
#include "mimn_simd.inc"
}  // namespace simd256
#undef FA_SIMD_ATTR
#endif

// 0 default, 1 AVX2+FMA, 2 AVX-512F+FMA (FASTATTN_CPU_ISA caps it).
inline int mimn_isa() {
#if FASTATTN_X86
    static const int isa = use_avx512f() ? 2 : (cpu_features().avx2 && cpu_features().fma) ? 1 : 0;
    return isa;
#else
    return 0;
#endif
}

// dst[0, n) = src[0, n) with non-temporal stores on AVX-512 (the 64-byte lines of dst
// written whole, without reading them first; the unaligned ends copied as usual): for the
// stored tapes, written once per step and read back only by the backward, after hundreds
// of MB of others. stream_fence() after the last one, before other threads read.
#if FASTATTN_X86
FA_TARGET_AVX512F inline void stream_bytes_avx512(char* d, const char* s, size_t n) {
    size_t head = (64 - (reinterpret_cast<uintptr_t>(d) & 63)) & 63;
    head = std::min(head, n);
    std::memcpy(d, s, head);
    d += head, s += head, n -= head;
    for (; n >= 64; d += 64, s += 64, n -= 64)
        _mm512_stream_si512(reinterpret_cast<__m512i*>(d), _mm512_loadu_si512(s));
    std::memcpy(d, s, n);
}
#endif
template <typename T>
inline void stream_copy(T* dst, const T* src, int64_t n) {
#if FASTATTN_X86
    if (mimn_isa() == 2)
        return stream_bytes_avx512(reinterpret_cast<char*>(dst),
                                   reinterpret_cast<const char*>(src), n * sizeof(T));
#endif
    std::memcpy(dst, src, n * sizeof(T));
}
inline void stream_fence() {
#if FASTATTN_X86
    if (mimn_isa() == 2) _mm_sfence();
#endif
}

// ----------------------------------------------------------------------------- math helpers

template <typename T>
FA_INLINE T sigmoid(T x) {
    return T(1) / (T(1) + std::exp(-x));
}
// The default-ISA fp32 tanh: glibc's tanhf goes through expm1f and costs as much as the
// mat-vecs around it; in double, (e - 1) / (e + 1) with e = exp(2x) is within an ulp of
// float tanh. fp64 keeps std::tanh.
FA_INLINE double tanh_(double x) { return std::tanh(x); }
FA_INLINE float tanh_(float x) {
    const double xd = std::min(std::max(static_cast<double>(x), -20.0), 20.0);
    const double e = std::exp(2.0 * xd);
    return static_cast<float>((e - 1.0) / (e + 1.0));
}
// torch.nn.functional.softplus (beta 1, threshold 20): the identity above the threshold
// (fp64 and the default path; softplus_n below vectorises the fp32 betas of a tile).
template <typename T>
FA_INLINE T softplus(T x) {
    return x > T(20) ? x : std::log1p(std::exp(x));
}
template <typename T>
FA_INLINE T softplus_grad(T x) {
    return x > T(20) ? T(1) : sigmoid(x);
}

// fp32 on x86: return mimn_simd.inc's NAME(args...) for the ISA mimn_isa() picked; fp64,
// other ISAs and other architectures fall through to the caller's portable loop.
#if FASTATTN_X86
#define FA_MIMN_SIMD(NAME, ...)                                                              \
    if constexpr (std::is_same_v<T, float>) {                                                \
        const int isa = mimn_isa();                                                          \
        if (isa == 2) return simd512::NAME<F512>(__VA_ARGS__);                               \
        if (isa == 1) return simd256::NAME<F256>(__VA_ARGS__);                               \
    }
#else
#define FA_MIMN_SIMD(NAME, ...)
#endif

// In-place activations over p[0, n). fp32 on AVX-512/AVX2: the vector functions of
// mimn_simd.inc (bounds, against double-precision libm: exp 2 ulp on [-87, 88], sigmoid
// 1.2e-7 absolute, tanh 3e-7 relative; measured over 44M floats sampled across all bit
// patterns: 1.23 ulp, 8.9e-8; tanh over every positive float below 20: 2.95e-7; tests hold
// every ISA path to DESIGN §6). fp64 and the default path: libm.
template <typename T>
FA_INLINE void sigmoid_n(T* p, int64_t n) {
    FA_MIMN_SIMD(sigmoid_n, p, n);
    for (int64_t i = 0; i < n; ++i) p[i] = sigmoid(p[i]);
}
template <typename T>
FA_INLINE void tanh_n(T* p, int64_t n) {
    FA_MIMN_SIMD(tanh_n, p, n);
    for (int64_t i = 0; i < n; ++i) p[i] = tanh_(p[i]);
}

// out = softplus(x), grad = softplus'(x) over [0, n) (fp32 on AVX-512/AVX2: mimn_simd.inc
// vsoftplus, bound 3 ulp; libm's log1pf was ~3% of the forward as two scalar calls per
// row-step).
template <typename T>
FA_INLINE void softplus_n(const T* x, T* out, T* grad, int64_t n) {
    FA_MIMN_SIMD(softplus_n, x, out, grad, n);
    for (int64_t i = 0; i < n; ++i) out[i] = softplus(x[i]), grad[i] = softplus_grad(x[i]);
}

// Σ a(i) b(i) and Σ p(i) over [0, n) (fp32 on AVX-512/AVX2: mimn_simd.inc dot_n, sum_n).
template <typename T>
FA_INLINE T dot_(const T* a, const T* b, int64_t n) {
    FA_MIMN_SIMD(dot_n, a, b, n);
    return dot(a, b, n);
}
template <typename T>
FA_INLINE T sum_(const T* p, int64_t n) {
    FA_MIMN_SIMD(sum_n, p, n);
    T u = 0;
#pragma omp simd reduction(+ : u)
    for (int64_t i = 0; i < n; ++i) u += p[i];
    return u;
}

// p = softmax(p) over [0, n) in place (the max subtracted first), and the MUR's
// normalisation below: ntm_address's row-by-row path (fp64, the default ISA; fp32 on
// AVX-512/AVX2 runs mimn_simd.inc's with one row per lane).
template <typename T>
FA_INLINE void softmax_n(T* p, int64_t n) {
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, p[i]);
    for (int64_t i = 0; i < n; ++i) p[i] = std::exp(p[i] - mx);
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += p[i];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) p[i] /= sum;
}
// out = a ⊙ b / Σ(a ⊙ b) over [0, n); returns the sum.
template <typename T>
FA_INLINE T mul_normalize_n(const T* a, const T* b, T* out, int64_t n) {
    T u = 0;
#pragma omp simd reduction(+ : u)
    for (int64_t i = 0; i < n; ++i) {
        out[i] = a[i] * b[i];
        u += out[i];
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] /= u;
    return u;
}

// The NTM's per-row sums over the memory (mimn_simd.inc: fp32 on AVX-512/AVX2, rows
// reduced W at a time); fp64 and the default path: the loops below.
template <typename T>
FA_INLINE void ntm_row_dots(const T* M, int64_t m, int64_t D, const T* kr, const T* kw, T* nn,
                            T* dr, T* dw) {
    FA_MIMN_SIMD(ntm_row_dots, M, m, D, kr, kw, nn, dr, dw);
    for (int64_t i = 0; i < m; ++i) {
        const T* Mi = M + i * D;
        T a = 0, b = 0, c = 0;
#pragma omp simd reduction(+ : a, b, c)
        for (int64_t e = 0; e < D; ++e) {
            const T v = Mi[e];
            a += v * v;
            b += kr[e] * v;
            c += kw[e] * v;
        }
        nn[i] = a, dr[i] = b, dw[i] = c;
    }
}
template <typename T>
FA_INLINE void ntm_bwd_pass1(const T* M, const T* G, int64_t m, int64_t D, const T* wt,
                             const T* wr, const T* er, const T* ad, const T* d_read, T* dM,
                             T* de, T* da, T* s, T* q) {
    FA_MIMN_SIMD(ntm_bwd_pass1, M, G, m, D, wt, wr, er, ad, d_read, dM, de, da, s, q);
    for (int64_t i = 0; i < m; ++i) {
        const T c = wt[i], cr = wr[i];
        const T* Mi = M + i * D;
        const T* Gi = G + i * D;
        T* dMi = dM + i * D;
        T a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
        for (int64_t e = 0; e < D; ++e) {
            a += Gi[e] * (ad[e] - Mi[e] * er[e]);
            b += d_read[e] * Mi[e];
            de[e] -= Gi[e] * Mi[e] * c;
            da[e] += Gi[e] * c;
            dMi[e] = Gi[e] * (T(1) - c * er[e]) + cr * d_read[e];
        }
        s[i] = a, q[i] = b;
    }
}
// The forward's read and write in one pass; M_out may be M.
template <typename T>
FA_INLINE void ntm_read_write(const T* M, int64_t m, int64_t D, const T* wt, const T* wr,
                              const T* er, const T* ad, T* read, T* M_out) {
    FA_MIMN_SIMD(ntm_read_write, M, m, D, wt, wr, er, ad, read, M_out);
    std::fill(read, read + D, T(0));
    for (int64_t i = 0; i < m; ++i) {
        const T c = wt[i], cr = wr[i];
        const T* Mi = M + i * D;
        T* Oi = M_out + i * D;
#pragma omp simd
        for (int64_t e = 0; e < D; ++e) {
            const T v = Mi[e];
            read[e] += cr * v;
            Oi[e] = v * (T(1) - c * er[e]) + c * ad[e];
        }
    }
}
// The backward's pass over the memory for both content addressings (mimn_simd.inc
// ntm_bwd_pass2): dM += ..., dkr and dkw written, through the heads' tanh derivatives.
template <typename T>
FA_INLINE void ntm_bwd_pass2(const T* M, int64_t m, int64_t D, const T* ca, const T* cb,
                             const T* cc1, const T* cc2, const T* kr, const T* kw, T ckr, T ckw,
                             T* dM, T* dkr, T* dkw) {
    FA_MIMN_SIMD(ntm_bwd_pass2, M, m, D, ca, cb, cc1, cc2, kr, kw, ckr, ckw, dM, dkr, dkw);
    std::fill(dkr, dkr + D, T(0));
    std::fill(dkw, dkw + D, T(0));
    for (int64_t i = 0; i < m; ++i) {
        const T a = ca[i], b = cb[i], c = cc1[i] + cc2[i];
        const T* Mi = M + i * D;
        T* dMi = dM + i * D;
#pragma omp simd
        for (int64_t e = 0; e < D; ++e) {
            const T v = Mi[e];
            dMi[e] += a * kr[e] + b * kw[e] + c * v;
            dkr[e] += a * v;
            dkw[e] += b * v;
        }
    }
#pragma omp simd
    for (int64_t e = 0; e < D; ++e) {
        dkr[e] = (dkr[e] + ckr * kr[e]) * (T(1) - kr[e] * kr[e]);
        dkw[e] = (dkw[e] + ckw * kw[e]) * (T(1) - kw[e] * kw[e]);
    }
}

// A kernel body compiled three times (default, AVX2, AVX-512 targets: its inlined loops are
// vectorised for each) and picked by mimn_isa() at run time.
#if FASTATTN_X86
#define FA_ISA_VARIANTS(NAME)                                                                \
    template <typename... A>                                                                 \
    void NAME##_default(A&&... a) { NAME##_body(std::forward<A>(a)...); }                    \
    template <typename... A>                                                                 \
    FA_TARGET_AVX2 void NAME##_avx2(A&&... a) { NAME##_body(std::forward<A>(a)...); }        \
    template <typename... A>                                                                 \
    FA_TARGET_AVX512F void NAME##_avx512(A&&... a) { NAME##_body(std::forward<A>(a)...); }   \
    template <typename... A>                                                                 \
    inline void NAME(A&&... a) {                                                             \
        const int isa = mimn_isa();                                                          \
        if (isa == 2) return NAME##_avx512(std::forward<A>(a)...);                           \
        if (isa == 1) return NAME##_avx2(std::forward<A>(a)...);                             \
        NAME##_default(std::forward<A>(a)...);                                               \
    }
#else
#define FA_ISA_VARIANTS(NAME)                                                                \
    template <typename... A>                                                                 \
    inline void NAME(A&&... a) { NAME##_body(std::forward<A>(a)...); }
#endif

// y = W x + bias, W (rows, K) row-major. Only the tiny MUR mat-vec (m x m) uses it.
template <typename T>
FA_INLINE void matvec(const T* W, const T* bias, const T* x, int64_t rows, int64_t K, T* y) {
    for (int64_t j = 0; j < rows; ++j) y[j] = bias[j] + dot(W + j * K, x, K);
}
// y += Wᵀ v, W (rows, K); G += v xᵀ, G (rows, K). MUR only (m x m).
template <typename T>
FA_INLINE void matvec_t_acc(const T* W, const T* v, int64_t rows, int64_t K, T* y) {
    for (int64_t j = 0; j < rows; ++j) {
        const T vj = v[j];
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) y[k] += vj * W[j * K + k];
    }
}
template <typename T>
FA_INLINE void outer_acc(T* G, const T* v, const T* x, int64_t rows, int64_t K) {
    for (int64_t j = 0; j < rows; ++j) {
        const T vj = v[j];
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) G[j * K + k] += vj * x[k];
    }
}
template <typename T>
FA_INLINE void add_to(T* y, const T* x, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}
template <typename T>
FA_INLINE void zero(T* p, int64_t n) {
    if (n > 0) std::memset(p, 0, sizeof(T) * n);
}
template <typename T>
FA_INLINE void copy(T* dst, const T* src, int64_t n) {
    if (n > 0) std::memcpy(dst, src, sizeof(T) * n);
}

// Column counts of GEMM operands are padded to 16 elements (a whole number of vectors on
// every path); the padding of weights and biases is zero.
inline int64_t pad16(int64_t n) { return (n + 15) / 16 * 16; }

// C[i, :Np] = init[i, :Np] + Σ_{k<K} A(i, k) B[k, :Np] for i < M, A(i, k) = A[i·asi + k·ask];
// init null = 0, ldi = 0 broadcasts a bias row, init = C accumulates. Np % 16 == 0.
template <typename T, class AA>
void gemm_ref(int64_t M, int64_t Np, int64_t K, AA A, const T* B, int64_t ldb, const T* init,
              int64_t ldi, T* C, int64_t ldc) {
    for (int64_t i = 0; i < M; ++i) {
        T* c = C + i * ldc;
        if (init == nullptr) zero(c, Np);
        else if (init + i * ldi != c) copy(c, init + i * ldi, Np);
        for (int64_t k = 0; k < K; ++k) {
            const T a = A.at(i, k);
            const T* b = B + k * ldb;
#pragma omp simd
            for (int64_t j = 0; j < Np; ++j) c[j] += a * b[j];
        }
    }
}
template <typename T, class AA>
inline void gemm_a(int64_t M, int64_t Np, int64_t K, AA A, const T* B, int64_t ldb,
                   const T* init, int64_t ldi, T* C, int64_t ldc) {
    if (M <= 0 || Np <= 0) return;
#if FASTATTN_X86
    const int isa = mimn_isa();
    if constexpr (std::is_same_v<T, float>) {
        if (isa == 2) return simd512::gemm<F512, 6>(M, Np, K, A, B, ldb, init, ldi, C, ldc);
        if (isa == 1) return simd256::gemm<F256, 3>(M, Np, K, A, B, ldb, init, ldi, C, ldc);
    } else {
        if (isa == 2) return simd512::gemm<D512, 6>(M, Np, K, A, B, ldb, init, ldi, C, ldc);
        if (isa == 1) return simd256::gemm<D256, 3>(M, Np, K, A, B, ldb, init, ldi, C, ldc);
    }
#endif
    gemm_ref(M, Np, K, A, B, ldb, init, ldi, C, ldc);
}
template <typename T>
inline void gemm(int64_t M, int64_t Np, int64_t K, const T* A, int64_t asi, int64_t ask,
                 const T* B, int64_t ldb, const T* init, int64_t ldi, T* C, int64_t ldc) {
    gemm_a(M, Np, K, StridedA<T>{A, asi, ask}, B, ldb, init, ldi, C, ldc);
}
// A given by row pointers: row r of A is A[r] + off.
template <typename T>
inline void gemm(int64_t M, int64_t Np, int64_t K, const T* const* A, int64_t off, const T* B,
                 int64_t ldb, const T* init, int64_t ldi, T* C, int64_t ldc) {
    gemm_a(M, Np, K, RowsA<T>{A, off}, B, ldb, init, ldi, C, ldc);
}

// ----------------------------------------------------------------------------- layouts

// Where everything lives in one row's flat buffers. A state is [h | r | M | g | S]; a tape
// (one step's intermediates) is [controller gates | NTM record | MIU record].
struct Layout {
    int64_t Dx, D, m, Hc, Hs, P, k;
    bool mur;
    // state
    int64_t s_h, s_r, s_M, s_g, s_S, SS;
    // NTM record, relative to its start: activated heads (beta slots hold beta), the
    // softplus derivatives of the two betas, |M(i)|, the read and write addressing records
    // ([|k|, dots (m), denominators (m), weights (m)] each), MUR softmax, its normaliser,
    // and the final write weights w~.
    int64_t n_act, n_spg, n_nM, n_rd, n_wd, n_Pm, n_sum, n_wt, NT;
    // tape; the MIU record is [k channel ids | k GRU tapes (4Hs) | the k channels' states
    // before the step (Hs each)], so that S can be updated in place (the backward reads
    // S_{t-1} of the chosen channels from here, not from a per-step copy of all m channels)
    int64_t t_ctrl, t_ntm, t_miu, TS;
    // a stored tape (the forward's, kept for the backward): [tape | h after the step (Hc)],
    // padded to a multiple of 16
    int64_t t_h1, TSt;

    explicit Layout(const MimnDims& d) {
        Dx = d.Dx, D = d.D, m = d.m, Hc = d.Hc, Hs = d.Hs, P = 4 * d.D + 2;
        k = std::min(d.miu_k, d.m);
        mur = d.has_mur;
        s_h = 0, s_r = Hc, s_M = s_r + D, s_g = s_M + m * D, s_S = s_g + m, SS = s_S + m * Hs;
        const int64_t rec = 1 + 3 * m;
        n_act = 0, n_spg = P, n_nM = P + 2, n_rd = n_nM + m, n_wd = n_rd + rec;
        n_Pm = n_wd + rec, n_sum = n_Pm + m, n_wt = n_sum + 1, NT = n_wt + m;
        t_ctrl = 0, t_ntm = 4 * Hc, t_miu = t_ntm + NT, TS = t_miu + k * (1 + 5 * Hs);
        t_h1 = TS, TSt = (TS + Hc + 15) / 16 * 16;  // whole 64-byte lines (fp32)
    }
};

// A bump allocator over one per-thread buffer; with a null base it only counts, so that the
// same code sizes the buffer before the parallel region and carves it inside.
template <typename T>
struct Arena {
    T* p;
    size_t used = 0;
    T* take(int64_t n) {
        T* r = p ? p + used : nullptr;
        used += static_cast<size_t>(pad16(std::max<int64_t>(n, 0)));
        return r;
    }
};

// ----------------------------------------------------------------------------- GRU cell

// One torch.nn.GRUCell's weights, packed once per kernel call for the tile GEMMs: the
// transposed weights (K, Np) / (H, Np) and biases (Np) for the forward, the weights with
// padded rows (3H, Kp) / (3H, Hp) for the backward's dX = dG W. N = 3H, Np = pad16(N).
template <typename T>
struct GruP {
    int64_t H = 0, K = 0, N = 0, Np = 0, Kp = 0, Hp = 0;
    std::vector<T> wih_t, whh_t, bih, bhh, wih, whh;
    GruP(const T* w_ih, const T* w_hh, const T* b_ih, const T* b_hh, int64_t H_, int64_t K_,
         bool active) {
        if (!active) return;
        H = H_, K = K_, N = 3 * H, Np = pad16(N), Kp = pad16(K), Hp = pad16(H);
        wih_t.assign(K * Np, T(0));
        whh_t.assign(H * Np, T(0));
        bih.assign(Np, T(0));
        bhh.assign(Np, T(0));
        wih.assign(N * Kp, T(0));
        whh.assign(N * Hp, T(0));
        for (int64_t j = 0; j < N; ++j) {
            for (int64_t k = 0; k < K; ++k) wih_t[k * Np + j] = wih[j * Kp + k] = w_ih[j * K + k];
            for (int64_t k = 0; k < H; ++k) whh_t[k * Np + j] = whh[j * Hp + k] = w_hh[j * H + k];
            bih[j] = b_ih[j];
            bhh[j] = b_hh[j];
        }
    }
    GruP(const GruP&) = delete;
    GruP& operator=(const GruP&) = delete;
};
// A tile's gradient accumulators for one GRU, padded like GruP: w_ih (N, Kp), w_hh (N, Hp),
// b_ih, b_hh (N).
template <typename T>
struct GruAcc {
    T *w_ih = nullptr, *w_hh = nullptr, *b_ih = nullptr, *b_hh = nullptr;
    void carve(Arena<T>& a, const GruP<T>& c) {
        w_ih = a.take(c.N * c.Kp), w_hh = a.take(c.N * c.Hp);
        b_ih = a.take(c.N), b_hh = a.take(c.N);
    }
    void clear(const GruP<T>& c) {
        zero(w_ih, c.N * c.Kp), zero(w_hh, c.N * c.Hp), zero(b_ih, c.N), zero(b_hh, c.N);
    }
    // into the (3H, K), (3H, H), (3H,), (3H,) output slots
    void store(const GruP<T>& c, T* o_ih, T* o_hh, T* o_bih, T* o_bhh) const {
        for (int64_t j = 0; j < c.N; ++j) {
            copy(o_ih + j * c.K, w_ih + j * c.Kp, c.K);
            copy(o_hh + j * c.H, w_hh + j * c.Hp, c.H);
        }
        copy(o_bih, b_ih, c.N);
        copy(o_bhh, b_hh, c.N);
    }
};
// Scratch of the tile GRU: gate pre-activations (rows, Np) twice.
template <typename T>
struct GruWork {
    T *a = nullptr, *b = nullptr;
    void carve(Arena<T>& ar, int64_t rows, int64_t Np) { a = ar.take(rows * Np), b = ar.take(rows * Np); }
};

// The GRU's elementwise part, row by row: gi, gh (n, Np) gate pre-activations, hs[r] the
// hidden state (hout[r] may be hs[r]: in place).
template <typename T>
FA_INLINE void gru_gates_fwd_body(int64_t H, int64_t Np, int64_t n, const T* gia, const T* gha,
                                  const T* const* hs, T* const* tape, T* const* hout) {
    for (int64_t r = 0; r < n; ++r) {
        const T* gi = gia + r * Np;
        const T* gh = gha + r * Np;
        const T* h = hs[r];
        T* tp = tape[r];
        T *rg = tp, *z = tp + H, *nn = tp + 2 * H, *ghn = tp + 3 * H;
#pragma omp simd
        for (int64_t j = 0; j < 2 * H; ++j) tp[j] = gi[j] + gh[j];
        sigmoid_n(tp, 2 * H);
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
            ghn[j] = gh[2 * H + j];
            nn[j] = gi[2 * H + j] + rg[j] * ghn[j];
        }
        tanh_n(nn, H);
        T* o = hout[r];
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) o[j] = (T(1) - z[j]) * nn[j] + z[j] * h[j];
    }
}
FA_ISA_VARIANTS(gru_gates_fwd)

// Its backward: dgi, dgh (n, Np) and dH (n, Hp) = dh_out ⊙ z (the direct path).
template <typename T>
FA_INLINE void gru_gates_bwd_body(int64_t H, int64_t Np, int64_t Hp, int64_t n, const T* Hm,
                                  const T* const* tape, const T* const* dh_out, T* dgi, T* dgh,
                                  T* dH) {
    for (int64_t r = 0; r < n; ++r) {
        const T* g = dh_out[r];
        const T* tp = tape[r];
        const T *rg = tp, *z = tp + H, *nn = tp + 2 * H, *ghn = tp + 3 * H;
        const T* h = Hm + r * Hp;
        T* di = dgi + r * Np;
        T* dh = dgh + r * Np;
        T* dhr = dH + r * Hp;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
            const T dn = g[j] * (T(1) - z[j]);
            const T dz = g[j] * (h[j] - nn[j]);
            const T dpn = dn * (T(1) - nn[j] * nn[j]);
            const T dpr = dpn * ghn[j] * rg[j] * (T(1) - rg[j]);
            const T dpz = dz * z[j] * (T(1) - z[j]);
            di[j] = dpr, di[H + j] = dpz, di[2 * H + j] = dpn;
            dh[j] = dpr, dh[H + j] = dpz, dh[2 * H + j] = dpn * rg[j];
            dhr[j] = g[j] * z[j];
        }
        zero(dhr + H, Hp - H);
    }
}
FA_ISA_VARIANTS(gru_gates_bwd)

// torch.nn.GRUCell over n rows, its operands read in place through row pointers: the input
// is [xa[r] (Ka) | xb[r] (K − Ka)] (two products into one accumulator: each element is
// still summed in k order), the hidden state h[r] (H) -> hout[r] (H, may be h[r]);
// tape[r] (4H) = [r, z, n, W_hn h + b_hn].
template <typename T>
void gru_tile_fwd(const GruP<T>& c, int64_t n, const T* const* xa, int64_t Ka,
                  const T* const* xb, const T* const* h, T* const* tape, T* const* hout,
                  const GruWork<T>& w) {
    gemm(n, c.Np, Ka, xa, 0, c.wih_t.data(), c.Np, c.bih.data(), 0, w.a, c.Np);
    gemm(n, c.Np, c.K - Ka, xb, 0, c.wih_t.data() + Ka * c.Np, c.Np,
         static_cast<const T*>(w.a), c.Np, w.a, c.Np);
    gemm(n, c.Np, c.H, h, 0, c.whh_t.data(), c.Np, c.bhh.data(), 0, w.b, c.Np);
    gru_gates_fwd(c.H, c.Np, n, static_cast<const T*>(w.a), static_cast<const T*>(w.b), h,
                  tape, hout);
}

// The backward's weight gradients of one Linear map, dW (N, ldx) += Σ_rows dy(row)ᵀ x(row),
// over the rows of several steps at once: the steps' (dy (N, ld ldy), x (ld ldx, padded))
// rows are gathered here and summed by one GEMM per batch (K = up to kGradSteps tiles of
// rows) instead of one per step (K = a tile's rows), so that the (N, ldx) accumulator is
// loaded and stored once per batch, not once per step (it was most of those GEMMs' cost).
// Each element is still summed in a fixed order (rows in step order, then tile order).
constexpr int64_t kGradSteps = 8;
template <typename T>
struct WGradBatch {
    T *dy = nullptr, *x = nullptr;
    int64_t N = 0, ldy = 0, ldx = 0, cap = 0, q = 0;
    void carve(Arena<T>& a, int64_t rows, int64_t N_, int64_t ldy_, int64_t ldx_) {
        N = N_, ldy = ldy_, ldx = ldx_, cap = rows, q = 0;
        dy = a.take(rows * ldy), x = a.take(rows * ldx);
    }
    // room for n more rows (flushing into W first if they would not fit)
    void reserve(int64_t n, T* W) {
        if (q + n > cap) flush(W);
    }
    T* dy_at() const { return dy + q * ldy; }
    T* x_at() const { return x + q * ldx; }
    // W += dyᵀ x over the gathered rows: A(j, r) = dy[r, j]
    void flush(T* W) {
        if (q > 0) gemm(N, ldx, q, dy, 1, ldy, x, ldx, W, ldx, W, ldx);
        q = 0;
    }
};

// Its backward given dh_out[r] (H) for n rows whose inputs X (n, Kp) and hidden states Hm
// (n, Hp) the caller packed at ih.x_at() and hh.x_at() (after reserving n rows in both):
// writes dX (n, Kp) and dH (n, Hp) (the gradients of X and Hm), the bias gradients into
// acc, and leaves the gate gradients in the batches for the weight gradients.
template <typename T>
void gru_tile_bwd(const GruP<T>& c, const GruAcc<T>& acc, int64_t n, const T* const* tape,
                  const T* const* dh_out, T* dX, T* dH, WGradBatch<T>& ih, WGradBatch<T>& hh) {
    const int64_t Np = c.Np, Hp = c.Hp;
    T* dgi = ih.dy_at();
    T* dgh = hh.dy_at();
    gru_gates_bwd(c.H, Np, Hp, n, static_cast<const T*>(hh.x_at()), tape, dh_out, dgi, dgh, dH);
    gemm(n, c.Kp, c.N, dgi, Np, 1, c.wih.data(), c.Kp, static_cast<const T*>(nullptr), 0, dX,
         c.Kp);
    gemm(n, Hp, c.N, dgh, Np, 1, c.whh.data(), Hp, dH, Hp, dH, Hp);
    for (int64_t r = 0; r < n; ++r) {
        add_to(acc.b_ih, dgi + r * Np, c.N);
        add_to(acc.b_hh, dgh + r * Np, c.N);
    }
    ih.q += n, hh.q += n;
}

// ----------------------------------------------------------------------------- addressing

// w = softmax_i(beta · cos(key, M(i))). rec = [|key|, dots (m), denominators (m), w (m)];
// the dots key·M(i) are in rec already (ntm_fwd computes them with |M(i)| in one pass).
template <typename T>
FA_INLINE void content_fwd(const T* key, T beta, const T* nM, int64_t m, int64_t D, T* rec) {
    const T nk = std::sqrt(dot_(key, key, D));
    T *dots = rec + 1, *den = rec + 1 + m, *w = rec + 1 + 2 * m;
    rec[0] = nk;
    // per-slot loops vectorised over the m slots (m = 16: one AVX-512 vector)
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) {
        den[i] = std::max(nk * nM[i], T(1e-8));
        w[i] = beta * dots[i] / den[i];
    }
    softmax_n(w, m);
}

// Backward of content_fwd given dw (m), its scalar part: per slot the coefficients of
// dkey += ddot(i) M(i), dM(i) += ddot(i) key + cM(i) M(i); returns dbeta and sets *dnk_out
// to the coefficient of key in dkey (dkey += *dnk_out · key) — ntm_bwd applies them to
// both addressings in one pass over the memory.
// As in torch: the clamp passes no gradient below 1e-8 and |v| has gradient 0 at v = 0.
template <typename T>
FA_INLINE T content_bwd_coef(const T* dw, const T* rec, T beta, const T* nM, int64_t m,
                             T* ddot_out, T* cM_out, T* ck_out, T* t1, T* t2) {
    const T nk = rec[0];
    const T *dots = rec + 1, *den = rec + 1 + m, *w = rec + 1 + 2 * m;
    const T sdw = dot_(w, dw, m);
    // vectorised over the slots (the divisions were most of this function's time); the
    // per-slot terms of dbeta and |key|'s gradient go to t1, t2 and are summed after
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) {
        const T ds = w[i] * (dw[i] - sdw);
        t1[i] = ds * dots[i] / den[i];
        const T dc = ds * beta;
        const T ddot = dc / den[i];
        const T dden = -dc * dots[i] / (den[i] * den[i]);
        const bool on = nk * nM[i] >= T(1e-8);
        t2[i] = on ? dden * nM[i] : T(0);
        const T dnM = on ? dden * nk : T(0);
        ddot_out[i] = ddot;
        cM_out[i] = nM[i] > T(0) ? dnM / nM[i] : T(0);
    }
    const T dnk = sum_(t2, m);
    *ck_out = nk > T(0) ? dnk / nk : T(0);
    return sum_(t1, m);
}

// ----------------------------------------------------------------------------- NTM (steps 3-6)

// The record offsets that mimn_simd.inc's ntm_address and ntm_address_bwd read.
inline NtmAddr ntm_addr(const Layout& L) {
    return {L.m, L.D, L.n_act, L.n_act + L.D, L.n_act + 2 * L.D + 1, L.n_nM, L.n_rd, L.n_wd,
            L.n_Pm, L.n_sum, L.n_wt, L.mur};
}
// ntm_fwd's addressing stage for n rows: both content addressings and the MUR
// re-weighting, into the rows' records (fp32 on AVX-512/AVX2: mimn_simd.inc ntm_address,
// one row per lane; work: addr_work(m)). Here, row by row.
template <typename T>
FA_INLINE void ntm_address(const Layout& L, const T* mur_wt, const T* mur_b, int64_t n,
                           const T* const* g, T* const* rec, T* work) {
    FA_MIMN_SIMD(ntm_address, ntm_addr(L), n, mur_wt, mur_b, g, rec, work);
    const int64_t D = L.D, m = L.m;
    for (int64_t r = 0; r < n; ++r) {
        const T* act = rec[r] + L.n_act;
        content_fwd(act, act[D], rec[r] + L.n_nM, m, D, rec[r] + L.n_rd);
    }
    for (int64_t r = 0; r < n; ++r) {
        const T* act = rec[r] + L.n_act;
        content_fwd(act + D + 1, act[2 * D + 1], rec[r] + L.n_nM, m, D, rec[r] + L.n_wd);
    }
    for (int64_t r = 0; r < n; ++r) {
        const T* ww = rec[r] + L.n_wd + 1 + 2 * m;
        T* wt = rec[r] + L.n_wt;
        if (!L.mur) {
            copy(wt, ww, m);
            continue;
        }
        // P = softmax(mur_w g + mur_b); w~ = (ww ⊙ P) / Σ(ww ⊙ P)
        T* Pm = rec[r] + L.n_Pm;
        // Pm(j) = b(j) + Σ_k g(k) W[j, k] (k in order), W transposed: broadcast g(k) times
        // row k of Wᵀ, vectorised over the outputs j
        copy(Pm, mur_b, m);
        for (int64_t k = 0; k < m; ++k) {
            const T gk = g[r][k];
            const T* wk = mur_wt + k * m;
#pragma omp simd
            for (int64_t j = 0; j < m; ++j) Pm[j] += gk * wk[j];
        }
        softmax_n(Pm, m);
        rec[r][L.n_sum] = mul_normalize_n(ww, static_cast<const T*>(Pm), wt, m);
    }
}

// ntm_fwd's last stage for n rows, from their records: g_out = g + w~, the read (from M
// before the write) and the write in one pass; in place when M_out = M. Its own ISA
// variants too: the backward's replay from stored tapes (tile_step_from_tape) runs only
// this stage and gets the very M, read and g of the forward.
template <typename T>
FA_INLINE void ntm_write_body(const Layout& L, int64_t n, const T* const* M, const T* const* g,
                              const T* const* rec, T* const* read, T* const* M_out,
                              T* const* g_out) {
    const int64_t D = L.D, m = L.m;
    for (int64_t r = 0; r < n; ++r) {
        const T* act = rec[r] + L.n_act;
        const T* wt = rec[r] + L.n_wt;
#pragma omp simd
        for (int64_t i = 0; i < m; ++i) g_out[r][i] = g[r][i] + wt[i];
        ntm_read_write(M[r], m, D, wt, rec[r] + L.n_rd + 1 + 2 * m, act + 2 * D + 2,
                       act + 3 * D + 2, read[r], M_out[r]);
    }
}
FA_ISA_VARIANTS(ntm_write)

// The first n rows of a tile (n <= kTileRows): row r's head is head + r * ldh, its
// record rec[r] (L.NT). M_out[r] and g_out[r] may alias M[r] and g[r] (in place: a row's M
// and g are read in full before its write). Each stage is a loop over the rows: a row's
// stages are short dependency chains (horizontal max and sum, divisions), and independent
// rows back to back let them overlap instead of each waiting on the one before.
// mur_wt: the MUR weight transposed (m, m).
template <typename T>
FA_INLINE void ntm_fwd_body(const Layout& L, const T* mur_wt, const T* mur_b, int64_t n,
                            const T* const* M, const T* const* g, const T* head, int64_t ldh,
                            T* const* read, T* const* M_out, T* const* g_out, T* const* rec,
                            T* work) {
    const int64_t D = L.D, m = L.m;
    // the activated heads; the two betas of every row through one vector softplus
    T beta[2 * kTileRows], sp[2 * kTileRows], spg[2 * kTileRows];
    for (int64_t r = 0; r < n; ++r) {
        const T* hd = head + r * ldh;
        T* act = rec[r] + L.n_act;
        copy(act, hd, L.P);
        tanh_n(act, D);
        tanh_n(act + D + 1, D);
        sigmoid_n(act + 2 * D + 2, D);
        tanh_n(act + 3 * D + 2, D);
        beta[2 * r] = hd[D], beta[2 * r + 1] = hd[2 * D + 1];
    }
    softplus_n(beta, sp, spg, 2 * n);
    for (int64_t r = 0; r < n; ++r) {
        T* act = rec[r] + L.n_act;
        act[D] = sp[2 * r] + T(1);
        act[2 * D + 1] = sp[2 * r + 1] + T(1);
        rec[r][L.n_spg] = spg[2 * r];
        rec[r][L.n_spg + 1] = spg[2 * r + 1];
    }
    // |M(i)|, kʳ·M(i) and kʷ·M(i) in one pass over the memory
    for (int64_t r = 0; r < n; ++r) {
        const T* act = rec[r] + L.n_act;
        T* nM = rec[r] + L.n_nM;
        ntm_row_dots(M[r], m, D, act, act + D + 1, nM, rec[r] + L.n_rd + 1,
                     rec[r] + L.n_wd + 1);
#pragma omp simd
        for (int64_t i = 0; i < m; ++i) nM[i] = std::sqrt(nM[i]);
    }
    ntm_address(L, mur_wt, mur_b, n, g, rec, work);
    ntm_write_body<T>(L, n, M, g, rec, read, M_out, g_out);
}

// One row of ntm_bwd: its inputs (the state before the step, its NTM record, the
// gradients of the step's outputs; d_wr may be null) and outputs (dM (m, D), dg (m),
// dhead (P)).
template <typename T>
struct NtmBwdRow {
    const T *M, *g, *rec, *d_read, *d_M_out, *d_g_out, *d_wr;
    T *dM, *dg, *dhead;
};

// ntm_bwd's scalar stage for n rows: the MUR re-weighting's backward and both content
// addressings' coefficients, from and into the rows' work wk[r] (ntm_bwd_work layout; fp32
// on AVX-512: mimn_simd.inc ntm_address_bwd, one row per lane). Here, row by row: also fp32
// on AVX2, where the lane form (8 lanes, scalar scatters) made forward+backward 18% slower
// (B=256, T=200, slots=8: 269 -> 317 ms) while the forward's gained 8%.
template <typename T>
FA_INLINE void ntm_address_bwd(const Layout& L, int64_t n, const T* const* recs,
                               T* const* wks) {
#if FASTATTN_X86
    if constexpr (std::is_same_v<T, float>)
        if (mimn_isa() == 2) return simd512::ntm_address_bwd<F512>(ntm_addr(L), n, recs, wks);
#endif
    const int64_t D = L.D, m = L.m;
    for (int64_t r = 0; r < n; ++r) {
        const T* rec = recs[r];
        T* wk = wks[r];
        T *dwt = wk, *dww = wk + m, *dwr = wk + 2 * m, *dlog = wk + 7 * m, *t1 = wk + 8 * m,
          *t2 = wk + 9 * m, *sc = wk + 10 * m;
        const T* ww = rec + L.n_wd + 1 + 2 * m;
        if (!L.mur) {
            copy(dww, dwt, m);
        } else {
            const T* Pm = rec + L.n_Pm;
            const T u = rec[L.n_sum];
            const T s = dot_(dwt, rec + L.n_wt, m);
            for (int64_t i = 0; i < m; ++i) {
                const T du = (dwt[i] - s) / u;
                dww[i] = du * Pm[i];
                dlog[i] = du * ww[i];  // dP
                t1[i] = dlog[i] * Pm[i];
            }
            const T sp = sum_(t1, m);
            for (int64_t i = 0; i < m; ++i) dlog[i] = Pm[i] * (dlog[i] - sp);
        }
        const T* act = rec + L.n_act;
        const T* nM = rec + L.n_nM;
        sc[2] = content_bwd_coef(dwr, rec + L.n_rd, act[D], nM, m, wk + 3 * m, wk + 4 * m,
                                 &sc[0], t1, t2);
        sc[3] = content_bwd_coef(dww, rec + L.n_wd, act[2 * D + 1], nM, m, wk + 5 * m,
                                 wk + 6 * m, &sc[1], t1, t2);
    }
}

// Backward of ntm_fwd for n rows (n <= kTileRows), stage by stage over the rows as the
// forward; the MUR gradients are accumulated over the rows in row order. work:
// ntm_bwd_work(m) per row.
template <typename T>
FA_INLINE void ntm_bwd_body(const Layout& L, const T* mur_w, int64_t n, const NtmBwdRow<T>* rows,
                            T* dmur_w, T* dmur_b, T* work) {
    const int64_t D = L.D, m = L.m, ws = ntm_bwd_work(m);
    // Write (M_out = M ⊙ (1 - w~ eᵀ) + w~ aᵀ, g_out = g + w~) and read (read = Σ_i wr(i)
    // M(i)) in one pass over the memory: dM, de, da and the per-slot sums s(i) (into dwt)
    // and d_read·M(i) (into dwr).
    const T* recs[kTileRows];
    T* wks[kTileRows];
    for (int64_t r = 0; r < n; ++r) {
        const NtmBwdRow<T>& q = rows[r];
        const T* act = q.rec + L.n_act;
        T* wk = work + r * ws;
        recs[r] = q.rec, wks[r] = wk;
        T *dwt = wk, *dwr = wk + 2 * m;
        zero(q.dhead, L.P);
        ntm_bwd_pass1(q.M, q.d_M_out, m, D, q.rec + L.n_wt, q.rec + L.n_rd + 1 + 2 * m,
                      act + 2 * D + 2, act + 3 * D + 2, q.d_read, q.dM, q.dhead + 2 * D + 2,
                      q.dhead + 3 * D + 2, dwt, dwr);
        for (int64_t i = 0; i < m; ++i) {
            dwt[i] += q.d_g_out[i];
            q.dg[i] = q.d_g_out[i];
            if (q.d_wr) dwr[i] += q.d_wr[i];
        }
    }
    ntm_address_bwd(L, n, recs, wks);
    // MUR's parameter gradients, in row order, and its part of dg
    if (L.mur)
        for (int64_t r = 0; r < n; ++r) {
            const T* dlog = wks[r] + 7 * m;
            add_to(dmur_b, dlog, m);
            outer_acc(dmur_w, dlog, rows[r].g, m, m);
            matvec_t_acc(mur_w, dlog, m, m, rows[r].dg);
        }
    // Both content addressings in one pass over the memory, and the heads' activations
    for (int64_t r = 0; r < n; ++r) {
        const NtmBwdRow<T>& q = rows[r];
        const T* act = q.rec + L.n_act;
        const T* spg = q.rec + L.n_spg;
        const T *kr = act, *kw = act + D + 1, *er = act + 2 * D + 2, *ad = act + 3 * D + 2;
        const T* wk = wks[r];
        const T* sc = wk + 10 * m;  // ckr, ckw, dβr, dβw
        T *dkr = q.dhead, *dkw = q.dhead + D + 1, *de = q.dhead + 2 * D + 2,
          *da = q.dhead + 3 * D + 2;
        ntm_bwd_pass2(q.M, m, D, wk + 3 * m, wk + 5 * m, wk + 4 * m, wk + 6 * m, kr, kw,
                      sc[0], sc[1], q.dM, dkr, dkw);
        dkr[D] = sc[2] * spg[0];
        dkw[D] = sc[3] * spg[1];
        for (int64_t e = 0; e < D; ++e) de[e] *= er[e] * (T(1) - er[e]);
        for (int64_t e = 0; e < D; ++e) da[e] *= T(1) - ad[e] * ad[e];
    }
}

FA_ISA_VARIANTS(ntm_fwd)
FA_ISA_VARIANTS(ntm_bwd)

// ntm_fwd for one row (the per-row NTM ops); work: addr_work(m).
template <typename T>
inline void ntm_fwd_row(const Layout& L, const T* mur_wt, const T* mur_b, const T* M,
                        const T* g, const T* head, T* read, T* M_out, T* g_out, T* rec,
                        T* work) {
    ntm_fwd(L, mur_wt, mur_b, int64_t(1), &M, &g, head, L.P, &read, &M_out, &g_out, &rec,
            work);
}

// ----------------------------------------------------------------------------- MIU (step 7)

// The miu_k channels with the largest wr, ties to the smaller index (a stable descending
// sort), listed in increasing channel order. Returns how many (min(k, m)). NaN counts as
// larger than every number (torch.sort's descending order), NaNs tie: the reference and
// every backend pick the same channels when read weights are NaN.
// sel: room for 2m (the second half flags the channels taken).
#if FASTATTN_X86
// fp32, m <= 16 on AVX-512: the m weights in one vector, each pass a masked compare for
// NaNs, else a max and the first lane equal to it (±0 compare equal: the first wins, as in
// the scalar scan); the scalar scan was a dependent chain per slot, ~7% of the forward
// at slots = 16.
FA_TARGET_AVX512F inline int64_t miu_select_avx512(const float* wr, int64_t m, int64_t k,
                                                  int64_t* sel) {
    __mmask16 avail = static_cast<__mmask16>(m >= 16 ? 0xFFFFu : (1u << m) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(avail, wr);
    const int64_t n = std::min(k, m);
    unsigned taken = 0;
    for (int64_t p = 0; p < n; ++p) {
        unsigned hit = _mm512_mask_cmp_ps_mask(avail, v, v, _CMP_UNORD_Q);
        if (!hit) {
            const __m512 mx = _mm512_set1_ps(_mm512_mask_reduce_max_ps(avail, v));
            hit = _mm512_mask_cmp_ps_mask(avail, v, mx, _CMP_EQ_OQ);
        }
        const unsigned best = hit & (0u - hit);  // the lowest set bit
        taken |= best;
        avail = static_cast<__mmask16>(avail & ~best);
    }
    int64_t c = 0;
    for (; taken; taken &= taken - 1) sel[c++] = __builtin_ctz(taken);
    return c;
}
#endif
template <typename T>
FA_INLINE int64_t miu_select(const T* wr, int64_t m, int64_t k, int64_t* sel) {
#if FASTATTN_X86
    if constexpr (std::is_same_v<T, float>)
        if (m <= 16 && mimn_isa() == 2) return miu_select_avx512(wr, m, k, sel);
#endif
    // k passes of "the first best channel not taken yet": O(k·m), k is small
    int64_t* taken = sel + m;
    for (int64_t j = 0; j < m; ++j) taken[j] = 0;
    const int64_t n = std::min(k, m);
    for (int64_t p = 0; p < n; ++p) {
        // the first best channel not taken: scanning in index order, channel j beats the
        // best so far (value b) if wr[j] is NaN and b is not, or wr[j] > b (false for a NaN
        // b); without branches (the argmax's branches were mispredicted)
        int64_t best = -1;
        T b = T(0);
        bool bnan = false;
        for (int64_t j = 0; j < m; ++j) {
            const T a = wr[j];
            const bool anan = std::isnan(a);
            const bool better = !taken[j] & ((best < 0) | (anan ? !bnan : (a > b)));
            best = better ? j : best;
            b = better ? a : b;
            bnan = better ? anan : bnan;
        }
        taken[best] = 1;
    }
    int64_t c = 0;
    for (int64_t j = 0; j < m; ++j)
        if (taken[j]) sel[c++] = j;
    return c;
}

// Everything a thread needs to step one tile (forward, and with bwd its backward):
// contiguous padded GEMM operands, GRU scratch, pointer arrays.
template <typename T>
struct TileWork {
    int64_t R = 0, Rk = 0;
    T *head = nullptr, *ntm = nullptr;
    GruWork<T> gc, gm;
    // backward only: the weight-gradient batches (controller GRU, MIU GRU, heads; their x
    // parts hold the packed GEMM inputs) and the per-step gradients
    WGradBatch<T> c_ih, c_hh, m_ih, m_hh, hw;
    T *dhc = nullptr, *dXc = nullptr, *dHc = nullptr, *dXm = nullptr, *dHm = nullptr;
    std::vector<int64_t> sel;
    std::vector<const T*> q0, q1, q2;        // step-level (R)
    std::vector<T*> p0, p1, p2, p3;
    std::vector<T*> gt, go;                  // GRU-level (Rk)
    std::vector<const T*> gd, ga, gb, gh;    // GRU-level (Rk): input parts, hidden states

    void carve(Arena<T>& a, const Layout& L, const GruP<T>& ctrl, const GruP<T>& miu,
               int64_t Pp, int64_t rows, bool bwd) {
        R = rows, Rk = rows * std::max<int64_t>(L.k, 1);
        head = a.take(R * Pp);
        ntm = a.take(std::max(R * ntm_bwd_work(L.m), addr_work(L.m)));  // ntm_bwd's, ntm_fwd's
        gc.carve(a, R, ctrl.Np);
        gm.carve(a, Rk, miu.Np);
        if (bwd) {
            const int64_t Rc = ctrl.N ? kGradSteps * R : 0, Rm = miu.N ? kGradSteps * Rk : 0;
            c_ih.carve(a, Rc, ctrl.N, ctrl.Np, ctrl.Kp);
            c_hh.carve(a, Rc, ctrl.N, ctrl.Np, ctrl.Hp);
            m_ih.carve(a, Rm, miu.N, miu.Np, miu.Kp);
            m_hh.carve(a, Rm, miu.N, miu.Np, miu.Hp);
            hw.carve(a, Rc, L.P, L.P, ctrl.Hp);
            dhc = a.take(R * ctrl.Hp);
            dXc = a.take(R * ctrl.Kp), dHc = a.take(R * ctrl.Hp);
            dXm = a.take(Rk * miu.Kp), dHm = a.take(Rk * miu.Hp);
        }
        if (a.p == nullptr) return;
        sel.assign(2 * std::max<int64_t>(L.m, 1), 0);
        for (auto* v : {&q0, &q1, &q2}) v->assign(R, nullptr);
        for (auto* v : {&p0, &p1, &p2, &p3}) v->assign(R, nullptr);
        gt.assign(Rk, nullptr), go.assign(Rk, nullptr), gd.assign(Rk, nullptr);
        ga.assign(Rk, nullptr), gb.assign(Rk, nullptr), gh.assign(Rk, nullptr);
    }
};

// row r of a padded (rows, ld) operand: n values from src, zeros up to ld
template <typename T>
FA_INLINE void put_row(T* dst, const T* src, int64_t n, int64_t ld) {
    copy(dst, src, n);
    zero(dst + n, ld - n);
}

// Step 7 over n rows: Mt[r] (m, D) the memory after the write, x[r] (Dx), S[r] (m, Hs),
// wr[r] (m) -> S_out[r] (m, Hs) and the MIU record rec[r]. S_out[r] may be S[r] (in place:
// only the chosen channels are written).
template <typename T>
void miu_tile_fwd(const Layout& L, const GruP<T>& c, int64_t n, const T* const* Mt,
                  const T* const* x, const T* const* S, const T* const* wr, T* const* S_out,
                  T* const* rec, TileWork<T>& w) {
    const int64_t D = L.D, Hs = L.Hs, k = L.k;
    int64_t q = 0;
    for (int64_t r = 0; r < n; ++r) {
        if (S_out[r] != S[r]) copy(S_out[r], S[r], L.m * Hs);
        const int64_t ns = miu_select(wr[r], L.m, k, w.sel.data());
        for (int64_t j = 0; j < ns; ++j, ++q) {
            const int64_t i = w.sel[j];
            rec[r][j] = T(i);
            // the GRU reads [M(i), x] and S(i) in place; the tape keeps S(i) before the step
            copy(rec[r] + k + 4 * Hs * k + Hs * j, S[r] + i * Hs, Hs);
            w.ga[q] = Mt[r] + i * D;
            w.gb[q] = x[r];
            w.gh[q] = rec[r] + k + 4 * Hs * k + Hs * j;
            w.gt[q] = rec[r] + k + 4 * Hs * j;
            w.go[q] = S_out[r] + i * Hs;
        }
    }
    gru_tile_fwd(c, q, w.ga.data(), D, w.gb.data(), w.gh.data(), w.gt.data(), w.go.data(),
                 w.gm);
}

// Its backward: writes dS[r] (m, Hs) (may be dS_out[r]: in place), accumulates dMt[r],
// dx[r] and the GRU gradients. The chosen channels' states before the step come from rec.
template <typename T>
void miu_tile_bwd(const Layout& L, const GruP<T>& c, const GruAcc<T>& acc, int64_t n,
                  const T* const* Mt, const T* const* x, const T* const* rec,
                  const T* const* dS_out, T* const* dMt, T* const* dx, T* const* dS,
                  TileWork<T>& w) {
    const int64_t D = L.D, Hs = L.Hs, k = L.k;
    w.m_ih.reserve(n * k, acc.w_ih), w.m_hh.reserve(n * k, acc.w_hh);
    T* xm = w.m_ih.x_at();
    T* sm = w.m_hh.x_at();
    int64_t q = 0;
    for (int64_t r = 0; r < n; ++r) {
        if (dS[r] != dS_out[r]) copy(dS[r], dS_out[r], L.m * Hs);
        for (int64_t j = 0; j < k; ++j, ++q) {
            const int64_t i = static_cast<int64_t>(rec[r][j]);
            T* xr = xm + q * c.Kp;
            copy(xr, Mt[r] + i * D, D);
            put_row(xr + D, x[r], L.Dx, c.Kp - D);
            put_row(sm + q * c.Hp, rec[r] + k + 4 * Hs * k + Hs * j, Hs, c.Hp);
            w.gt[q] = const_cast<T*>(rec[r] + k + 4 * Hs * j);
            w.gd[q] = dS_out[r] + i * Hs;
        }
    }
    gru_tile_bwd(c, acc, q, w.gt.data(), w.gd.data(), w.dXm, w.dHm, w.m_ih, w.m_hh);
    q = 0;
    for (int64_t r = 0; r < n; ++r) {
        for (int64_t j = 0; j < k; ++j, ++q) {
            const int64_t i = static_cast<int64_t>(rec[r][j]);
            copy(dS[r] + i * Hs, w.dHm + q * c.Hp, Hs);
            add_to(dMt[r] + i * D, w.dXm + q * c.Kp, D);
            add_to(dx[r], w.dXm + q * c.Kp + D, L.Dx);
        }
    }
}

// ----------------------------------------------------------------------------- scan step

// The MUR weight (m, m) transposed (empty without MUR).
template <typename T>
std::vector<T> transposed(const T* W, int64_t m, bool present) {
    std::vector<T> t;
    if (!present) return t;
    t.resize(m * m);
    for (int64_t j = 0; j < m; ++j)
        for (int64_t k = 0; k < m; ++k) t[k * m + j] = W[j * m + k];
    return t;
}

// Built once per kernel call, before the parallel region (it packs the weights).
template <typename T>
struct Model {
    Layout L;
    GruP<T> ctrl, miu;
    const T *heads_w, *heads_b, *mur_w, *mur_b;
    int64_t Pp, Hcp;
    std::vector<T> heads_t, heads_bp, heads_wp;  // (Hc, Pp), (Pp), (P, Hcp)
    std::vector<T> mur_wt;                       // (m, m), MUR's weight transposed
    Model(const MimnDims& d, const MimnWeights<T>& w)
        : L(d),
          ctrl(w.ctrl_w_ih, w.ctrl_w_hh, w.ctrl_b_ih, w.ctrl_b_hh, d.Hc, d.Dx + d.D, true),
          miu(w.miu_w_ih, w.miu_w_hh, w.miu_b_ih, w.miu_b_hh, d.Hs, d.D + d.Dx, L.k > 0),
          heads_w(w.heads_w),
          heads_b(w.heads_b),
          mur_w(w.mur_w),
          mur_b(w.mur_b),
          Pp(pad16(L.P)),
          Hcp(pad16(d.Hc)),
          heads_t(d.Hc * Pp, T(0)),
          heads_bp(Pp, T(0)),
          heads_wp(L.P * Hcp, T(0)),
          mur_wt(transposed(w.mur_w, d.m, d.has_mur)) {
        for (int64_t j = 0; j < L.P; ++j) {
            for (int64_t k = 0; k < d.Hc; ++k)
                heads_t[k * Pp + j] = heads_wp[j * Hcp + k] = w.heads_w[j * d.Hc + k];
            heads_bp[j] = w.heads_b[j];
        }
    }
    Model(const Model&) = delete;
    Model& operator=(const Model&) = delete;
};

// A tile's parameter-gradient accumulators (padded like the packed weights).
template <typename T>
struct TileAcc {
    GruAcc<T> ctrl, miu;
    T *heads_w = nullptr, *heads_b = nullptr, *mur_w = nullptr, *mur_b = nullptr;
    void carve(Arena<T>& a, const Model<T>& md) {
        ctrl.carve(a, md.ctrl), miu.carve(a, md.miu);
        heads_w = a.take(md.L.P * md.Hcp), heads_b = a.take(md.L.P);
        mur_w = a.take(md.L.m * md.L.m), mur_b = a.take(md.L.m);
    }
    void clear(const Model<T>& md) {
        ctrl.clear(md.ctrl), miu.clear(md.miu);
        zero(heads_w, md.L.P * md.Hcp), zero(heads_b, md.L.P);
        zero(mur_w, md.L.m * md.L.m), zero(mur_b, md.L.m);
    }
    // into slot `i` of the (B, *param.shape) partial-sum arrays
    void store(const Model<T>& md, const MimnWeightGrads<T>& dw, int64_t i) const {
        const Layout& L = md.L;
        const int64_t Nc = md.ctrl.N, Kc = md.ctrl.K, Ns = md.miu.N, Ks = md.miu.K;
        ctrl.store(md.ctrl, dw.ctrl_w_ih + i * Nc * Kc, dw.ctrl_w_hh + i * Nc * L.Hc,
                   dw.ctrl_b_ih + i * Nc, dw.ctrl_b_hh + i * Nc);
        for (int64_t j = 0; j < L.P; ++j)
            copy(dw.heads_w + (i * L.P + j) * L.Hc, heads_w + j * md.Hcp, L.Hc);
        copy(dw.heads_b + i * L.P, heads_b, L.P);
        if (L.mur) {
            copy(dw.mur_w + i * L.m * L.m, mur_w, L.m * L.m);
            copy(dw.mur_b + i * L.m, mur_b, L.m);
        }
        if (L.k > 0)
            miu.store(md.miu, dw.miu_w_ih + i * Ns * Ks, dw.miu_w_hh + i * Ns * L.Hs,
                      dw.miu_b_ih + i * Ns, dw.miu_b_hh + i * Ns);
    }
};

// Steps 1-7 of one valid step for the first n rows of a tile: state s[r] -> s1[r], tape[r]
// written; x[r] is row r's x_t. s1[r] may be s[r] (the whole step in place). S: with Sio
// null, s[r]'s S -> s1[r]'s; else Sio[r] (m, Hs) is updated in place and the S slots of s
// and s1 are not touched (the tape keeps the chosen channels' previous states).
template <typename T>
void tile_step_fwd(const Model<T>& md, int64_t n, const T* const* x, const T* const* s,
                   T* const* s1, T* const* tape, TileWork<T>& w, T* const* Sio = nullptr) {
    const Layout& L = md.L;
    const GruP<T>& c = md.ctrl;
    // every operand read in place: x_t, r_{t-1} and h_{t-1} of each row
    for (int64_t r = 0; r < n; ++r) {
        w.gb[r] = s[r] + L.s_r;
        w.gh[r] = s[r] + L.s_h;
        w.gt[r] = tape[r] + L.t_ctrl;
        w.go[r] = s1[r] + L.s_h;
    }
    gru_tile_fwd(c, n, x, L.Dx, w.gb.data(), w.gh.data(), w.gt.data(), w.go.data(), w.gc);
    gemm(n, md.Pp, L.Hc, const_cast<const T* const*>(w.go.data()), 0, md.heads_t.data(), md.Pp,
         md.heads_bp.data(), 0, w.head, md.Pp);
    for (int64_t r = 0; r < n; ++r) {
        w.q0[r] = s[r] + L.s_M, w.q1[r] = s[r] + L.s_g;
        w.p0[r] = s1[r] + L.s_r, w.p1[r] = s1[r] + L.s_M, w.p2[r] = s1[r] + L.s_g;
        w.p3[r] = tape[r] + L.t_ntm;
    }
    ntm_fwd(L, md.mur_wt.data(), md.mur_b, n, w.q0.data(), w.q1.data(),
            static_cast<const T*>(w.head), md.Pp, w.p0.data(), w.p1.data(), w.p2.data(),
            w.p3.data(), w.ntm);
    if (L.k == 0) {
        if (!Sio)
            for (int64_t r = 0; r < n; ++r)
                if (s1[r] != s[r]) copy(s1[r] + L.s_S, s[r] + L.s_S, L.m * L.Hs);
        return;
    }
    for (int64_t r = 0; r < n; ++r) {
        w.q0[r] = s1[r] + L.s_M;
        w.q1[r] = Sio ? Sio[r] : s[r] + L.s_S;
        w.q2[r] = tape[r] + L.t_ntm + L.n_rd + 1 + 2 * L.m;  // wr
        w.p0[r] = Sio ? Sio[r] : s1[r] + L.s_S;
        w.p1[r] = tape[r] + L.t_miu;
    }
    miu_tile_fwd(L, md.miu, n, w.q0.data(), x, w.q1.data(), w.q2.data(), w.p0.data(),
                 w.p1.data(), w);
}

// The state after one valid step from the step's stored tape (the backward's replay when
// the forward kept its tapes): h from the tape, r, M and g through ntm_fwd's last stage.
// Bitwise the forward's state: the same stage on the same inputs. S is not replayed (the
// backward reads the chosen channels' previous states from the tape).
template <typename T>
void tile_step_from_tape(const Layout& L, int64_t n, const T* const* s, T* const* s1,
                         const T* const* tape, TileWork<T>& w) {
    for (int64_t r = 0; r < n; ++r) {
        copy(s1[r] + L.s_h, tape[r] + L.t_h1, L.Hc);
        w.q0[r] = s[r] + L.s_M, w.q1[r] = s[r] + L.s_g, w.q2[r] = tape[r] + L.t_ntm;
        w.p0[r] = s1[r] + L.s_r, w.p1[r] = s1[r] + L.s_M, w.p2[r] = s1[r] + L.s_g;
    }
    ntm_write(L, n, static_cast<const T* const*>(w.q0.data()),
              static_cast<const T* const*>(w.q1.data()),
              static_cast<const T* const*>(w.q2.data()), w.p0.data(), w.p1.data(), w.p2.data());
}

// Backward of one valid step for the first n rows: gs[r] holds the gradients of the state
// after the step (its r slot already includes d_reads[t]; its M slot is modified); writes
// the gradients of the state before the step into gs0[r], accumulates dx[r] and the
// tile's parameter gradients. The S slots of s and s1 are not read (the tape has what the
// MIU needs). dSio non-null: the S gradient is dSio[r], updated in place, and the S slots
// of gs and gs0 are not touched.
template <typename T>
void tile_step_bwd(const Model<T>& md, const TileAcc<T>& acc, int64_t n, const T* const* x,
                   const T* const* s, const T* const* s1, const T* const* tape, T* const* gs,
                   T* const* gs0, T* const* dx, TileWork<T>& w, T* const* dSio = nullptr) {
    const Layout& L = md.L;
    const GruP<T>& c = md.ctrl;
    if (L.k > 0) {
        for (int64_t r = 0; r < n; ++r) {
            w.q0[r] = s1[r] + L.s_M;
            w.q2[r] = tape[r] + L.t_miu;
            w.p0[r] = gs[r] + L.s_M;
            w.p1[r] = dSio ? dSio[r] : gs0[r] + L.s_S;
        }
        // dS_out = gs.S: read through q1 as const
        for (int64_t r = 0; r < n; ++r) w.q1[r] = dSio ? dSio[r] : gs[r] + L.s_S;
        miu_tile_bwd(L, md.miu, acc.miu, n, w.q0.data(), x, w.q2.data(), w.q1.data(),
                     w.p0.data(), dx, w.p1.data(), w);
    } else if (!dSio) {
        for (int64_t r = 0; r < n; ++r) copy(gs0[r] + L.s_S, gs[r] + L.s_S, L.m * L.Hs);
    }
    w.hw.reserve(n, acc.heads_w);
    T* dhead = w.hw.dy_at();
    NtmBwdRow<T> q[kTileRows];
    for (int64_t r = 0; r < n; ++r)
        q[r] = {s[r] + L.s_M, s[r] + L.s_g, tape[r] + L.t_ntm, gs[r] + L.s_r, gs[r] + L.s_M,
                gs[r] + L.s_g, nullptr, gs0[r] + L.s_M, gs0[r] + L.s_g, dhead + r * L.P};
    ntm_bwd(L, md.mur_w, n, static_cast<const NtmBwdRow<T>*>(q), acc.mur_w, acc.mur_b, w.ntm);
    // heads Linear: dh = gs.h + dhead W; dW += dheadᵀ h1 (batched), db += dhead
    T* h1 = w.hw.x_at();
    for (int64_t r = 0; r < n; ++r) {
        put_row(w.dhc + r * c.Hp, gs[r] + L.s_h, L.Hc, c.Hp);
        put_row(h1 + r * c.Hp, s1[r] + L.s_h, L.Hc, c.Hp);
    }
    gemm(n, c.Hp, L.P, dhead, L.P, 1, md.heads_wp.data(), c.Hp, w.dhc, c.Hp, w.dhc, c.Hp);
    for (int64_t r = 0; r < n; ++r) add_to(acc.heads_b, dhead + r * L.P, L.P);
    w.hw.q += n;
    // controller GRU on [x_t, r_{t-1}]
    w.c_ih.reserve(n, acc.ctrl.w_ih), w.c_hh.reserve(n, acc.ctrl.w_hh);
    T* xc = w.c_ih.x_at();
    T* hm = w.c_hh.x_at();
    for (int64_t r = 0; r < n; ++r) {
        T* xr = xc + r * c.Kp;
        copy(xr, x[r], L.Dx);
        put_row(xr + L.Dx, s[r] + L.s_r, L.D, c.Kp - L.Dx);
        put_row(hm + r * c.Hp, s[r] + L.s_h, L.Hc, c.Hp);
        w.gt[r] = const_cast<T*>(tape[r] + L.t_ctrl);
        w.gd[r] = w.dhc + r * c.Hp;
    }
    gru_tile_bwd(c, acc.ctrl, n, w.gt.data(), w.gd.data(), w.dXc, w.dHc, w.c_ih, w.c_hh);
    for (int64_t r = 0; r < n; ++r) {
        add_to(dx[r], w.dXc + r * c.Kp, L.Dx);
        copy(gs0[r] + L.s_r, w.dXc + r * c.Kp + L.Dx, L.D);
        copy(gs0[r] + L.s_h, w.dHc + r * c.Hp, L.Hc);
    }
}

// Copies between a flat state and the (B, [NC,] ...) arrays of MimnStates.
template <typename T, typename U>
void load_state(const Layout& L, const MimnStates<U>& st, int64_t idx, T* s) {
    copy(s + L.s_h, st.h + idx * L.Hc, L.Hc);
    copy(s + L.s_r, st.r + idx * L.D, L.D);
    copy(s + L.s_M, st.M + idx * L.m * L.D, L.m * L.D);
    copy(s + L.s_g, st.g + idx * L.m, L.m);
    copy(s + L.s_S, st.S + idx * L.m * L.Hs, L.m * L.Hs);
}
template <typename T>
void store_state(const Layout& L, const T* s, const MimnStates<T>& st, int64_t idx) {
    copy(st.h + idx * L.Hc, s + L.s_h, L.Hc);
    copy(st.r + idx * L.D, s + L.s_r, L.D);
    copy(st.M + idx * L.m * L.D, s + L.s_M, L.m * L.D);
    copy(st.g + idx * L.m, s + L.s_g, L.m);
    copy(st.S + idx * L.m * L.Hs, s + L.s_S, L.m * L.Hs);
}

void check_lengths(const int64_t* lengths, int64_t B, int64_t T, const char* fn) {
    check_range(lengths, B, 0, T + 1, fn, "lengths");
}

// Per-thread buffers allocated up front (an exception inside a parallel region would
// terminate the process), zero-filled once.
template <typename T>
struct Scratch {
    std::vector<AlignedBuffer<T>> buf;
    Scratch(int nthreads, size_t n) : buf(nthreads) {
        for (int i = 0; i < nthreads; ++i) {
            buf[i].resize(std::max<size_t>(n, 1));
            std::memset(buf[i].data(), 0, sizeof(T) * std::max<size_t>(n, 1));
        }
    }
};

// Rows by length, longest first (ties in row order): the rows of a tile still running at
// step t are then a prefix of the tile.
// (lengths null: every row has all T steps.)
std::vector<int64_t> rows_by_length(const int64_t* lengths, int64_t B) {
    std::vector<int64_t> order(B);
    std::iota(order.begin(), order.end(), int64_t(0));
    if (lengths)
        std::stable_sort(order.begin(), order.end(),
                         [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
    return order;
}
// How many of a tile's rows (sorted as above) are valid at step t.
inline int64_t running(const int64_t* lengths, const int64_t* rows, int64_t nr, int64_t t) {
    if (!lengths) return nr;
    int64_t n = nr;
    while (n > 0 && lengths[rows[n - 1]] <= t) --n;
    return n;
}

}  // namespace

// ============================================================================= entry points

template <typename T>
void ntm_read_write_fwd(const MimnDims& d, const T* M, const T* g, const T* head,
                        const T* mur_w, const T* mur_b, T* read, T* M_out, T* g_out, T* wr,
                        int nthreads) {
    const Layout L(d);
    const std::vector<T> mur_wt = transposed(mur_w, L.m, L.mur);
    Scratch<T> sc(nthreads, L.NT + addr_work(L.m));
#pragma omp parallel num_threads(nthreads)
    {
        const FlushDenormals ftz;  // per thread: see cpu_features.h
        T* rec = sc.buf[omp_get_thread_num()].data();
#pragma omp for schedule(static)
        for (int64_t b = 0; b < d.B; ++b) {
            ntm_fwd_row(L, mur_wt.data(), mur_b, M + b * L.m * L.D, g + b * L.m,
                        head + b * L.P, read + b * L.D, M_out + b * L.m * L.D, g_out + b * L.m,
                        rec, rec + L.NT);
            copy(wr + b * L.m, rec + L.n_rd + 1 + 2 * L.m, L.m);
        }
    }
}

template <typename T>
void ntm_read_write_bwd(const MimnDims& d, const T* d_read, const T* d_M_out, const T* d_g_out,
                        const T* d_wr, const T* M, const T* g, const T* head, const T* mur_w,
                        const T* mur_b, T* dM, T* dg, T* dhead, T* dmur_w_rows,
                        T* dmur_b_rows, int nthreads) {
    const Layout L(d);
    const std::vector<T> mur_wt = transposed(mur_w, L.m, L.mur);
    const int64_t nwork = std::max(ntm_bwd_work(L.m), addr_work(L.m));  // ntm_bwd's, ntm_fwd's
    Scratch<T> sc(nthreads, L.NT + nwork + L.D + L.m * L.D + L.m);
#pragma omp parallel num_threads(nthreads)
    {
        const FlushDenormals ftz;  // per thread: see cpu_features.h
        T* rec = sc.buf[omp_get_thread_num()].data();
        T* work = rec + L.NT;
        T* junk = work + nwork;  // M_out / read of the recomputation
#pragma omp for schedule(static)
        for (int64_t b = 0; b < d.B; ++b) {
            const T* Mb = M + b * L.m * L.D;
            const T* gb = g + b * L.m;
            ntm_fwd_row(L, mur_wt.data(), mur_b, Mb, gb, head + b * L.P, junk, junk + L.D,
                        junk + L.D + L.m * L.D, rec, work);
            T* dmw = L.mur ? dmur_w_rows + b * L.m * L.m : nullptr;
            T* dmb = L.mur ? dmur_b_rows + b * L.m : nullptr;
            if (L.mur) {
                zero(dmw, L.m * L.m);
                zero(dmb, L.m);
            }
            const NtmBwdRow<T> q{Mb, gb, rec, d_read + b * L.D, d_M_out + b * L.m * L.D,
                                 d_g_out + b * L.m, d_wr ? d_wr + b * L.m : nullptr,
                                 dM + b * L.m * L.D, dg + b * L.m, dhead + b * L.P};
            ntm_bwd(L, mur_w, int64_t(1), &q, dmw, dmb, work);
        }
    }
}

// The standalone MIU op runs the same tile code as the scan, over rows in their order.
template <typename T>
void miu_gather_gru_fwd(const MimnDims& d, const T* M, const T* x, const T* S, const T* wr,
                        const T* w_ih, const T* w_hh, const T* b_ih, const T* b_hh, T* S_out,
                        int nthreads) {
    const Layout L(d);
    const int64_t mh = L.m * L.Hs, MD = L.m * L.D;
    if (L.k == 0) {
        copy(S_out, S, d.B * mh);
        return;
    }
    const GruP<T> none(nullptr, nullptr, nullptr, nullptr, 0, 0, false);
    const GruP<T> c(w_ih, w_hh, b_ih, b_hh, d.Hs, d.D + d.Dx, true);
    const int64_t R = tile_rows(d.B), recn = L.k * (1 + 5 * L.Hs);
    Arena<T> count{nullptr};
    TileWork<T>().carve(count, L, none, c, 0, R, false);
    count.take(R * recn);
    Scratch<T> sc(nthreads, count.used);
    const int64_t ntiles = (d.B + R - 1) / R;
#pragma omp parallel num_threads(nthreads)
    {
        const FlushDenormals ftz;  // per thread: see cpu_features.h
        Arena<T> a{sc.buf[omp_get_thread_num()].data()};
        TileWork<T> w;
        w.carve(a, L, none, c, 0, R, false);
        T* recs = a.take(R * recn);
        std::vector<const T*> pM(R), px(R), pS(R), pw(R);
        std::vector<T*> po(R), pr(R);
#pragma omp for schedule(static)
        for (int64_t ti = 0; ti < ntiles; ++ti) {
            const int64_t b0 = ti * R, n = std::min(R, d.B - b0);
            for (int64_t r = 0; r < n; ++r) {
                const int64_t b = b0 + r;
                pM[r] = M + b * MD, px[r] = x + b * L.Dx, pS[r] = S + b * mh;
                pw[r] = wr + b * L.m, po[r] = S_out + b * mh, pr[r] = recs + r * recn;
            }
            miu_tile_fwd(L, c, n, pM.data(), px.data(), pS.data(), pw.data(), po.data(),
                         pr.data(), w);
        }
    }
}

// Parameter gradients: the partial sums of row tile i in slot i of the (B, ...) arrays,
// the other slots zero (the caller sums over the first axis).
template <typename T>
void miu_gather_gru_bwd(const MimnDims& d, const T* d_S_out, const T* M, const T* x,
                        const T* S, const T* wr, const T* w_ih, const T* w_hh, const T* b_ih,
                        const T* b_hh, T* dM, T* dx, T* dS, T* dw_ih_rows, T* dw_hh_rows,
                        T* db_ih_rows, T* db_hh_rows, int nthreads) {
    const Layout L(d);
    const int64_t mh = L.m * L.Hs, MD = L.m * L.D, K = L.D + L.Dx, G = 3 * L.Hs;
    zero(dM, d.B * MD);
    zero(dx, d.B * L.Dx);
    const int64_t R = tile_rows(d.B), ntiles = (d.B + R - 1) / R;
    if (L.k == 0) {
        copy(dS, d_S_out, d.B * mh);
        zero(dw_ih_rows, d.B * G * K), zero(dw_hh_rows, d.B * G * L.Hs);
        zero(db_ih_rows, d.B * G), zero(db_hh_rows, d.B * G);
        return;
    }
    const GruP<T> none(nullptr, nullptr, nullptr, nullptr, 0, 0, false);
    const GruP<T> c(w_ih, w_hh, b_ih, b_hh, d.Hs, K, true);
    const int64_t recn = L.k * (1 + 5 * L.Hs);
    Arena<T> count{nullptr};
    TileWork<T>().carve(count, L, none, c, 0, R, true);
    GruAcc<T>().carve(count, c);
    count.take(R * recn);
    count.take(R * mh);
    Scratch<T> sc(nthreads, count.used);
    zero(dw_ih_rows + ntiles * G * K, (d.B - ntiles) * G * K);
    zero(dw_hh_rows + ntiles * G * L.Hs, (d.B - ntiles) * G * L.Hs);
    zero(db_ih_rows + ntiles * G, (d.B - ntiles) * G);
    zero(db_hh_rows + ntiles * G, (d.B - ntiles) * G);
#pragma omp parallel num_threads(nthreads)
    {
        const FlushDenormals ftz;  // per thread: see cpu_features.h
        Arena<T> a{sc.buf[omp_get_thread_num()].data()};
        TileWork<T> w;
        w.carve(a, L, none, c, 0, R, true);
        GruAcc<T> acc;
        acc.carve(a, c);
        T* recs = a.take(R * recn);
        T* junk = a.take(R * mh);  // S_out of the recomputation
        std::vector<const T*> pM(R), px(R), pS(R), pw(R), pdo(R);
        std::vector<T*> po(R), pr(R), pdM(R), pdx(R), pdS(R);
#pragma omp for schedule(static)
        for (int64_t ti = 0; ti < ntiles; ++ti) {
            const int64_t b0 = ti * R, n = std::min(R, d.B - b0);
            for (int64_t r = 0; r < n; ++r) {
                const int64_t b = b0 + r;
                pM[r] = M + b * MD, px[r] = x + b * L.Dx, pS[r] = S + b * mh;
                pw[r] = wr + b * L.m, po[r] = junk + r * mh, pr[r] = recs + r * recn;
                pdo[r] = d_S_out + b * mh, pdM[r] = dM + b * MD, pdx[r] = dx + b * L.Dx;
                pdS[r] = dS + b * mh;
            }
            miu_tile_fwd(L, c, n, pM.data(), px.data(), pS.data(), pw.data(), po.data(),
                         pr.data(), w);
            acc.clear(c);
            miu_tile_bwd(L, c, acc, n, pM.data(), px.data(), pr.data(), pdo.data(),
                         pdM.data(), pdx.data(), pdS.data(), w);
            w.m_ih.flush(acc.w_ih), w.m_hh.flush(acc.w_hh);
            acc.store(c, dw_ih_rows + ti * G * K, dw_hh_rows + ti * G * L.Hs,
                      db_ih_rows + ti * G, db_hh_rows + ti * G);
        }
    }
}

namespace {
// The scan forward with a packed model. lengths null: all T steps; ck.h null: no
// checkpoints.
// tapes null: each step's tape goes to a per-thread scratch; else (B, T, L.TSt), every valid
// step's stored tape (for the backward; padded steps are not written).
template <typename T>
void scan_fwd_run(const Model<T>& md, const MimnDims& d, const T* x, const int64_t* lengths,
                  MimnStates<const T> state0, int64_t chunk, T* reads,
                  MimnStates<T> final_state, MimnStates<T> ck, T* tapes, int nthreads) {
    const Layout& L = md.L;
    const int64_t NC = (d.T + chunk - 1) / chunk;
    const int64_t R = tile_rows(d.B), ntiles = (d.B + R - 1) / R;
    const std::vector<int64_t> order = rows_by_length(lengths, d.B);
    nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, ntiles)));
    Arena<T> count{nullptr};
    TileWork<T>().carve(count, L, md.ctrl, md.miu, md.Pp, R, false);
    count.take(R * L.SS), count.take(R * (tapes ? L.TSt : L.TS));  // as carved below
    Scratch<T> sc(nthreads, count.used);
#pragma omp parallel num_threads(nthreads)
    {
        const FlushDenormals ftz;  // per thread: see cpu_features.h
        Arena<T> a{sc.buf[omp_get_thread_num()].data()};
        TileWork<T> wk;
        wk.carve(a, L, md.ctrl, md.miu, md.Pp, R, false);
        // one state per row, stepped in place (tile_step_fwd with s1 = s)
        T* sA = a.take(R * L.SS);
        const int64_t TS = tapes ? L.TSt : L.TS;
        T* tape = a.take(R * TS);
        zero(tape, R * TS);  // the stored tapes' padding: copied, never otherwise written
        std::vector<T*> cur(R), tp(R);
        std::vector<const T*> xp(R);
        for (int64_t r = 0; r < R; ++r) tp[r] = tape + r * TS;
#pragma omp for schedule(dynamic, 1)
        for (int64_t ti = 0; ti < ntiles; ++ti) {
            const int64_t* rows = order.data() + ti * R;
            const int64_t nr = std::min(R, d.B - ti * R);
            for (int64_t r = 0; r < nr; ++r) {
                cur[r] = sA + r * L.SS;
                load_state(L, state0, rows[r], cur[r]);
            }
            for (int64_t t = 0; t < d.T; ++t) {
                if (ck.h && t % chunk == 0)
                    for (int64_t r = 0; r < nr; ++r)
                        store_state(L, cur[r], ck, rows[r] * NC + t / chunk);
                const int64_t n = running(lengths, rows, nr, t);
                for (int64_t r = n; r < nr; ++r)  // padding: state unchanged, read 0
                    zero(reads + (rows[r] * d.T + t) * L.D, L.D);
                if (n == 0) continue;
                for (int64_t r = 0; r < n; ++r) xp[r] = x + (rows[r] * d.T + t) * L.Dx;
                tile_step_fwd(md, n, xp.data(), cur.data(), cur.data(), tp.data(), wk);
                for (int64_t r = 0; r < n; ++r)
                    copy(reads + (rows[r] * d.T + t) * L.D, cur[r] + L.s_r, L.D);
                // the step's tape, built in the scratch, stored with h after the step
                for (int64_t r = 0; tapes && r < n; ++r) {
                    copy(tp[r] + L.t_h1, cur[r] + L.s_h, L.Hc);
                    stream_copy(tapes + (rows[r] * d.T + t) * L.TSt, tp[r], L.TSt);
                }
            }
            for (int64_t r = 0; r < nr; ++r) store_state(L, cur[r], final_state, rows[r]);
        }
        if (tapes) stream_fence();
    }
}
}  // namespace

template <typename T>
void mimn_scan_fwd(const MimnDims& d, const T* x, const int64_t* lengths,
                   const MimnWeights<T>& w, MimnStates<const T> state0, int64_t chunk,
                   T* reads, MimnStates<T> final_state, MimnStates<T> ck, T* tapes,
                   int nthreads) {
    check_lengths(lengths, d.B, d.T, "mimn_scan_fwd");
    if (chunk < 1) throw std::invalid_argument("mimn_scan_fwd: chunk must be >= 1");
    const Model<T> md(d, w);
    scan_fwd_run(md, d, x, lengths, state0, chunk, reads, final_state, ck, tapes, nthreads);
}

int64_t mimn_tape_floats(const MimnDims& d) { return Layout(d).TSt; }

// The stepper owns copies of the twelve arrays (the packed model keeps raw pointers to the
// MUR ones) and the model packed from them.
template <typename T>
struct MimnStepper<T>::Impl {
    std::vector<T> own[12];
    Model<T> md;
    static MimnWeights<T> copied(const MimnDims& d, const MimnWeights<T>& w,
                                 std::vector<T>* own) {
        const int64_t Hc = d.Hc, Hs = d.Hs, P = 4 * d.D + 2;
        const bool miu = std::min(d.miu_k, d.m) > 0;
        const T* src[12] = {w.ctrl_w_ih, w.ctrl_w_hh, w.ctrl_b_ih, w.ctrl_b_hh, w.heads_w,
                            w.heads_b,   w.mur_w,     w.mur_b,     w.miu_w_ih,  w.miu_w_hh,
                            w.miu_b_ih,  w.miu_b_hh};
        const int64_t n[12] = {3 * Hc * (d.Dx + d.D), 3 * Hc * Hc, 3 * Hc, 3 * Hc, P * Hc, P,
                               d.has_mur ? d.m * d.m : 0, d.has_mur ? d.m : 0,
                               miu ? 3 * Hs * (d.D + d.Dx) : 0, miu ? 3 * Hs * Hs : 0,
                               miu ? 3 * Hs : 0, miu ? 3 * Hs : 0};
        const T* q[12];
        for (int i = 0; i < 12; ++i) {
            own[i].assign(src[i] && n[i] ? src[i] : nullptr, src[i] && n[i] ? src[i] + n[i] : nullptr);
            q[i] = n[i] ? own[i].data() : nullptr;
        }
        return {q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7], q[8], q[9], q[10], q[11]};
    }
    Impl(const MimnDims& d, const MimnWeights<T>& w) : md(d, copied(d, w, own)) {}
};

template <typename T>
MimnStepper<T>::MimnStepper(const MimnDims& d, const MimnWeights<T>& w)
    : d_(d), impl_(std::make_unique<Impl>(d, w)) {}
template <typename T>
MimnStepper<T>::~MimnStepper() = default;

template <typename T>
void MimnStepper<T>::step(int64_t B, const T* x, MimnStates<const T> s, T* reads,
                          MimnStates<T> out, int nthreads) const {
    if (B <= 0) return;
    MimnDims d = d_;
    d.B = B, d.T = 1;
    const MimnStates<T> none{nullptr, nullptr, nullptr, nullptr, nullptr};
    scan_fwd_run(impl_->md, d, x, static_cast<const int64_t*>(nullptr), s, 1, reads, out, none,
                 static_cast<T*>(nullptr), nthreads);
}

// Parameter gradients: each row tile accumulates into its own slot of a buffer of tile
// partials; after the parallel region the partials are summed in tile order into the
// outputs (the totals): deterministic, independent of the thread count.
template <typename T>
void mimn_scan_bwd(const MimnDims& d, const T* d_reads, MimnStates<const T> d_final,
                   const T* x, const int64_t* lengths, const MimnWeights<T>& w, int64_t chunk,
                   MimnStates<const T> ck, const T* tapes, T* dx, MimnStates<T> d_state0,
                   const MimnWeightGrads<T>& dw, int nthreads) {
    check_lengths(lengths, d.B, d.T, "mimn_scan_bwd");
    if (chunk < 1) throw std::invalid_argument("mimn_scan_bwd: chunk must be >= 1");
    const Model<T> md(d, w);
    const Layout& L = md.L;
    const int64_t NC = (d.T + chunk - 1) / chunk;
    const int64_t C = std::min<int64_t>(chunk, std::max<int64_t>(d.T, 1));
    const int64_t R = tile_rows(d.B), ntiles = (d.B + R - 1) / R;
    const std::vector<int64_t> order = rows_by_length(lengths, d.B);
    nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, ntiles)));
    // a chunk's states (C + 1) and tapes (C, unless stored) per tile row, two gradient
    // carries, work, sums
    const int64_t CT = tapes ? 0 : C;
    Arena<T> count{nullptr};
    TileWork<T>().carve(count, L, md.ctrl, md.miu, md.Pp, R, true);
    count.take((C + 1) * R * L.SS), count.take(CT * R * L.TS);  // as carved below
    count.take(R * L.SS), count.take(R * L.SS);
    Scratch<T> sc(nthreads, count.used);
    Arena<T> acc_count{nullptr};
    TileAcc<T>().carve(acc_count, md);
    const size_t accn = acc_count.used;
    AlignedBuffer<T> partials(std::max<size_t>(1, ntiles * accn));
    std::memset(partials.data(), 0, sizeof(T) * std::max<size_t>(1, ntiles * accn));
#pragma omp parallel num_threads(nthreads)
    {
        const FlushDenormals ftz;  // per thread: see cpu_features.h
        Arena<T> a{sc.buf[omp_get_thread_num()].data()};
        TileWork<T> wk;
        wk.carve(a, L, md.ctrl, md.miu, md.Pp, R, true);
        T* states = a.take((C + 1) * R * L.SS);
        T* scratch_tapes = a.take(CT * R * L.TS);
        T* gA = a.take(R * L.SS);
        T* gB = a.take(R * L.SS);
        std::vector<T*> gc(R), gn(R), dxp(R), s1p(R), tp(R), Sio(R), dSio(R);
        std::vector<const T*> xp(R), sp(R);
        // S and its gradient are updated in place (only the chosen channels change per
        // step): S in the chunk's first state slot, dS in gA's rows; the per-step states
        // and gradient carries leave their S slots untouched
        for (int64_t r = 0; r < R; ++r)
            Sio[r] = states + r * L.SS + L.s_S, dSio[r] = gA + r * L.SS + L.s_S;
#pragma omp for schedule(dynamic, 1)
        for (int64_t ti = 0; ti < ntiles; ++ti) {
            const int64_t* rows = order.data() + ti * R;
            const int64_t nr = std::min(R, d.B - ti * R);
            Arena<T> pa{partials.data() + ti * accn};
            TileAcc<T> acc;
            acc.carve(pa, md);
            acc.clear(md);
            // Padded steps are the tail t >= len: they pass the final-state gradients
            // through unchanged and get dx = 0.
            for (int64_t r = 0; r < nr; ++r) {
                const int64_t len = lengths[rows[r]];
                zero(dx + (rows[r] * d.T + len) * L.Dx, (d.T - len) * L.Dx);
                gc[r] = gA + r * L.SS, gn[r] = gB + r * L.SS;
                load_state(L, d_final, rows[r], gc[r]);
            }
            const int64_t maxlen = lengths[rows[0]];
            for (int64_t c = NC - 1; c >= 0; --c) {
                const int64_t t0 = c * chunk, t1 = std::min(t0 + chunk, maxlen);
                if (t1 <= t0) continue;
                for (int64_t r = 0; r < nr; ++r)
                    load_state(L, ck, rows[r] * NC + c, states + r * L.SS);
                // replay the chunk's valid steps from its checkpoint (from the stored tapes:
                // only the memory's write), then run them backward
                auto point = [&](int64_t t, int64_t n) {
                    const int64_t j = t - t0;
                    for (int64_t r = 0; r < n; ++r) {
                        xp[r] = x + (rows[r] * d.T + t) * L.Dx;
                        sp[r] = states + (j * R + r) * L.SS;
                        s1p[r] = states + ((j + 1) * R + r) * L.SS;
                        tp[r] = tapes ? const_cast<T*>(tapes + (rows[r] * d.T + t) * L.TSt)
                                      : scratch_tapes + (j * R + r) * L.TS;
                    }
                };
                // the stored tapes come from memory: each step fetches the next one's
                // (the hardware prefetcher follows a row's stream only so far ahead)
                auto fetch = [&](int64_t t) {
                    if (!tapes || t < t0 || t >= t1) return;
                    const int64_t n = running(lengths, rows, nr, t);
                    for (int64_t r = 0; r < n; ++r)
                        prefetch_row(tapes + (rows[r] * d.T + t) * L.TSt, L.TSt);
                };
                for (int64_t t = t0; t < t1; ++t) {
                    const int64_t n = running(lengths, rows, nr, t);
                    point(t, n);
                    fetch(t + 1);
                    if (tapes)
                        tile_step_from_tape(L, n, sp.data(), s1p.data(), tp.data(), wk);
                    else
                        tile_step_fwd(md, n, xp.data(), sp.data(), s1p.data(), tp.data(), wk,
                                      Sio.data());
                }
                for (int64_t t = t1 - 1; t >= t0; --t) {
                    const int64_t n = running(lengths, rows, nr, t);
                    point(t, n);
                    fetch(t - 1);
                    for (int64_t r = 0; r < n; ++r) {
                        if (d_reads)
                            add_to(gc[r] + L.s_r, d_reads + (rows[r] * d.T + t) * L.D, L.D);
                        dxp[r] = dx + (rows[r] * d.T + t) * L.Dx;
                        zero(dxp[r], L.Dx);
                    }
                    tile_step_bwd(md, acc, n, xp.data(), sp.data(), s1p.data(), tp.data(),
                                  gc.data(), gn.data(), dxp.data(), wk, dSio.data());
                    for (int64_t r = 0; r < n; ++r) std::swap(gc[r], gn[r]);
                }
            }
            // the tile's last weight-gradient batches
            wk.c_ih.flush(acc.ctrl.w_ih), wk.c_hh.flush(acc.ctrl.w_hh);
            wk.m_ih.flush(acc.miu.w_ih), wk.m_hh.flush(acc.miu.w_hh);
            wk.hw.flush(acc.heads_w);
            for (int64_t r = 0; r < nr; ++r) {
                if (gc[r] + L.s_S != dSio[r]) copy(gc[r] + L.s_S, dSio[r], L.m * L.Hs);
                store_state(L, gc[r], d_state0, rows[r]);
            }
        }
    }
    // The tile partials (each tile's accumulators one contiguous block), in tile order.
    T* total = partials.data();
    for (int64_t ti = 1; ti < ntiles; ++ti) add_to(total, partials.data() + ti * accn, accn);
    Arena<T> pa{total};
    TileAcc<T> acc;
    acc.carve(pa, md);
    acc.store(md, dw, 0);
}

#define FASTATTN_MIMN_INSTANTIATE(T)                                                            \
    template void ntm_read_write_fwd<T>(const MimnDims&, const T*, const T*, const T*,         \
                                        const T*, const T*, T*, T*, T*, T*, int);               \
    template void ntm_read_write_bwd<T>(const MimnDims&, const T*, const T*, const T*,         \
                                        const T*, const T*, const T*, const T*, const T*,       \
                                        const T*, T*, T*, T*, T*, T*, int);                     \
    template void miu_gather_gru_fwd<T>(const MimnDims&, const T*, const T*, const T*,         \
                                        const T*, const T*, const T*, const T*, const T*, T*,   \
                                        int);                                                   \
    template void miu_gather_gru_bwd<T>(const MimnDims&, const T*, const T*, const T*,         \
                                        const T*, const T*, const T*, const T*, const T*,       \
                                        const T*, T*, T*, T*, T*, T*, T*, T*, int);             \
    template void mimn_scan_fwd<T>(const MimnDims&, const T*, const int64_t*,                  \
                                   const MimnWeights<T>&, MimnStates<const T>, int64_t, T*,     \
                                   MimnStates<T>, MimnStates<T>, T*, int);                      \
    template void mimn_scan_bwd<T>(const MimnDims&, const T*, MimnStates<const T>, const T*,   \
                                   const int64_t*, const MimnWeights<T>&, int64_t,              \
                                   MimnStates<const T>, const T*, T*, MimnStates<T>,            \
                                   const MimnWeightGrads<T>&, int);

FASTATTN_MIMN_INSTANTIATE(float)
FASTATTN_MIMN_INSTANTIATE(double)
template class MimnStepper<float>;
template class MimnStepper<double>;
#undef FASTATTN_MIMN_INSTANTIATE

}  // namespace fastattn
