// Exact softmax attention of each query over the K history rows that retrieval selected
// (the second half of eta_attention): forward and analytic backward, see
// docs/kernel_api.md "Attention over retrieved rows".
//
// Rows are read in place through (hist_index, idx): a query only collects pointers to its
// valid rows, so no (B, K, D) copy is ever made. Queries are independent; each task writes
// only its own outputs (out/lse, or dq and its own dk/dv slots), so there are no races, and
// every result is bitwise the same for any thread count.
//
// The hot loops are the Dh-long dot products and the Dv-long axpys. They are written as
// plain loops (with `omp simd` reductions, which allow the reassociation a vectorised dot
// product needs) and compiled once per ISA via target attributes, like simhash.cpp; C++
// contracts a*b+c into FMA by default, so the AVX2 / AVX-512 copies use FMA.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "cpu_features.h"
#include "kernels.h"

namespace fastattn {
namespace {

// Shapes and pointers of one call, shared by forward and backward.
template <typename T>
struct Problem {
    const T* q;       // (B, H, Dh)
    const T* keys;    // (U, L, H, Dh)
    const T* values;  // (U, L, H, Dv)
    const int64_t* idx;   // (B, K)
    const int64_t* hist;  // (B,)
    int64_t B, H, Dh, Dv, L, K;
    T scale;
};

// How many rows ahead of their use the kernels prefetch.
constexpr int64_t kAhead = 8;

// Per-thread scratch for one query: the positions of its valid slots, pointers to their
// key/value rows (all heads) and one float per (head, valid slot). O(K * H), never O(K * D).
template <typename T>
struct Scratch {
    AlignedBuffer<int64_t> slot;
    AlignedBuffer<const T*> krow, vrow;
    AlignedBuffer<T> s;
    explicit Scratch(int64_t K, int64_t H)
        : slot(std::max<int64_t>(K, 1)),
          krow(std::max<int64_t>(K, 1)),
          vrow(std::max<int64_t>(K, 1)),
          s(std::max<int64_t>(K * H, 1)) {}
};

// Fills the scratch with query b's valid slots (in slot order); returns how many.
template <typename T>
FA_INLINE int64_t collect(const Problem<T>& p, int64_t b, Scratch<T>& sc) {
    const int64_t* ib = p.idx + b * p.K;
    const int64_t hist_off = p.hist[b] * p.L;
    int64_t n = 0;
    for (int64_t j = 0; j < p.K; ++j) {
        const int64_t l = ib[j];
        if (l < 0) continue;
        sc.slot.data()[n] = j;
        sc.krow.data()[n] = p.keys + (hist_off + l) * p.H * p.Dh;
        sc.vrow.data()[n] = p.values + (hist_off + l) * p.H * p.Dv;
        ++n;
    }
    return n;
}

// Rows are scattered through the history, so the hardware prefetcher cannot guess them:
// ask for a whole row (all heads) ahead of its use instead of paying one miss per row.
template <typename T>
FA_INLINE void prefetch_row(const T* row, int64_t n) {
    const char* p = reinterpret_cast<const char*>(row);
    for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64)
        __builtin_prefetch(p + off);
}

// One query vector against four rows: four independent FMA chains hide the FMA latency
// (and the cache misses of four random rows) that a single dot product would expose.
template <typename T>
FA_INLINE void dot4(const T* __restrict q, const T* __restrict r0, const T* __restrict r1,
                    const T* __restrict r2, const T* __restrict r3, int64_t n, T* out) {
    T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t i = 0; i < n; ++i) {
        const T qi = q[i];
        a0 += qi * r0[i];
        a1 += qi * r1[i];
        a2 += qi * r2[i];
        a3 += qi * r3[i];
    }
    out[0] = a0;
    out[1] = a1;
    out[2] = a2;
    out[3] = a3;
}

template <typename T>
FA_INLINE void axpy(T* __restrict y, T a, const T* __restrict x, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

template <typename T>
FA_INLINE void scaled_copy(T* __restrict y, T a, const T* __restrict x, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = a * x[i];
}

template <typename T>
FA_INLINE void scaled_sum(T* __restrict y, T a, const T* __restrict x, T c,
                          const T* __restrict z, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = a * x[i] + c * z[i];
}

// Forward of one query: scores into scratch, softmax per head, then the weighted sum of
// value rows. Two passes over the rows (keys, then values) instead of an online softmax:
// the scores are only K * H floats, and no accumulator ever needs rescaling.
template <typename T>
FA_INLINE void forward_query(const Problem<T>& p, int64_t b, Scratch<T>& sc, T* out, T* lse) {
    const int64_t H = p.H, Dh = p.Dh, Dv = p.Dv;
    T* ob = out + b * H * Dv;
    T* lb = lse + b * H;
    std::fill(ob, ob + H * Dv, T(0));
    const int64_t n = collect(p, b, sc);
    if (n == 0) {  // nothing to attend to: zeros, lse = -inf (what the oracle returns)
        std::fill(lb, lb + H, -std::numeric_limits<T>::infinity());
        return;
    }
    const T* const* kr = sc.krow.data();
    const T* const* vr = sc.vrow.data();
    for (int64_t j = 0; j < std::min(n, kAhead); ++j) prefetch_row(kr[j], H * Dh);
    for (int64_t h = 0; h < H; ++h) {
        const T* qh = p.q + (b * H + h) * Dh;
        const int64_t ko = h * Dh;
        T* s = sc.s.data() + h * n;
        int64_t j = 0;
        for (; j + 4 <= n; j += 4) {
            if (h == 0) {  // the first head's pass brings in the key rows, all heads at once
                for (int64_t r = j + kAhead; r < std::min(n, j + kAhead + 4); ++r)
                    prefetch_row(kr[r], H * Dh);
            }
            dot4(qh, kr[j] + ko, kr[j + 1] + ko, kr[j + 2] + ko, kr[j + 3] + ko, Dh, s + j);
        }
        for (; j < n; ++j) s[j] = dot(qh, kr[j] + ko, Dh);
        T m = -std::numeric_limits<T>::infinity();
        for (j = 0; j < n; ++j) {
            s[j] *= p.scale;
            m = std::max(m, s[j]);
        }
        T z = 0;
        for (j = 0; j < n; ++j) {
            s[j] = std::exp(s[j] - m);
            z += s[j];
        }
        // z >= 1 (the max term is exp(0)), so the division and the log are safe.
        const T inv = T(1) / z;
        for (j = 0; j < n; ++j) s[j] *= inv;
        lb[h] = m + std::log(z);
    }
    // Slot-outer: each value row (all heads, contiguous) is streamed once.
    for (int64_t j = 0; j < std::min(n, kAhead); ++j) prefetch_row(vr[j], H * Dv);
    for (int64_t j = 0; j < n; ++j) {
        if (j + kAhead < n) prefetch_row(vr[j + kAhead], H * Dv);
        for (int64_t h = 0; h < H; ++h)
            axpy(ob + h * Dv, sc.s.data()[h * n + j], vr[j] + h * Dv, Dv);
    }
}

// Backward of one query. lse is given, so p_j = exp(s_j - lse) needs no second pass and
// each slot is finished in one visit: dv_j = p g, ds = p (g.v_j - g.out),
// dq += scale ds k_j, dk_j = scale ds q. When dv_slots is dk_slots (the keys are the
// values, Dh == Dv) each slot's row gets both terms, dk_j + dv_j, in one write.
template <typename T>
FA_INLINE void backward_query(const Problem<T>& p, int64_t b, Scratch<T>& sc, const T* grad_out,
                              const T* out, const T* lse, T* dq, T* dk_slots, T* dv_slots) {
    const int64_t H = p.H, Dh = p.Dh, Dv = p.Dv, K = p.K;
    const bool tied = dv_slots == dk_slots;
    T* dqb = dq + b * H * Dh;
    std::fill(dqb, dqb + H * Dh, T(0));
    // Empty slots get zero gradient: clear them here rather than trusting the caller.
    const int64_t* ib = p.idx + b * K;
    for (int64_t j = 0; j < K; ++j) {
        if (ib[j] >= 0) continue;
        std::fill(dk_slots + (b * K + j) * H * Dh, dk_slots + (b * K + j + 1) * H * Dh, T(0));
        std::fill(dv_slots + (b * K + j) * H * Dv, dv_slots + (b * K + j + 1) * H * Dv, T(0));
    }
    const int64_t n = collect(p, b, sc);
    if (n == 0) return;
    // g.out per head, the shared term of every ds_j.
    T* g_out = sc.s.data();
    for (int64_t h = 0; h < H; ++h)
        g_out[h] = dot(grad_out + (b * H + h) * Dv, out + (b * H + h) * Dv, Dv);
    const T* const* kr = sc.krow.data();
    const T* const* vr = sc.vrow.data();
    for (int64_t jj = 0; jj < std::min(n, kAhead); ++jj) {
        prefetch_row(kr[jj], H * Dh);
        prefetch_row(vr[jj], H * Dv);
    }
    for (int64_t jj = 0; jj < n; ++jj) {
        if (jj + kAhead < n) {
            prefetch_row(kr[jj + kAhead], H * Dh);
            prefetch_row(vr[jj + kAhead], H * Dv);
        }
        const int64_t j = sc.slot.data()[jj];
        const T* kj = kr[jj];
        const T* vj = vr[jj];
        T* dkj = dk_slots + (b * K + j) * H * Dh;
        T* dvj = dv_slots + (b * K + j) * H * Dv;
        for (int64_t h = 0; h < H; ++h) {
            const T* qh = p.q + (b * H + h) * Dh;
            const T* gh = grad_out + (b * H + h) * Dv;
            const T pj = std::exp(p.scale * dot(qh, kj + h * Dh, Dh) - lse[b * H + h]);
            const T ds = pj * (dot(gh, vj + h * Dv, Dv) - g_out[h]);
            axpy(dqb + h * Dh, p.scale * ds, kj + h * Dh, Dh);
            if (tied) {
                scaled_sum(dkj + h * Dh, p.scale * ds, qh, pj, gh, Dh);
            } else {
                scaled_copy(dvj + h * Dv, pj, gh, Dv);
                scaled_copy(dkj + h * Dh, p.scale * ds, qh, Dh);
            }
        }
    }
}

// One copy of each query loop per ISA: the FA_INLINE bodies above are compiled (and
// vectorised) for the target of the function they are inlined into.
template <typename T>
struct Fwd {
    const Problem<T>& p;
    T* out;
    T* lse;
};
template <typename T>
struct Bwd {
    const Problem<T>& p;
    const T* grad_out;
    const T* out;
    const T* lse;
    T* dq;
    T* dk_slots;
    T* dv_slots;
};

template <typename T>
FA_INLINE void run_query(const Fwd<T>& a, int64_t b, Scratch<T>& sc) {
    forward_query(a.p, b, sc, a.out, a.lse);
}
template <typename T>
FA_INLINE void run_query(const Bwd<T>& a, int64_t b, Scratch<T>& sc) {
    backward_query(a.p, b, sc, a.grad_out, a.out, a.lse, a.dq, a.dk_slots, a.dv_slots);
}

template <typename Args, typename T>
void queries_default(const Args& a, int64_t b0, int64_t b1, Scratch<T>& sc) {
    for (int64_t b = b0; b < b1; ++b) run_query(a, b, sc);
}
#if FASTATTN_X86
template <typename Args, typename T>
FA_TARGET_AVX2 void queries_avx2(const Args& a, int64_t b0, int64_t b1, Scratch<T>& sc) {
    for (int64_t b = b0; b < b1; ++b) run_query(a, b, sc);
}
template <typename Args, typename T>
FA_TARGET_AVX512F void queries_avx512(const Args& a, int64_t b0, int64_t b1, Scratch<T>& sc) {
    for (int64_t b = b0; b < b1; ++b) run_query(a, b, sc);
}
#endif

// Validates the indices (before any thread starts: an exception must not cross an OpenMP
// region), then runs blocks of queries on exactly nthreads threads.
template <typename Args, typename T>
void run_queries(const Args& a, const char* fn, int64_t U, int nthreads) {
    const Problem<T>& p = a.p;
    check_range(p.hist, p.B, 0, U, fn, "hist_index");
    check_range(p.idx, p.B * p.K, -1, p.L, fn, "idx");
    if (p.B == 0 || p.H == 0) return;

    using QueriesFn = void (*)(const Args&, int64_t, int64_t, Scratch<T>&);
    QueriesFn queries = queries_default<Args, T>;
#if FASTATTN_X86
    if (use_avx512f()) {
        queries = queries_avx512<Args, T>;
    } else if (use_avx2()) {
        queries = queries_avx2<Args, T>;
    }
#endif
    // Blocks of a few queries amortise the scheduling; dynamic because queries with many
    // empty slots are cheaper than full ones.
    constexpr int64_t kBlock = 8;
    const int64_t blocks = (p.B + kBlock - 1) / kBlock;
    // Per-thread scratch allocated before the region: a bad_alloc thrown inside it would
    // end in std::terminate instead of reaching Python as MemoryError.
    std::vector<Scratch<T>> scratch;
    scratch.reserve(static_cast<size_t>(nthreads));
    for (int i = 0; i < nthreads; ++i) scratch.emplace_back(p.K, p.H);
#pragma omp parallel num_threads(nthreads)
    {
        Scratch<T>& sc = scratch[static_cast<size_t>(omp_get_thread_num())];
#pragma omp for schedule(dynamic, 1)
        for (int64_t blk = 0; blk < blocks; ++blk)
            queries(a, blk * kBlock, std::min(p.B, (blk + 1) * kBlock), sc);
    }
}

template <typename T>
void fwd_impl(const T* q, const T* keys, const T* values, const int64_t* idx,
              const int64_t* hist_index, int64_t B, int64_t H, int64_t Dh, int64_t Dv, int64_t U,
              int64_t L, int64_t K, double scale, T* out, T* lse, int nthreads) {
    const Problem<T> p{q, keys, values, idx, hist_index, B, H, Dh, Dv, L, K, static_cast<T>(scale)};
    run_queries<Fwd<T>, T>(Fwd<T>{p, out, lse}, "topk_attention_fwd", U, nthreads);
}

template <typename T>
void bwd_impl(const T* grad_out, const T* q, const T* keys, const T* values, const int64_t* idx,
              const int64_t* hist_index, const T* out, const T* lse, int64_t B, int64_t H,
              int64_t Dh, int64_t Dv, int64_t U, int64_t L, int64_t K, double scale, T* dq,
              T* dk_slots, T* dv_slots, int nthreads) {
    const Problem<T> p{q, keys, values, idx, hist_index, B, H, Dh, Dv, L, K, static_cast<T>(scale)};
    run_queries<Bwd<T>, T>(Bwd<T>{p, grad_out, out, lse, dq, dk_slots, dv_slots},
                           "topk_attention_bwd", U, nthreads);
}

}  // namespace

std::string attention_impl() {
#if FASTATTN_X86
    if (use_avx512f()) return "avx512f";
    if (use_avx2()) return "avx2";
#endif
    return "default";
}

void topk_attention_fwd(const float* q, const float* keys, const float* values,
                        const int64_t* idx, const int64_t* hist_index, int64_t B, int64_t H,
                        int64_t Dh, int64_t Dv, int64_t U, int64_t L, int64_t K, double scale,
                        float* out, float* lse, int nthreads) {
    fwd_impl(q, keys, values, idx, hist_index, B, H, Dh, Dv, U, L, K, scale, out, lse, nthreads);
}
void topk_attention_fwd(const double* q, const double* keys, const double* values,
                        const int64_t* idx, const int64_t* hist_index, int64_t B, int64_t H,
                        int64_t Dh, int64_t Dv, int64_t U, int64_t L, int64_t K, double scale,
                        double* out, double* lse, int nthreads) {
    fwd_impl(q, keys, values, idx, hist_index, B, H, Dh, Dv, U, L, K, scale, out, lse, nthreads);
}

void topk_attention_bwd(const float* grad_out, const float* q, const float* keys,
                        const float* values, const int64_t* idx, const int64_t* hist_index,
                        const float* out, const float* lse, int64_t B, int64_t H, int64_t Dh,
                        int64_t Dv, int64_t U, int64_t L, int64_t K, double scale, float* dq,
                        float* dk_slots, float* dv_slots, int nthreads) {
    bwd_impl(grad_out, q, keys, values, idx, hist_index, out, lse, B, H, Dh, Dv, U, L, K, scale,
             dq, dk_slots, dv_slots, nthreads);
}
void topk_attention_bwd(const double* grad_out, const double* q, const double* keys,
                        const double* values, const int64_t* idx, const int64_t* hist_index,
                        const double* out, const double* lse, int64_t B, int64_t H, int64_t Dh,
                        int64_t Dv, int64_t U, int64_t L, int64_t K, double scale, double* dq,
                        double* dk_slots, double* dv_slots, int nthreads) {
    bwd_impl(grad_out, q, keys, values, idx, hist_index, out, lse, B, H, Dh, Dv, U, L, K, scale,
             dq, dk_slots, dv_slots, nthreads);
}

}  // namespace fastattn
