// Exact softmax attention of each query over the K history rows that retrieval selected
// (the second half of eta_attention): forward and analytic backward, see
// docs/kernel_api.md "Attention over retrieved rows".
//
// Rows are read in place through (hist_index, idx): a query only collects pointers to its
// valid rows, so no (B, K, D) copy is ever made. Queries are independent; each task writes
// only its own outputs (out/lse, or dq and its own dk/dv slots), so there are no races, and
// every result is bitwise the same for any thread count. The forward over one shared
// history (U == 1) runs chunk by chunk instead ("shared rows" below).
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
// prefetch_row (common.h) asks for a whole row (all heads) ahead of its use instead of
// paying one miss per row.

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

// ------------------------------------------------------------------ shared rows (U == 1)
//
// When every query reads the same history (a shared history, or the table of the indexed
// form) the rows it selects overlap: B·K picks from L rows. Query by query, each pick is a
// random read of a key and a value row, and once the rows outgrow L2 those come from L3 or
// DRAM (measured ~55 ns per pick at L=16k, D=128, against ~25 ns with the rows in L2). So the
// valid slots are first sorted by chunk of rows (a chunk's key rows fill ~512 KiB, an L2's
// share), and both passes run chunk by chunk: each chunk's rows are streamed into L2 once per
// pass and thread, and every pick reads its row from there, while a query's own row (q, or
// its output accumulator) sits in registers across its picks of the chunk.
// Each query range r (one per thread) is one task, with no barrier between its steps:
//   0. count the range's picks of each chunk and check idx, then place its valid slots in
//      (chunk, query, slot) order (a counting sort);
//   1. scores s = scale·q·k of its picks, chunk by chunk;
//   2. softmax of each query over its K slots (empty slots hold -inf; a vector exp), lse;
//   3. out += p·v over its picks, chunk by chunk.
// An output row is summed by one thread in (chunk, slot) order, which the thread count does
// not change: the result is the same for every thread count. (Each thread streams the rows
// its own queries pick; splitting step 1 by chunk instead would read each key row once,
// but the barrier it needs stalls both threads whenever one loses its core.)

struct Pick {
    uint32_t b, j, l;  // query, slot, row
};

template <typename T>
struct SharedScratch {
    AlignedBuffer<Pick> picks;   // valid slots by (query range, chunk, query, slot)
    AlignedBuffer<T> s;          // (B, H, K) scores, then softmax weights
    AlignedBuffer<int64_t> at;   // (R, C + 1): chunk c of range r is picks [at[c], at[c + 1])
    AlignedBuffer<uint8_t> bad;  // (R,): an idx outside [-1, L) in range r
};

// Kept between calls up to this size; a larger call allocates (and frees) its own.
constexpr size_t kPooledScratchBytes = size_t(8) << 20;
// Rows per chunk, in bytes of key rows.
constexpr int64_t kChunkBytes = int64_t(512) << 10;

// exp(x) for the softmax weights, vectorisable (std::exp is a libm call per element):
// 2^n·exp(r) with n = round(x/ln2), r = x − n·ln2 by Cody–Waite, exp(r) by the Cephes
// degree-6 polynomial (relative error ~1e-7, within fp32 rounding of expf). x below the
// smallest normal result gives 0 (-inf: an empty slot), so no subnormal weight survives.
FA_INLINE float exp_weight(float x) {
    const float xc = std::max(std::min(x, 88.3762626647949f), -88.0f);
    const float t = xc * 1.44269504088896341f + 12582912.0f;  // 1.5·2^23: round to nearest
    const float n = t - 12582912.0f;
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.0f;
    const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
    return x < -87.33654475f ? 0.0f : y * scale;
}
FA_INLINE double exp_weight(double x) { return std::exp(x); }

// Everything the steps of one shared-rows call read and write.
template <typename T>
struct Shared {
    const Problem<T>& p;
    T* out;
    T* lse;
    T* s;
    const Pick* picks;
    const int64_t* at;  // (R, C + 1)
    int64_t R, C;
    int shift;          // rows per chunk: 1 << shift
};

// Query range r of R: [B·r/R, B·(r+1)/R).
FA_INLINE int64_t range_begin(int64_t B, int64_t r, int64_t R) { return B * r / R; }

// Calls f(pick) for query range r's picks in their (chunk, query, slot) order, prefetching
// the row of the pick kAhead further on in `rows` (row_len elements per history row).
template <typename T, typename F>
FA_INLINE void for_each_pick(const Shared<T>& a, int64_t r, const T* rows, int64_t row_len,
                             F&& f) {
    const int64_t* at = a.at + r * (a.C + 1);
    for (int64_t i = at[0]; i < at[a.C]; ++i) {
        if (i + kAhead < at[a.C]) prefetch_row(rows + a.picks[i + kAhead].l * row_len, row_len);
        f(a.picks[i]);
    }
}

// Step 1 for query range r: the scores of its picks. Generic body.
template <typename T>
FA_INLINE void shared_scores(const Shared<T>& a, int64_t r) {
    const Problem<T>& p = a.p;
    const int64_t H = p.H, Dh = p.Dh, K = p.K, row = H * Dh;
    for_each_pick(a, r, p.keys, row, [&](const Pick& e) {
        for (int64_t h = 0; h < H; ++h)
            a.s[(e.b * H + h) * K + e.j] =
                p.scale * dot(p.q + (e.b * H + h) * Dh, p.keys + e.l * row + h * Dh, Dh);
    });
}

// Phase 2 for queries [b0, b1): softmax weights over the K slots in place, lse.
template <typename T>
FA_INLINE void shared_softmax(const Shared<T>& a, int64_t b0, int64_t b1) {
    const int64_t H = a.p.H, K = a.p.K;
    for (int64_t bh = b0 * H; bh < b1 * H; ++bh) {
        T* s = a.s + bh * K;
        T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < K; ++j) m = s[j] > m ? s[j] : m;
        if (m == -std::numeric_limits<T>::infinity()) {  // no valid slot: zeros, lse = -inf
            a.lse[bh] = m;
            continue;
        }
        T z = 0;
#pragma omp simd reduction(+ : z)
        for (int64_t j = 0; j < K; ++j) {
            const T e = exp_weight(s[j] - m);
            s[j] = e;
            z += e;
        }
        // z >= 1 (the max term is exp(0)), so the division and the log are safe.
        const T inv = T(1) / z;
#pragma omp simd
        for (int64_t j = 0; j < K; ++j) s[j] *= inv;
        a.lse[bh] = m + std::log(z);
    }
}

// Phase 3 for query range r: out += p·v over its picks, in their (chunk, query, slot)
// order. Generic body.
template <typename T>
FA_INLINE void shared_values(const Shared<T>& a, int64_t r) {
    const Problem<T>& p = a.p;
    const int64_t H = p.H, Dv = p.Dv, K = p.K, row = H * Dv;
    for_each_pick(a, r, p.values, row, [&](const Pick& e) {
        for (int64_t h = 0; h < H; ++h)
            axpy(a.out + (e.b * H + h) * Dv, a.s[(e.b * H + h) * K + e.j],
                 p.values + e.l * row + h * Dv, Dv);
    });
}

// Steps 1-3 for query range r.
template <typename T>
FA_INLINE void shared_range(const Shared<T>& a, int64_t r) {
    shared_scores(a, r);
    shared_softmax(a, range_begin(a.p.B, r, a.R), range_begin(a.p.B, r + 1, a.R));
    shared_values(a, r);
}

template <typename T>
void shared_default(const Shared<T>& a, int64_t r) { shared_range(a, r); }
#if FASTATTN_X86
template <typename T>
FA_TARGET_AVX2 void shared_avx2(const Shared<T>& a, int64_t r) { shared_range(a, r); }
template <typename T>
FA_TARGET_AVX512F void shared_avx512(const Shared<T>& a, int64_t r) { shared_range(a, r); }

// fp32, H = 1, Dh = Dv = NV·16: a query's q row (step 1) or output accumulator (step 3)
// sits in NV zmm registers across its consecutive picks, so a pick costs the NV loads of its
// key or value row (from L2: its chunk's) and NV FMAs; the rows kAhead picks on are
// prefetched. (Prefetching the next chunk's rows in address order as well, a few lines per
// pick, measured 0.9x at L=16k-32k and no better elsewhere, 1 thread.)
template <int NV>
FA_TARGET_AVX512F void shared_avx512_f32(const Shared<float>& a, int64_t r) {
    const Problem<float>& p = a.p;
    constexpr int64_t D = NV * 16;
    const int64_t K = p.K;
    const int64_t* at = a.at + r * (a.C + 1);
    for (int64_t c = 0; c < a.C; ++c) {  // step 1: the scores
        const int64_t i0 = at[c], i1 = at[c + 1];
        int64_t qb = -1;
        __m512 qv[NV];
        for (int64_t e = i0; e < i1; ++e) {
            if (e + kAhead < i1) prefetch_row(p.keys + a.picks[e + kAhead].l * D, D);
            const Pick& pk = a.picks[e];
            if (pk.b != qb) {
                qb = pk.b;
                for (int u = 0; u < NV; ++u) qv[u] = _mm512_loadu_ps(p.q + qb * D + 16 * u);
            }
            const float* k = p.keys + pk.l * D;
            __m512 acc0 = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k));
            __m512 acc1 = _mm512_setzero_ps();
            for (int u = 1; u < NV; ++u) {
                if (u & 1) acc1 = _mm512_fmadd_ps(qv[u], _mm512_loadu_ps(k + 16 * u), acc1);
                else acc0 = _mm512_fmadd_ps(qv[u], _mm512_loadu_ps(k + 16 * u), acc0);
            }
            a.s[pk.b * K + pk.j] = p.scale * _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        }
    }
    shared_softmax(a, range_begin(p.B, r, a.R), range_begin(p.B, r + 1, a.R));  // step 2
    for (int64_t c = 0; c < a.C; ++c) {  // step 3: the weighted sum
        const int64_t i1 = at[c + 1];
        int64_t e = at[c];
        while (e < i1) {  // one run of picks of one query per iteration
            const int64_t b = a.picks[e].b;
            float* o = a.out + b * D;
            __m512 acc[NV];
            for (int u = 0; u < NV; ++u) acc[u] = _mm512_loadu_ps(o + 16 * u);
            const float* sb = a.s + b * K;
            do {
                if (e + kAhead < i1) prefetch_row(p.values + a.picks[e + kAhead].l * D, D);
                const Pick& pk = a.picks[e];
                const float* v = p.values + pk.l * D;
                const __m512 w = _mm512_set1_ps(sb[pk.j]);
                for (int u = 0; u < NV; ++u)
                    acc[u] = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + 16 * u), acc[u]);
                ++e;
            } while (e < i1 && a.picks[e].b == b);
            for (int u = 0; u < NV; ++u) _mm512_storeu_ps(o + 16 * u, acc[u]);
        }
    }
}
#endif

template <typename T>
using SharedFn = void (*)(const Shared<T>&, int64_t);

template <typename T>
SharedFn<T> shared_fn(const Problem<T>&) {
#if FASTATTN_X86
    if (use_avx512f()) return shared_avx512<T>;
    if (use_avx2()) return shared_avx2<T>;
#endif
    return shared_default<T>;
}
template <>
SharedFn<float> shared_fn(const Problem<float>& p) {
#if FASTATTN_X86
    if (use_avx512f() && p.H == 1 && p.Dh == p.Dv) {
        switch (p.Dh) {
            case 16: return shared_avx512_f32<1>;
            case 32: return shared_avx512_f32<2>;
            case 64: return shared_avx512_f32<4>;
            case 128: return shared_avx512_f32<8>;
            case 256: return shared_avx512_f32<16>;
            default: break;
        }
    }
    if (use_avx512f()) return shared_avx512<float>;
    if (use_avx2()) return shared_avx2<float>;
#endif
    return shared_default<float>;
}

// Whether the shared-rows path serves a call: one history, picks and rows countable in
// its 32-bit records.
template <typename T>
bool use_shared(const Problem<T>& p, int64_t U) {
    return U == 1 && p.B > 0 && p.H > 0 && p.L > 0 && p.B < (int64_t(1) << 32) &&
           p.K < (int64_t(1) << 32) && p.L < (int64_t(1) << 32);
}

// The forward over one shared history (U == 1): hist_index is all 0, checked by the caller.
template <typename T>
void forward_shared(const Problem<T>& p, T* out, T* lse, int nthreads) {
    const int64_t B = p.B, K = p.K, H = p.H, L = p.L;
    const int64_t R = std::max<int64_t>(1, std::min<int64_t>(nthreads, B));
    const int64_t row_bytes = std::max<int64_t>(1, H * p.Dh * int64_t(sizeof(T)));
    int shift = 0;  // rows per chunk: a power of two (a shift, not a division, per pick)
    while ((int64_t(2) << shift) * row_bytes <= kChunkBytes) ++shift;
    const int64_t C = ((L - 1) >> shift) + 1;

    // picks: at most B·K (allocated before counting: one region fewer)
    const size_t bytes = size_t(B * K) * (sizeof(Pick) + H * sizeof(T)) +
                         size_t(R * (C + 1)) * sizeof(int64_t);
    ScratchLease<SharedScratch<T>> lease(bytes <= kPooledScratchBytes);
    SharedScratch<T>& sc = *lease.s;
    sc.at.resize(R * (C + 1));
    sc.bad.resize(R);
    sc.picks.resize(std::max<int64_t>(B * K, 1));
    sc.s.resize(std::max<int64_t>(B * H * K, 1));
    int64_t* const at0 = sc.at.data();
    uint8_t* const bad = sc.bad.data();
    Pick* const picks = sc.picks.data();
    T* const s = sc.s.data();

    const Shared<T> a{p, out, lse, s, picks, at0, R, C, shift};
    const SharedFn<T> run = shared_fn(p);
    // One task per query range, no barrier between the steps (a thread that loses its core
    // on a loaded machine holds up no other): step 0 here (count the picks of each chunk and
    // check idx, place the valid slots from the range's first slot b0·K on, clear the
    // range's outputs and scores), then steps 1-3.
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < R; ++r) {
        int64_t* at = at0 + r * (C + 1);
        std::fill(at, at + C + 1, int64_t(0));
        const int64_t b0 = range_begin(B, r, R), b1 = range_begin(B, r + 1, R);
        uint8_t good = 1;
        for (const int64_t* ib = p.idx + b0 * K; ib < p.idx + b1 * K; ++ib) {
            const int64_t l = *ib;
            good &= l >= -1 && l < L;
            if (C > 1 && l >= 0 && l < L) ++at[(l >> shift) + 1];
        }
        bad[r] = !good;
        if (good) {
            // at[c + 1] := the start of chunk c, the cursor that placing advances to
            // the start of chunk c + 1; then chunk c is picks [at[c], at[c + 1]).
            int64_t pos = b0 * K;
            for (int64_t c = 0; c < C; ++c) {
                const int64_t n = at[c + 1];
                at[c + 1] = pos;
                pos += n;
            }
            at[0] = b0 * K;
            if (C == 1) {  // the valid slots in order, the cursor in a register (one
                int64_t n = at[0];  // through memory would chain store forwardings)
                for (int64_t b = b0; b < b1; ++b) {
                    for (int64_t j = 0; j < K; ++j) {
                        const int64_t l = p.idx[b * K + j];
                        picks[n] = Pick{uint32_t(b), uint32_t(j), uint32_t(l)};
                        n += l >= 0;
                    }
                }
                at[1] = n;
            } else {
                for (int64_t b = b0; b < b1; ++b) {
                    for (int64_t j = 0; j < K; ++j) {
                        const int64_t l = p.idx[b * K + j];
                        if (l >= 0)
                        picks[at[(l >> shift) + 1]++] = Pick{uint32_t(b), uint32_t(j), uint32_t(l)};
                    }
                }
            }
            std::fill(out + b0 * H * p.Dv, out + b1 * H * p.Dv, T(0));
            std::fill(s + b0 * H * K, s + b1 * H * K, -std::numeric_limits<T>::infinity());
            run(a, r);
        }
    }
    bool ok = true;
    for (int64_t r = 0; r < R; ++r) ok = ok && !bad[r];
    if (!ok) check_range(p.idx, B * K, -1, L, "topk_attention_fwd", "idx");  // throws
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
    // One shared history: the rows' path (above).
    if (use_shared(p, U)) {
        check_range(hist_index, B, 0, 1, "topk_attention_fwd", "hist_index");
        forward_shared(p, out, lse, nthreads);
        return;
    }
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
