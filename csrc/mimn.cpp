// Fused MIMN kernels (DESIGN.md §5): NTM read/write with MUR, the MIU gather-GRU, and the
// whole scan over T steps, forward and backward.
//
// Batch rows are independent, so every kernel runs rows in parallel (OpenMP over b) and each
// row sequentially over its steps. The per-row work is a handful of small mat-vecs (the two
// GRUs, the heads Linear) and O(m·D) memory updates; the weights (a few tens of KB) stay in
// cache across a row's steps, and the mat-vecs are written as contiguous dot products /
// axpys that the compiler vectorises (`omp simd` allows it to reassociate the reductions).
//
// Backward: one forward step records a "tape" of the intermediates its backward needs
// (gate activations, cosine pieces, softmaxes), so the backward never re-derives them.
// The scan backward replays one chunk at a time from its checkpoint into a per-thread
// scratch of `chunk` states + tapes, then runs that chunk's steps in reverse.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "cpu_features.h"
#include "kernels.h"
#include "mimn.h"

namespace fastattn {
namespace {

// ----------------------------------------------------------------------------- math helpers

template <typename T>
inline T sigmoid(T x) {
    return T(1) / (T(1) + std::exp(-x));
}
// glibc's tanhf goes through expm1f and costs as much as the mat-vecs around it; in double,
// (e - 1) / (e + 1) with e = exp(2x) is within an ulp of float tanh (the cancellation near 0
// costs ~1e-16 absolute) at the price of one fast exp. fp64 keeps std::tanh.
inline double tanh_(double x) { return std::tanh(x); }
inline float tanh_(float x) {
    const double xd = std::min(std::max(static_cast<double>(x), -20.0), 20.0);
    const double e = std::exp(2.0 * xd);
    return static_cast<float>((e - 1.0) / (e + 1.0));
}
// torch.nn.functional.softplus (beta 1, threshold 20): the identity above the threshold.
template <typename T>
inline T softplus(T x) {
    return x > T(20) ? x : std::log1p(std::exp(x));
}
template <typename T>
inline T softplus_grad(T x) {
    return x > T(20) ? T(1) : sigmoid(x);
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
}
// y = W x + bias, W (rows, K) row-major: contiguous dot products, four rows at a time. Only
// the tiny MUR mat-vec (m x m) uses it; the big ones go through gemv_t below.
template <typename T>
inline void matvec(const T* W, const T* bias, const T* x, int64_t rows, int64_t K, T* y) {
    int64_t j = 0;
    for (; j + 4 <= rows; j += 4) {
        const T *w0 = W + j * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t k = 0; k < K; ++k) {
            const T xk = x[k];
            s0 += w0[k] * xk;
            s1 += w1[k] * xk;
            s2 += w2[k] * xk;
            s3 += w3[k] * xk;
        }
        y[j] = bias[j] + s0, y[j + 1] = bias[j + 1] + s1;
        y[j + 2] = bias[j + 2] + s2, y[j + 3] = bias[j + 3] + s3;
    }
    for (; j < rows; ++j) y[j] = bias[j] + dot(W + j * K, x, K);
}

// y[c] = init[c] + Σ_r x[r] A[r, c], A (R, C) row-major: broadcast-FMAs over the outputs,
// whose inner loop is contiguous and fills whole vectors even at these small sizes. With A
// a transposed weight (K, N) it is the forward mat-vec W x + b; with A = W (N, K) it is the
// backward's dX += Wᵀ dY (init = y). y may equal init, must not alias A or x. The summation
// order depends on the ISA path (the AVX-512 float kernel keeps even and odd r in separate
// accumulators) but never on the thread count.
template <typename T>
FA_INLINE void gemv_t_body(const T* A, const T* init, const T* x, int64_t R, int64_t C, T* y) {
    if (y != init && C > 0) std::memcpy(y, init, sizeof(T) * C);
    for (int64_t r = 0; r < R; ++r) {
        const T xr = x[r];
        const T* a = A + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) y[c] += xr * a[c];
    }
}
template <typename T>
FA_INLINE void outer_acc_body(T* G, const T* v, const T* x, int64_t rows, int64_t K) {
    for (int64_t j = 0; j < rows; ++j) {
        const T vj = v[j];
        T* gj = G + j * K;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) gj[k] += vj * x[k];
    }
}
template <typename T>
void gemv_t_default(const T* A, const T* init, const T* x, int64_t R, int64_t C, T* y) {
    gemv_t_body(A, init, x, R, C, y);
}
template <typename T>
void outer_acc_default(T* G, const T* v, const T* x, int64_t rows, int64_t K) {
    outer_acc_body(G, v, x, rows, K);
}
#if FASTATTN_X86
template <typename T>
FA_TARGET_AVX2 void gemv_t_avx2(const T* A, const T* init, const T* x, int64_t R, int64_t C,
                                T* y) {
    gemv_t_body(A, init, x, R, C, y);
}
template <typename T>
FA_TARGET_AVX2 void outer_acc_avx2(T* G, const T* v, const T* x, int64_t rows, int64_t K) {
    outer_acc_body(G, v, x, rows, K);
}
template <typename T>
FA_TARGET_AVX512F void outer_acc_avx512(T* G, const T* v, const T* x, int64_t rows, int64_t K) {
    outer_acc_body(G, v, x, rows, K);
}
// NB column blocks of 16 floats (the last one masked by `tail`) held in registers over all R.
template <int NB>
FA_TARGET_AVX512F inline void gemv_t_block_f32(const float* A, const float* init,
                                               const float* x, int64_t R, int64_t C, float* y,
                                               __mmask16 tail) {
    // two accumulator sets (even / odd r) halve the FMA latency chain
    __m512 acc[NB], acc1[NB];
#pragma GCC unroll 8
    for (int i = 0; i < NB; ++i) {
        acc[i] = _mm512_maskz_loadu_ps(i == NB - 1 ? tail : __mmask16(0xFFFF), init + 16 * i);
        acc1[i] = _mm512_setzero_ps();
    }
    int64_t r = 0;
    for (; r + 2 <= R; r += 2) {
        const __m512 x0 = _mm512_set1_ps(x[r]);
        const __m512 x1 = _mm512_set1_ps(x[r + 1]);
        const float* a0 = A + r * C;
        const float* a1 = a0 + C;
#pragma GCC unroll 8
        for (int i = 0; i < NB; ++i) {
            const __mmask16 mk = i == NB - 1 ? tail : __mmask16(0xFFFF);
            acc[i] = _mm512_fmadd_ps(x0, _mm512_maskz_loadu_ps(mk, a0 + 16 * i), acc[i]);
            acc1[i] = _mm512_fmadd_ps(x1, _mm512_maskz_loadu_ps(mk, a1 + 16 * i), acc1[i]);
        }
    }
    if (r < R) {
        const __m512 x0 = _mm512_set1_ps(x[r]);
        const float* a0 = A + r * C;
#pragma GCC unroll 8
        for (int i = 0; i < NB; ++i) {
            const __mmask16 mk = i == NB - 1 ? tail : __mmask16(0xFFFF);
            acc[i] = _mm512_fmadd_ps(x0, _mm512_maskz_loadu_ps(mk, a0 + 16 * i), acc[i]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < NB; ++i)
        _mm512_mask_storeu_ps(y + 16 * i, i == NB - 1 ? tail : __mmask16(0xFFFF),
                              _mm512_add_ps(acc[i], acc1[i]));
}
template <typename T>
FA_TARGET_AVX512F void gemv_t_avx512(const T* A, const T* init, const T* x, int64_t R, int64_t C,
                                     T* y) {
    gemv_t_body(A, init, x, R, C, y);
}
template <>
FA_TARGET_AVX512F void gemv_t_avx512<float>(const float* A, const float* init, const float* x,
                                            int64_t R, int64_t C, float* y) {
    for (int64_t c0 = 0; c0 < C; c0 += 128) {
        const int64_t n = std::min<int64_t>(C - c0, 128);
        const int nb = static_cast<int>((n + 15) / 16);
        const int last = static_cast<int>(n - 16 * (nb - 1));
        const __mmask16 tail = static_cast<__mmask16>((1u << last) - 1u);
        const float* a = A + c0;
        const float* in = init + c0;
        float* out = y + c0;
        switch (nb) {
            case 1: gemv_t_block_f32<1>(a, in, x, R, C, out, tail); break;
            case 2: gemv_t_block_f32<2>(a, in, x, R, C, out, tail); break;
            case 3: gemv_t_block_f32<3>(a, in, x, R, C, out, tail); break;
            case 4: gemv_t_block_f32<4>(a, in, x, R, C, out, tail); break;
            case 5: gemv_t_block_f32<5>(a, in, x, R, C, out, tail); break;
            case 6: gemv_t_block_f32<6>(a, in, x, R, C, out, tail); break;
            case 7: gemv_t_block_f32<7>(a, in, x, R, C, out, tail); break;
            default: gemv_t_block_f32<8>(a, in, x, R, C, out, tail); break;
        }
    }
}
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
template <typename T>
inline void gemv_t(const T* A, const T* init, const T* x, int64_t R, int64_t C, T* y) {
#if FASTATTN_X86
    const int isa = mimn_isa();
    if (isa == 2) return gemv_t_avx512(A, init, x, R, C, y);
    if (isa == 1) return gemv_t_avx2(A, init, x, R, C, y);
#endif
    gemv_t_default(A, init, x, R, C, y);
}
// y += Wᵀ v, W (rows, K).
template <typename T>
inline void matvec_t_acc(const T* W, const T* v, int64_t rows, int64_t K, T* y) {
    gemv_t(W, y, v, rows, K, y);
}
// G += v xᵀ, G (rows, K).
template <typename T>
inline void outer_acc(T* G, const T* v, const T* x, int64_t rows, int64_t K) {
#if FASTATTN_X86
    const int isa = mimn_isa();
    if (isa == 2) return outer_acc_avx512(G, v, x, rows, K);
    if (isa == 1) return outer_acc_avx2(G, v, x, rows, K);
#endif
    outer_acc_default(G, v, x, rows, K);
}
template <typename T>
inline void add_to(T* y, const T* x, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}
template <typename T>
inline void zero(T* p, int64_t n) {
    if (n > 0) std::memset(p, 0, sizeof(T) * n);
}
template <typename T>
inline void copy(T* dst, const T* src, int64_t n) {
    if (n > 0) std::memcpy(dst, src, sizeof(T) * n);
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
    // tape
    int64_t t_ctrl, t_ntm, t_miu, TS;
    // per-thread work space (mat-vec outputs, concatenated inputs, gradient temporaries)
    int64_t work;

    explicit Layout(const MimnDims& d) {
        Dx = d.Dx, D = d.D, m = d.m, Hc = d.Hc, Hs = d.Hs, P = 4 * d.D + 2;
        k = std::min(d.miu_k, d.m);
        mur = d.has_mur;
        s_h = 0, s_r = Hc, s_M = s_r + D, s_g = s_M + m * D, s_S = s_g + m, SS = s_S + m * Hs;
        const int64_t rec = 1 + 3 * m;
        n_act = 0, n_spg = P, n_nM = P + 2, n_rd = n_nM + m, n_wd = n_rd + rec;
        n_Pm = n_wd + rec, n_sum = n_Pm + m, n_wt = n_sum + 1, NT = n_wt + m;
        t_ctrl = 0, t_ntm = 4 * Hc, t_miu = t_ntm + NT, TS = t_miu + k * (1 + 4 * Hs);
        // the largest user is scan_step_bwd: 2(Dx+D) + P + Hc, then miu_bwd (2(D+Dx) + 6Hs)
        // or ntm_bwd (4m) or gru_bwd (6Hc)
        const int64_t H = std::max(Hc, Hs);
        work = 4 * (Dx + D) + P + Hc + 6 * H + 4 * m + 8;
    }
};

// ----------------------------------------------------------------------------- GRU cell

// W (rows, K) -> (K, rows).
template <typename T>
std::vector<T> transposed(const T* W, int64_t rows, int64_t K) {
    std::vector<T> t(static_cast<size_t>(rows * K));
    for (int64_t j = 0; j < rows; ++j)
        for (int64_t k = 0; k < K; ++k) t[k * rows + j] = W[j * K + k];
    return t;
}

// w_ih_t / w_hh_t: the transposed weights (K, 3H) / (H, 3H) for the forward mat-vecs.
template <typename T>
struct Gru {
    const T *w_ih, *w_hh, *b_ih, *b_hh;
    int64_t H, K;  // hidden and input width
    const T *w_ih_t, *w_hh_t;
};
// A Gru that owns its transposed weights (made once per kernel call, before the parallel
// region); not copyable, since c points into it.
template <typename T>
struct GruT {
    std::vector<T> ih_t, hh_t;
    Gru<T> c;
    GruT(const T* w_ih, const T* w_hh, const T* b_ih, const T* b_hh, int64_t H, int64_t K,
         bool active)
        : c{w_ih, w_hh, b_ih, b_hh, H, K, nullptr, nullptr} {
        if (!active) return;
        ih_t = transposed(w_ih, 3 * H, K);
        hh_t = transposed(w_hh, 3 * H, H);
        c.w_ih_t = ih_t.data();
        c.w_hh_t = hh_t.data();
    }
    GruT(const GruT&) = delete;
    GruT& operator=(const GruT&) = delete;
};
template <typename T>
struct GruGrad {
    T *w_ih, *w_hh, *b_ih, *b_hh;
};

// torch.nn.GRUCell. tape (4H) = [r, z, n, W_hn h + b_hn]; work (6H).
template <typename T>
void gru_fwd(const Gru<T>& c, const T* x, const T* h, T* h_out, T* tape, T* work) {
    const int64_t H = c.H;
    T* gi = work;
    T* gh = work + 3 * H;
    gemv_t(c.w_ih_t, c.b_ih, x, c.K, 3 * H, gi);
    gemv_t(c.w_hh_t, c.b_hh, h, H, 3 * H, gh);
    T *rg = tape, *z = tape + H, *n = tape + 2 * H, *ghn = tape + 3 * H;
    for (int64_t j = 0; j < H; ++j) {
        rg[j] = sigmoid(gi[j] + gh[j]);
        z[j] = sigmoid(gi[H + j] + gh[H + j]);
        ghn[j] = gh[2 * H + j];
        n[j] = tanh_(gi[2 * H + j] + rg[j] * ghn[j]);
        h_out[j] = (T(1) - z[j]) * n[j] + z[j] * h[j];
    }
}

// dx (K) and dh (H) are accumulated into; parameter gradients too. work (6H).
template <typename T>
void gru_bwd(const Gru<T>& c, const GruGrad<T>& gr, const T* x, const T* h, const T* tape,
             const T* dh_out, T* dx, T* dh, T* work) {
    const int64_t H = c.H;
    T* dgi = work;
    T* dgh = work + 3 * H;
    const T *rg = tape, *z = tape + H, *n = tape + 2 * H, *ghn = tape + 3 * H;
    for (int64_t j = 0; j < H; ++j) {
        const T g = dh_out[j];
        const T dn = g * (T(1) - z[j]);
        const T dz = g * (h[j] - n[j]);
        const T dpn = dn * (T(1) - n[j] * n[j]);
        const T dpr = dpn * ghn[j] * rg[j] * (T(1) - rg[j]);
        const T dpz = dz * z[j] * (T(1) - z[j]);
        dgi[j] = dpr, dgi[H + j] = dpz, dgi[2 * H + j] = dpn;
        dgh[j] = dpr, dgh[H + j] = dpz, dgh[2 * H + j] = dpn * rg[j];
        dh[j] += g * z[j];
    }
    matvec_t_acc(c.w_ih, dgi, 3 * H, c.K, dx);
    matvec_t_acc(c.w_hh, dgh, 3 * H, H, dh);
    outer_acc(gr.w_ih, dgi, x, 3 * H, c.K);
    outer_acc(gr.w_hh, dgh, h, 3 * H, H);
    add_to(gr.b_ih, dgi, 3 * H);
    add_to(gr.b_hh, dgh, 3 * H);
}

// ----------------------------------------------------------------------------- addressing

// w = softmax_i(beta · cos(key, M(i))). rec = [|key|, dots (m), denominators (m), w (m)].
template <typename T>
void content_fwd(const T* key, T beta, const T* M, const T* nM, int64_t m, int64_t D, T* rec) {
    const T nk = std::sqrt(dot(key, key, D));
    T *dots = rec + 1, *den = rec + 1 + m, *w = rec + 1 + 2 * m;
    rec[0] = nk;
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t i = 0; i < m; ++i) {
        dots[i] = dot(key, M + i * D, D);
        den[i] = std::max(nk * nM[i], T(1e-8));
        w[i] = beta * dots[i] / den[i];
        mx = std::max(mx, w[i]);
    }
    T sum = 0;
    for (int64_t i = 0; i < m; ++i) sum += (w[i] = std::exp(w[i] - mx));
    for (int64_t i = 0; i < m; ++i) w[i] /= sum;
}

// Backward of content_fwd given dw (m): accumulates dkey (D) and dM (m, D), returns dbeta.
// As in torch: the clamp passes no gradient below 1e-8 and |v| has gradient 0 at v = 0.
template <typename T>
T content_bwd(const T* dw, const T* rec, const T* key, T beta, const T* M, const T* nM,
              int64_t m, int64_t D, T* dkey, T* dM) {
    const T nk = rec[0];
    const T *dots = rec + 1, *den = rec + 1 + m, *w = rec + 1 + 2 * m;
    T sdw = 0;
    for (int64_t i = 0; i < m; ++i) sdw += w[i] * dw[i];
    T dbeta = 0, dnk = 0;
    for (int64_t i = 0; i < m; ++i) {
        const T ds = w[i] * (dw[i] - sdw);
        dbeta += ds * dots[i] / den[i];
        const T dc = ds * beta;
        const T ddot = dc / den[i];
        const T dden = -dc * dots[i] / (den[i] * den[i]);
        T dnM = 0;
        if (nk * nM[i] >= T(1e-8)) {
            dnk += dden * nM[i];
            dnM = dden * nk;
        }
        const T cM = nM[i] > T(0) ? dnM / nM[i] : T(0);
        const T* Mi = M + i * D;
        T* dMi = dM + i * D;
#pragma omp simd
        for (int64_t e = 0; e < D; ++e) {
            dMi[e] += ddot * key[e] + cM * Mi[e];
            dkey[e] += ddot * Mi[e];
        }
    }
    if (nk > T(0)) {
        const T c = dnk / nk;
        for (int64_t e = 0; e < D; ++e) dkey[e] += c * key[e];
    }
    return dbeta;
}

// ----------------------------------------------------------------------------- NTM (steps 3-6)

// One row. M_out must not alias M. rec: the NTM record (L.NT); wr = rec + L.n_rd + 1 + 2m.
template <typename T>
void ntm_fwd(const Layout& L, const T* mur_w, const T* mur_b, const T* M, const T* g,
             const T* head, T* read, T* M_out, T* g_out, T* rec) {
    const int64_t D = L.D, m = L.m;
    T* act = rec + L.n_act;
    T* spg = rec + L.n_spg;
    T* nM = rec + L.n_nM;
    for (int64_t e = 0; e < D; ++e) act[e] = tanh_(head[e]);
    act[D] = softplus(head[D]) + T(1);
    spg[0] = softplus_grad(head[D]);
    for (int64_t e = D + 1; e < 2 * D + 1; ++e) act[e] = tanh_(head[e]);
    act[2 * D + 1] = softplus(head[2 * D + 1]) + T(1);
    spg[1] = softplus_grad(head[2 * D + 1]);
    for (int64_t e = 2 * D + 2; e < 3 * D + 2; ++e) act[e] = sigmoid(head[e]);
    for (int64_t e = 3 * D + 2; e < 4 * D + 2; ++e) act[e] = tanh_(head[e]);
    const T *kr = act, *kw = act + D + 1, *er = act + 2 * D + 2, *ad = act + 3 * D + 2;
    for (int64_t i = 0; i < m; ++i) nM[i] = std::sqrt(dot(M + i * D, M + i * D, D));
    T* rd = rec + L.n_rd;
    T* wd = rec + L.n_wd;
    content_fwd(kr, act[D], M, nM, m, D, rd);
    content_fwd(kw, act[2 * D + 1], M, nM, m, D, wd);
    const T* wr = rd + 1 + 2 * m;
    const T* ww = wd + 1 + 2 * m;
    zero(read, D);
    for (int64_t i = 0; i < m; ++i) {
        const T c = wr[i];
        const T* Mi = M + i * D;
#pragma omp simd
        for (int64_t e = 0; e < D; ++e) read[e] += c * Mi[e];
    }
    T* wt = rec + L.n_wt;
    if (L.mur) {
        // P = softmax(mur_w g + mur_b); w~ = (ww ⊙ P) / Σ(ww ⊙ P)
        T* Pm = rec + L.n_Pm;
        matvec(mur_w, mur_b, g, m, m, Pm);
        T mx = -std::numeric_limits<T>::infinity();
        for (int64_t i = 0; i < m; ++i) mx = std::max(mx, Pm[i]);
        T s = 0;
        for (int64_t i = 0; i < m; ++i) s += (Pm[i] = std::exp(Pm[i] - mx));
        for (int64_t i = 0; i < m; ++i) Pm[i] /= s;
        T u = 0;
        for (int64_t i = 0; i < m; ++i) u += (wt[i] = ww[i] * Pm[i]);
        rec[L.n_sum] = u;
        for (int64_t i = 0; i < m; ++i) wt[i] /= u;
    } else {
        copy(wt, ww, m);
    }
    for (int64_t i = 0; i < m; ++i) {
        g_out[i] = g[i] + wt[i];
        const T c = wt[i];
        const T* Mi = M + i * D;
        T* Oi = M_out + i * D;
#pragma omp simd
        for (int64_t e = 0; e < D; ++e) Oi[e] = Mi[e] * (T(1) - c * er[e]) + c * ad[e];
    }
}

// Backward of one row's ntm_fwd. Writes dM (m, D), dg (m), dhead (P); accumulates the MUR
// gradients. d_wr may be null. work: 4m.
template <typename T>
void ntm_bwd(const Layout& L, const T* mur_w, const T* M, const T* g, const T* rec,
             const T* d_read, const T* d_M_out, const T* d_g_out, const T* d_wr, T* dM, T* dg,
             T* dhead, T* dmur_w, T* dmur_b, T* work) {
    const int64_t D = L.D, m = L.m;
    const T* act = rec + L.n_act;
    const T* spg = rec + L.n_spg;
    const T* nM = rec + L.n_nM;
    const T* rd = rec + L.n_rd;
    const T* wd = rec + L.n_wd;
    const T* wt = rec + L.n_wt;
    const T *kr = act, *kw = act + D + 1, *er = act + 2 * D + 2, *ad = act + 3 * D + 2;
    T* dwt = work;
    T* dww = work + m;
    T* dwr = work + 2 * m;
    T* tmp = work + 3 * m;
    zero(dhead, L.P);
    T *dkr = dhead, *dkw = dhead + D + 1, *de = dhead + 2 * D + 2, *da = dhead + 3 * D + 2;
    // Write: M_out = M ⊙ (1 - w~ eᵀ) + w~ aᵀ, g_out = g + w~.
    for (int64_t i = 0; i < m; ++i) {
        const T c = wt[i];
        const T* Mi = M + i * D;
        const T* Gi = d_M_out + i * D;
        T* dMi = dM + i * D;
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t e = 0; e < D; ++e) {
            s += Gi[e] * (ad[e] - Mi[e] * er[e]);
            de[e] -= Gi[e] * Mi[e] * c;
            da[e] += Gi[e] * c;
            dMi[e] = Gi[e] * (T(1) - c * er[e]);
        }
        dwt[i] = d_g_out[i] + s;
        dg[i] = d_g_out[i];
    }
    const T* ww = wd + 1 + 2 * m;
    if (L.mur) {
        const T* Pm = rec + L.n_Pm;
        const T u = rec[L.n_sum];
        T s = 0;
        for (int64_t i = 0; i < m; ++i) s += dwt[i] * wt[i];
        T sp = 0;
        for (int64_t i = 0; i < m; ++i) {
            const T du = (dwt[i] - s) / u;
            dww[i] = du * Pm[i];
            tmp[i] = du * ww[i];  // dP
            sp += tmp[i] * Pm[i];
        }
        for (int64_t i = 0; i < m; ++i) tmp[i] = Pm[i] * (tmp[i] - sp);  // d logits
        add_to(dmur_b, tmp, m);
        outer_acc(dmur_w, tmp, g, m, m);
        matvec_t_acc(mur_w, tmp, m, m, dg);
    } else {
        copy(dww, dwt, m);
    }
    // Read: read = Σ_i wr(i) M(i).
    const T* wr = rd + 1 + 2 * m;
    for (int64_t i = 0; i < m; ++i) {
        const T* Mi = M + i * D;
        T* dMi = dM + i * D;
        dwr[i] = (d_wr ? d_wr[i] : T(0)) + dot(d_read, Mi, D);
        const T c = wr[i];
#pragma omp simd
        for (int64_t e = 0; e < D; ++e) dMi[e] += c * d_read[e];
    }
    const T dbr = content_bwd(dwr, rd, kr, act[D], M, nM, m, D, dkr, dM);
    const T dbw = content_bwd(dww, wd, kw, act[2 * D + 1], M, nM, m, D, dkw, dM);
    // Head activations.
    for (int64_t e = 0; e < D; ++e) dkr[e] *= T(1) - kr[e] * kr[e];
    for (int64_t e = 0; e < D; ++e) dkw[e] *= T(1) - kw[e] * kw[e];
    dhead[D] = dbr * spg[0];
    dhead[2 * D + 1] = dbw * spg[1];
    for (int64_t e = 0; e < D; ++e) de[e] *= er[e] * (T(1) - er[e]);
    for (int64_t e = 0; e < D; ++e) da[e] *= T(1) - ad[e] * ad[e];
}

// ----------------------------------------------------------------------------- MIU (step 7)

// The miu_k channels with the largest wr, ties to the smaller index (a stable descending
// sort), listed in increasing channel order. Returns how many (min(k, m)).
template <typename T>
int64_t miu_select(const T* wr, int64_t m, int64_t k, int64_t* sel) {
    int64_t n = 0;
    for (int64_t i = 0; i < m && n < k; ++i) {
        int64_t rank = 0;
        for (int64_t j = 0; j < m; ++j) rank += (wr[j] > wr[i]) || (wr[j] == wr[i] && j < i);
        if (rank < k) sel[n++] = i;
    }
    return n;
}

// One row. rec = [k channel ids | k GRU tapes (4Hs)]; work: D + Dx + 6Hs (+ sel of m ints).
template <typename T>
void miu_fwd(const Layout& L, const Gru<T>& c, const T* Mt, const T* x, const T* S,
             const T* wr, T* S_out, T* rec, T* work, int64_t* sel) {
    const int64_t D = L.D, Hs = L.Hs;
    copy(S_out, S, L.m * Hs);
    const int64_t n = miu_select(wr, L.m, L.k, sel);
    T* xin = work;
    for (int64_t j = 0; j < n; ++j) {
        const int64_t i = sel[j];
        rec[j] = T(i);
        copy(xin, Mt + i * D, D);
        copy(xin + D, x, L.Dx);
        gru_fwd(c, xin, S + i * Hs, S_out + i * Hs, rec + L.k + 4 * Hs * j, work + D + L.Dx);
    }
}

// Writes dS (m, Hs); accumulates dMt, dx and the GRU gradients. work: 2(D + Dx) + 6Hs.
template <typename T>
void miu_bwd(const Layout& L, const Gru<T>& c, const GruGrad<T>& gr, const T* Mt, const T* x,
             const T* S, const T* rec, const T* dS_out, T* dMt, T* dx, T* dS, T* work) {
    const int64_t D = L.D, Hs = L.Hs, K = D + L.Dx;
    copy(dS, dS_out, L.m * Hs);
    T* xin = work;
    T* dxin = work + K;
    for (int64_t j = 0; j < L.k; ++j) {
        const int64_t i = static_cast<int64_t>(rec[j]);
        copy(xin, Mt + i * D, D);
        copy(xin + D, x, L.Dx);
        zero(dxin, K);
        zero(dS + i * Hs, Hs);
        gru_bwd(c, gr, xin, S + i * Hs, rec + L.k + 4 * Hs * j, dS_out + i * Hs, dxin,
                dS + i * Hs, work + 2 * K);
        add_to(dMt + i * D, dxin, D);
        add_to(dx, dxin + D, L.Dx);
    }
}

// ----------------------------------------------------------------------------- scan step

// Built once per kernel call, before the parallel region (it transposes the weights).
template <typename T>
struct Model {
    Layout L;
    GruT<T> ctrl_t, miu_t;
    const Gru<T>&ctrl, &miu;
    const T *heads_w, *heads_b, *mur_w, *mur_b;
    std::vector<T> heads_t_buf;
    const T* heads_t;  // (Hc, P)
    Model(const MimnDims& d, const MimnWeights<T>& w)
        : L(d),
          ctrl_t(w.ctrl_w_ih, w.ctrl_w_hh, w.ctrl_b_ih, w.ctrl_b_hh, d.Hc, d.Dx + d.D, true),
          miu_t(w.miu_w_ih, w.miu_w_hh, w.miu_b_ih, w.miu_b_hh, d.Hs, d.D + d.Dx, L.k > 0),
          ctrl(ctrl_t.c),
          miu(miu_t.c),
          heads_w(w.heads_w),
          heads_b(w.heads_b),
          mur_w(w.mur_w),
          mur_b(w.mur_b),
          heads_t_buf(transposed(w.heads_w, L.P, d.Hc)),
          heads_t(heads_t_buf.data()) {}
    Model(const Model&) = delete;
    Model& operator=(const Model&) = delete;
};

// Steps 1-7 of one valid step of one row: state `s` -> `s1` (no aliasing), tape written.
template <typename T>
void scan_step_fwd(const Model<T>& md, const T* x, const T* s, T* s1, T* tape, T* work,
                   int64_t* sel) {
    const Layout& L = md.L;
    T* xin = work;                  // [x_t, r_{t-1}]
    T* head = xin + L.Dx + L.D;     // P
    T* w2 = head + L.P;             // GRU / MIU work
    copy(xin, x, L.Dx);
    copy(xin + L.Dx, s + L.s_r, L.D);
    gru_fwd(md.ctrl, xin, s + L.s_h, s1 + L.s_h, tape + L.t_ctrl, w2);
    gemv_t(md.heads_t, md.heads_b, s1 + L.s_h, L.Hc, L.P, head);
    T* rec = tape + L.t_ntm;
    ntm_fwd(L, md.mur_w, md.mur_b, s + L.s_M, s + L.s_g, head, s1 + L.s_r, s1 + L.s_M,
            s1 + L.s_g, rec);
    if (L.k > 0) {
        miu_fwd(L, md.miu, s1 + L.s_M, x, s + L.s_S, rec + L.n_rd + 1 + 2 * L.m, s1 + L.s_S,
                tape + L.t_miu, w2, sel);
    } else {
        copy(s1 + L.s_S, s + L.s_S, L.m * L.Hs);
    }
}

// Backward of one valid step: `gs` holds the gradients of the state after the step (its r
// slot already includes d_reads[t]; its M slot is modified); writes the gradients of the
// state before the step into `gs0`, accumulates dx_t and the parameter gradients.
template <typename T>
void scan_step_bwd(const Model<T>& md, const GruGrad<T>& gctrl, const GruGrad<T>& gmiu,
                   T* dheads_w, T* dheads_b, T* dmur_w, T* dmur_b, const T* x, const T* s,
                   const T* s1, const T* tape, T* gs, T* gs0, T* dx, T* work) {
    const Layout& L = md.L;
    T* xin = work;                // [x_t, r_{t-1}]
    T* dxin = xin + L.Dx + L.D;
    T* dhead = dxin + L.Dx + L.D;
    T* dh = dhead + L.P;          // Hc
    T* w2 = dh + L.Hc;
    const T* rec = tape + L.t_ntm;
    if (L.k > 0) {
        miu_bwd(L, md.miu, gmiu, s1 + L.s_M, x, s + L.s_S, tape + L.t_miu, gs + L.s_S,
                gs + L.s_M, dx, gs0 + L.s_S, w2);
    } else {
        copy(gs0 + L.s_S, gs + L.s_S, L.m * L.Hs);
    }
    ntm_bwd(L, md.mur_w, s + L.s_M, s + L.s_g, rec, gs + L.s_r, gs + L.s_M, gs + L.s_g,
            static_cast<const T*>(nullptr), gs0 + L.s_M, gs0 + L.s_g, dhead, dmur_w, dmur_b,
            w2);
    // heads Linear
    copy(dh, gs + L.s_h, L.Hc);
    matvec_t_acc(md.heads_w, dhead, L.P, L.Hc, dh);
    outer_acc(dheads_w, dhead, s1 + L.s_h, L.P, L.Hc);
    add_to(dheads_b, dhead, L.P);
    // controller GRU on [x_t, r_{t-1}]
    copy(xin, x, L.Dx);
    copy(xin + L.Dx, s + L.s_r, L.D);
    zero(dxin, L.Dx + L.D);
    zero(gs0 + L.s_h, L.Hc);
    gru_bwd(md.ctrl, gctrl, xin, s + L.s_h, tape + L.t_ctrl, dh, dxin, gs0 + L.s_h, w2);
    add_to(dx, dxin, L.Dx);
    copy(gs0 + L.s_r, dxin + L.Dx, L.D);
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

// Per-thread scratch allocated up front (an exception inside a parallel region would
// terminate the process).
template <typename T>
struct Scratch {
    std::vector<AlignedBuffer<T>> buf;
    std::vector<std::vector<int64_t>> sel;
    Scratch(int nthreads, size_t n, int64_t m) : buf(nthreads), sel(nthreads) {
        for (int i = 0; i < nthreads; ++i) {
            buf[i].resize(std::max<size_t>(n, 1));
            sel[i].resize(std::max<int64_t>(m, 1));
        }
    }
};

}  // namespace

// ============================================================================= entry points

template <typename T>
void ntm_read_write_fwd(const MimnDims& d, const T* M, const T* g, const T* head,
                        const T* mur_w, const T* mur_b, T* read, T* M_out, T* g_out, T* wr,
                        int nthreads) {
    const Layout L(d);
    Scratch<T> sc(nthreads, L.NT, L.m);
#pragma omp parallel num_threads(nthreads)
    {
        T* rec = sc.buf[omp_get_thread_num()].data();
#pragma omp for schedule(static)
        for (int64_t b = 0; b < d.B; ++b) {
            ntm_fwd(L, mur_w, mur_b, M + b * L.m * L.D, g + b * L.m, head + b * L.P,
                    read + b * L.D, M_out + b * L.m * L.D, g_out + b * L.m, rec);
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
    Scratch<T> sc(nthreads, L.NT + 4 * L.m + L.D + L.m * L.D + L.m, L.m);
#pragma omp parallel num_threads(nthreads)
    {
        T* rec = sc.buf[omp_get_thread_num()].data();
        T* work = rec + L.NT;
        T* junk = work + 4 * L.m;  // M_out / read of the recomputation
#pragma omp for schedule(static)
        for (int64_t b = 0; b < d.B; ++b) {
            const T* Mb = M + b * L.m * L.D;
            const T* gb = g + b * L.m;
            ntm_fwd(L, mur_w, mur_b, Mb, gb, head + b * L.P, junk, junk + L.D,
                    junk + L.D + L.m * L.D, rec);
            T* dmw = L.mur ? dmur_w_rows + b * L.m * L.m : nullptr;
            T* dmb = L.mur ? dmur_b_rows + b * L.m : nullptr;
            if (L.mur) {
                zero(dmw, L.m * L.m);
                zero(dmb, L.m);
            }
            ntm_bwd(L, mur_w, Mb, gb, rec, d_read + b * L.D, d_M_out + b * L.m * L.D,
                    d_g_out + b * L.m, d_wr ? d_wr + b * L.m : nullptr, dM + b * L.m * L.D,
                    dg + b * L.m, dhead + b * L.P, dmw, dmb, work);
        }
    }
}

template <typename T>
void miu_gather_gru_fwd(const MimnDims& d, const T* M, const T* x, const T* S, const T* wr,
                        const T* w_ih, const T* w_hh, const T* b_ih, const T* b_hh, T* S_out,
                        int nthreads) {
    const Layout L(d);
    const GruT<T> ct(w_ih, w_hh, b_ih, b_hh, d.Hs, d.D + d.Dx, L.k > 0);
    const Gru<T>& c = ct.c;
    const int64_t rec_n = L.k * (1 + 4 * L.Hs);
    Scratch<T> sc(nthreads, rec_n + L.work, L.m);
#pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num();
        T* rec = sc.buf[tid].data();
        int64_t* sel = sc.sel[tid].data();
#pragma omp for schedule(static)
        for (int64_t b = 0; b < d.B; ++b) {
            const int64_t mh = L.m * L.Hs;
            if (L.k > 0) {
                miu_fwd(L, c, M + b * L.m * L.D, x + b * L.Dx, S + b * mh, wr + b * L.m,
                        S_out + b * mh, rec, rec + rec_n, sel);
            } else {
                copy(S_out + b * mh, S + b * mh, mh);
            }
        }
    }
}

template <typename T>
void miu_gather_gru_bwd(const MimnDims& d, const T* d_S_out, const T* M, const T* x,
                        const T* S, const T* wr, const T* w_ih, const T* w_hh, const T* b_ih,
                        const T* b_hh, T* dM, T* dx, T* dS, T* dw_ih_rows, T* dw_hh_rows,
                        T* db_ih_rows, T* db_hh_rows, int nthreads) {
    const Layout L(d);
    const GruT<T> ct(w_ih, w_hh, b_ih, b_hh, d.Hs, d.D + d.Dx, L.k > 0);
    const Gru<T>& c = ct.c;
    const int64_t rec_n = L.k * (1 + 4 * L.Hs);
    const int64_t mh = L.m * L.Hs, K = L.D + L.Dx, G = 3 * L.Hs;
    Scratch<T> sc(nthreads, rec_n + L.work + mh, L.m);
#pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num();
        T* rec = sc.buf[tid].data();
        T* work = rec + rec_n;
        T* junk = work + L.work;  // S_out of the recomputation
        int64_t* sel = sc.sel[tid].data();
#pragma omp for schedule(static)
        for (int64_t b = 0; b < d.B; ++b) {
            const T* Mb = M + b * L.m * L.D;
            const T* xb = x + b * L.Dx;
            const T* Sb = S + b * mh;
            zero(dM + b * L.m * L.D, L.m * L.D);
            zero(dx + b * L.Dx, L.Dx);
            if (L.k == 0) {
                copy(dS + b * mh, d_S_out + b * mh, mh);
                continue;
            }
            const GruGrad<T> gr{dw_ih_rows + b * G * K, dw_hh_rows + b * G * L.Hs,
                                db_ih_rows + b * G, db_hh_rows + b * G};
            zero(gr.w_ih, G * K);
            zero(gr.w_hh, G * L.Hs);
            zero(gr.b_ih, G);
            zero(gr.b_hh, G);
            miu_fwd(L, c, Mb, xb, Sb, wr + b * L.m, junk, rec, work, sel);
            miu_bwd(L, c, gr, Mb, xb, Sb, rec, d_S_out + b * mh, dM + b * L.m * L.D,
                    dx + b * L.Dx, dS + b * mh, work);
        }
    }
}

template <typename T>
void mimn_scan_fwd(const MimnDims& d, const T* x, const int64_t* lengths,
                   const MimnWeights<T>& w, MimnStates<const T> state0, int64_t chunk,
                   T* reads, MimnStates<T> final_state, MimnStates<T> ck, int nthreads) {
    check_lengths(lengths, d.B, d.T, "mimn_scan_fwd");
    if (chunk < 1) throw std::invalid_argument("mimn_scan_fwd: chunk must be >= 1");
    const Model<T> md(d, w);
    const Layout& L = md.L;
    const int64_t NC = (d.T + chunk - 1) / chunk;
    Scratch<T> sc(nthreads, 2 * L.SS + L.TS + L.work, L.m);
#pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num();
        T* s = sc.buf[tid].data();
        T* s1 = s + L.SS;
        T* tape = s1 + L.SS;
        T* work = tape + L.TS;
        int64_t* sel = sc.sel[tid].data();
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < d.B; ++b) {
            T* s_cur = s;
            T* s_nxt = s1;
            load_state(L, state0, b, s_cur);
            const int64_t len = lengths[b];
            for (int64_t t = 0; t < d.T; ++t) {
                if (t % chunk == 0) store_state(L, s_cur, ck, b * NC + t / chunk);
                T* rd = reads + (b * d.T + t) * L.D;
                if (t >= len) {  // padding: state unchanged, read 0
                    zero(rd, L.D);
                    continue;
                }
                scan_step_fwd(md, x + (b * d.T + t) * L.Dx, s_cur, s_nxt, tape, work, sel);
                copy(rd, s_nxt + L.s_r, L.D);
                std::swap(s_cur, s_nxt);
            }
            store_state(L, s_cur, final_state, b);
        }
    }
}

template <typename T>
void mimn_scan_bwd(const MimnDims& d, const T* d_reads, MimnStates<const T> d_final,
                   const T* x, const int64_t* lengths, const MimnWeights<T>& w, int64_t chunk,
                   MimnStates<const T> ck, T* dx, MimnStates<T> d_state0,
                   const MimnWeightGrads<T>& dw, int nthreads) {
    check_lengths(lengths, d.B, d.T, "mimn_scan_bwd");
    if (chunk < 1) throw std::invalid_argument("mimn_scan_bwd: chunk must be >= 1");
    const Model<T> md(d, w);
    const Layout& L = md.L;
    const int64_t NC = (d.T + chunk - 1) / chunk;
    const int64_t C = std::min<int64_t>(chunk, std::max<int64_t>(d.T, 1));
    // states of one chunk (C + 1), its tapes (C), two gradient carries, work
    Scratch<T> sc(nthreads, (C + 1) * L.SS + C * L.TS + 2 * L.SS + L.work, L.m);
    const int64_t Dxi = d.Dx + d.D, G = 3 * d.Hc, Gs = 3 * d.Hs, Dmi = d.D + d.Dx;
#pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num();
        T* states = sc.buf[tid].data();
        T* tapes = states + (C + 1) * L.SS;
        T* gA = tapes + C * L.TS;
        T* gB = gA + L.SS;
        T* work = gB + L.SS;
        int64_t* sel = sc.sel[tid].data();
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < d.B; ++b) {
            // this row's parameter gradients, zeroed: they accumulate over the steps
            const GruGrad<T> gctrl{dw.ctrl_w_ih + b * G * Dxi, dw.ctrl_w_hh + b * G * d.Hc,
                                   dw.ctrl_b_ih + b * G, dw.ctrl_b_hh + b * G};
            zero(gctrl.w_ih, G * Dxi);
            zero(gctrl.w_hh, G * d.Hc);
            zero(gctrl.b_ih, G);
            zero(gctrl.b_hh, G);
            T* dhw = dw.heads_w + b * L.P * d.Hc;
            T* dhb = dw.heads_b + b * L.P;
            zero(dhw, L.P * d.Hc);
            zero(dhb, L.P);
            T *dmw = nullptr, *dmb = nullptr;
            if (L.mur) {
                dmw = dw.mur_w + b * L.m * L.m;
                dmb = dw.mur_b + b * L.m;
                zero(dmw, L.m * L.m);
                zero(dmb, L.m);
            }
            GruGrad<T> gmiu{nullptr, nullptr, nullptr, nullptr};
            if (L.k > 0) {
                gmiu = {dw.miu_w_ih + b * Gs * Dmi, dw.miu_w_hh + b * Gs * d.Hs,
                        dw.miu_b_ih + b * Gs, dw.miu_b_hh + b * Gs};
                zero(gmiu.w_ih, Gs * Dmi);
                zero(gmiu.w_hh, Gs * d.Hs);
                zero(gmiu.b_ih, Gs);
                zero(gmiu.b_hh, Gs);
            }
            // Padded steps are the tail t >= len: they pass the final-state gradients
            // through unchanged and get dx = 0.
            const int64_t len = lengths[b];
            zero(dx + (b * d.T + len) * L.Dx, (d.T - len) * L.Dx);
            T* g_cur = gA;
            T* g_nxt = gB;
            load_state(L, d_final, b, g_cur);
            for (int64_t c = NC - 1; c >= 0; --c) {
                const int64_t t0 = c * chunk, t1 = std::min(t0 + chunk, len);
                if (t1 <= t0) continue;
                // replay the chunk's valid steps from its checkpoint
                load_state(L, ck, b * NC + c, states);
                for (int64_t t = t0; t < t1; ++t) {
                    const int64_t j = t - t0;
                    scan_step_fwd(md, x + (b * d.T + t) * L.Dx, states + j * L.SS,
                                  states + (j + 1) * L.SS, tapes + j * L.TS, work, sel);
                }
                for (int64_t t = t1 - 1; t >= t0; --t) {
                    const int64_t j = t - t0;
                    add_to(g_cur + L.s_r, d_reads + (b * d.T + t) * L.D, L.D);
                    T* dxt = dx + (b * d.T + t) * L.Dx;
                    zero(dxt, L.Dx);
                    scan_step_bwd(md, gctrl, gmiu, dhw, dhb, dmw, dmb, x + (b * d.T + t) * L.Dx,
                                  states + j * L.SS, states + (j + 1) * L.SS, tapes + j * L.TS,
                                  g_cur, g_nxt, dxt, work);
                    std::swap(g_cur, g_nxt);
                }
            }
            store_state(L, g_cur, d_state0, b);
        }
    }
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
                                   MimnStates<T>, MimnStates<T>, int);                          \
    template void mimn_scan_bwd<T>(const MimnDims&, const T*, MimnStates<const T>, const T*,   \
                                   const int64_t*, const MimnWeights<T>&, int64_t,              \
                                   MimnStates<const T>, T*, MimnStates<T>,                      \
                                   const MimnWeightGrads<T>&, int);

FASTATTN_MIMN_INSTANTIATE(float)
FASTATTN_MIMN_INSTANTIATE(double)
#undef FASTATTN_MIMN_INSTANTIATE

}  // namespace fastattn
