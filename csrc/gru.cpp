// Fused varlen GRU scan (DESIGN.md §4 "gru_scan"): only the recurrence. The op layer has
// already added the input projection xp = x W_ihᵀ + b_ih for all steps (one GEMM), and turns
// the per-step gate gradients this backward writes into dx, dW_ih, dW_hh and the biases with
// GEMMs / sums, so these loops only carry what is sequential.
//
// Rows are independent: OpenMP over b, each row runs its steps in order, so the result does
// not depend on the thread count. W_hh (3H x H, 12 KB at H=32 fp32) stays in cache across a
// row's steps. The backward needs no checkpoints: the forward's output is every state, so
// each step recomputes its gates from h_{t-1} = out[t-1] (one mat-vec) instead of storing
// them.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "cpu_features.h"
#include "kernels.h"

namespace fastattn {
namespace {

template <typename T>
inline T sigmoid_(T x) {
    return T(1) / (T(1) + std::exp(-x));
}

// y = init + Σ_r x[r] A[r, :], A (R, C) row-major: contiguous broadcast-FMAs over the C
// outputs. With A = W_hhᵀ (H, 3H) it is the forward's W_hh h + b_hh; with A = W_hh (3H, H)
// the backward's dh += W_hhᵀ dg. y must not alias A or x.
template <typename T>
FA_INLINE void gemv_t(const T* A, const T* init, const T* x, int64_t R, int64_t C, T* y) {
    if (y != init) std::memcpy(y, init, sizeof(T) * C);
    for (int64_t r = 0; r < R; ++r) {
        const T xr = x[r];
        const T* a = A + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) y[c] += xr * a[c];
    }
}

struct Dims {
    int64_t B, T, H;
};

// Forward of rows [b0, b1): out (B, T, H), zero past each row's length.
template <typename T>
FA_INLINE void fwd_body(const Dims& d, const T* xp, const int64_t* lengths, const T* wT,
                        const T* b_hh, const T* h0, T* out, int nthreads) {
    const int64_t H = d.H, G = 3 * H;
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<T> hp(G);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < d.B; ++b) {
            const int64_t len = lengths[b];
            const T* h = h0 + b * H;
            for (int64_t t = 0; t < len; ++t) {
                gemv_t(wT, b_hh, h, H, G, hp.data());
                const T* xt = xp + (b * d.T + t) * G;
                T* o = out + (b * d.T + t) * H;
#pragma omp simd
                for (int64_t j = 0; j < H; ++j) {
                    const T r = sigmoid_(xt[j] + hp[j]);
                    const T z = sigmoid_(xt[H + j] + hp[H + j]);
                    const T n = std::tanh(xt[2 * H + j] + r * hp[2 * H + j]);
                    o[j] = (T(1) - z) * n + z * h[j];
                }
                h = o;
            }
            if (len < d.T) std::memset(out + (b * d.T + len) * H, 0, sizeof(T) * (d.T - len) * H);
        }
    }
}

// Backward: dxp (B, T, 3H) = d(xp), dhp (B, T, 3H) = d(W_hh h + b_hh), dh0 (B, H).
template <typename T>
FA_INLINE void bwd_body(const Dims& d, const T* d_out, const T* xp, const T* out,
                        const int64_t* lengths, const T* w_hh, const T* wT, const T* b_hh,
                        const T* h0, T* dxp, T* dhp, T* dh0, int nthreads) {
    const int64_t H = d.H, G = 3 * H;
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<T> hp(G), dh(H), direct(H);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < d.B; ++b) {
            const int64_t len = lengths[b];
            std::fill(dh.begin(), dh.end(), T(0));
            for (int64_t t = len - 1; t >= 0; --t) {
                const T* hprev = t > 0 ? out + (b * d.T + t - 1) * H : h0 + b * H;
                gemv_t(wT, b_hh, hprev, H, G, hp.data());
                const int64_t at = b * d.T + t;
                const T* xt = xp + at * G;
                const T* go = d_out + at * H;
                T* dx = dxp + at * G;
                T* dg = dhp + at * G;
#pragma omp simd
                for (int64_t j = 0; j < H; ++j) {
                    const T r = sigmoid_(xt[j] + hp[j]);
                    const T z = sigmoid_(xt[H + j] + hp[H + j]);
                    const T n = std::tanh(xt[2 * H + j] + r * hp[2 * H + j]);
                    const T g = dh[j] + go[j];
                    const T dan = g * (T(1) - z) * (T(1) - n * n);
                    const T dar = dan * hp[2 * H + j] * r * (T(1) - r);
                    const T daz = g * (hprev[j] - n) * z * (T(1) - z);
                    dx[j] = dg[j] = dar;
                    dx[H + j] = dg[H + j] = daz;
                    dx[2 * H + j] = dan;
                    dg[2 * H + j] = dan * r;
                    direct[j] = g * z;
                }
                gemv_t(w_hh, direct.data(), dg, G, H, dh.data());
            }
            std::memcpy(dh0 + b * H, dh.data(), sizeof(T) * H);
            if (len < d.T) {
                std::memset(dxp + (b * d.T + len) * G, 0, sizeof(T) * (d.T - len) * G);
                std::memset(dhp + (b * d.T + len) * G, 0, sizeof(T) * (d.T - len) * G);
            }
        }
    }
}

// One body, compiled per ISA; picked at run time (cpu_features.h).
template <typename T>
void fwd_default(const Dims& d, const T* xp, const int64_t* l, const T* wT, const T* bh,
                 const T* h0, T* out, int n) {
    fwd_body(d, xp, l, wT, bh, h0, out, n);
}
template <typename T>
void bwd_default(const Dims& d, const T* go, const T* xp, const T* out, const int64_t* l,
                 const T* w, const T* wT, const T* bh, const T* h0, T* dxp, T* dhp, T* dh0,
                 int n) {
    bwd_body(d, go, xp, out, l, w, wT, bh, h0, dxp, dhp, dh0, n);
}
#if FASTATTN_X86
template <typename T>
FA_TARGET_AVX2 void fwd_avx2(const Dims& d, const T* xp, const int64_t* l, const T* wT,
                             const T* bh, const T* h0, T* out, int n) {
    fwd_body(d, xp, l, wT, bh, h0, out, n);
}
template <typename T>
FA_TARGET_AVX2 void bwd_avx2(const Dims& d, const T* go, const T* xp, const T* out,
                             const int64_t* l, const T* w, const T* wT, const T* bh,
                             const T* h0, T* dxp, T* dhp, T* dh0, int n) {
    bwd_body(d, go, xp, out, l, w, wT, bh, h0, dxp, dhp, dh0, n);
}
template <typename T>
FA_TARGET_AVX512F void fwd_avx512(const Dims& d, const T* xp, const int64_t* l, const T* wT,
                                  const T* bh, const T* h0, T* out, int n) {
    fwd_body(d, xp, l, wT, bh, h0, out, n);
}
template <typename T>
FA_TARGET_AVX512F void bwd_avx512(const Dims& d, const T* go, const T* xp, const T* out,
                                  const int64_t* l, const T* w, const T* wT, const T* bh,
                                  const T* h0, T* dxp, T* dhp, T* dh0, int n) {
    bwd_body(d, go, xp, out, l, w, wT, bh, h0, dxp, dhp, dh0, n);
}
#endif

void check_lengths(const int64_t* lengths, int64_t B, int64_t T, const char* fn) {
    for (int64_t b = 0; b < B; ++b)
        if (lengths[b] < 0 || lengths[b] > T)
            throw std::out_of_range(std::string(fn) + ": lengths[" + std::to_string(b) + "] = " +
                                    std::to_string(lengths[b]) + " is outside [0, T=" +
                                    std::to_string(T) + "]");
}

template <typename T>
std::vector<T> transposed(const T* w, int64_t rows, int64_t cols) {
    std::vector<T> wt(rows * cols);
    for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j) wt[j * rows + i] = w[i * cols + j];
    return wt;
}

}  // namespace

std::string gru_impl() {
#if FASTATTN_X86
    if (use_avx512f()) return "avx512";
    if (use_avx2()) return "avx2";
#endif
    return "default";
}

template <typename T>
void gru_scan_fwd(const T* xp, const int64_t* lengths, const T* w_hh, const T* b_hh, const T* h0,
                  int64_t B, int64_t T_, int64_t H, T* out, int nthreads) {
    check_lengths(lengths, B, T_, "gru_scan_fwd");
    const Dims d{B, T_, H};
    const std::vector<T> wT = transposed(w_hh, 3 * H, H);
#if FASTATTN_X86
    if (use_avx512f()) return fwd_avx512(d, xp, lengths, wT.data(), b_hh, h0, out, nthreads);
    if (use_avx2()) return fwd_avx2(d, xp, lengths, wT.data(), b_hh, h0, out, nthreads);
#endif
    fwd_default(d, xp, lengths, wT.data(), b_hh, h0, out, nthreads);
}

template <typename T>
void gru_scan_bwd(const T* d_out, const T* xp, const T* out, const int64_t* lengths,
                  const T* w_hh, const T* b_hh, const T* h0, int64_t B, int64_t T_, int64_t H,
                  T* dxp, T* dhp, T* dh0, int nthreads) {
    check_lengths(lengths, B, T_, "gru_scan_bwd");
    const Dims d{B, T_, H};
    const std::vector<T> wT = transposed(w_hh, 3 * H, H);
#if FASTATTN_X86
    if (use_avx512f())
        return bwd_avx512(d, d_out, xp, out, lengths, w_hh, wT.data(), b_hh, h0, dxp, dhp, dh0,
                          nthreads);
    if (use_avx2())
        return bwd_avx2(d, d_out, xp, out, lengths, w_hh, wT.data(), b_hh, h0, dxp, dhp, dh0,
                        nthreads);
#endif
    bwd_default(d, d_out, xp, out, lengths, w_hh, wT.data(), b_hh, h0, dxp, dhp, dh0, nthreads);
}

template void gru_scan_fwd<float>(const float*, const int64_t*, const float*, const float*,
                                  const float*, int64_t, int64_t, int64_t, float*, int);
template void gru_scan_fwd<double>(const double*, const int64_t*, const double*, const double*,
                                   const double*, int64_t, int64_t, int64_t, double*, int);
template void gru_scan_bwd<float>(const float*, const float*, const float*, const int64_t*,
                                  const float*, const float*, const float*, int64_t, int64_t,
                                  int64_t, float*, float*, float*, int);
template void gru_scan_bwd<double>(const double*, const double*, const double*, const int64_t*,
                                   const double*, const double*, const double*, int64_t,
                                   int64_t, int64_t, double*, double*, double*, int);

}  // namespace fastattn
