// Masked mean pooling of token states (BAHE's atomic behaviour encoding) and its backward.
// One task per row n: the row's sum is accumulated in token order by one thread, so the
// result is bitwise the same for every thread count, and masked tokens are never read.
// Small calls (a training step's few thousand behaviours) run on the calling thread: waking
// an OpenMP team costs more than the work there, and far more on a loaded machine.
#include <omp.h>

#include <cstring>

#include "kernels.h"

namespace fastattn {
namespace {

inline int64_t count_valid(const uint8_t* m, int64_t K) {
    int64_t c = 0;
    for (int64_t k = 0; k < K; ++k) c += m[k] != 0;
    return c;
}

constexpr int64_t kParallelMin = int64_t(1) << 16;  // elements of x / dx

template <typename T>
void fwd_impl(const T* x, const uint8_t* mask, int64_t N, int64_t K, int64_t D, T* out,
              int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (N * K * D >= kParallelMin)
    for (int64_t n = 0; n < N; ++n) {
        T* __restrict o = out + n * D;
        std::memset(o, 0, sizeof(T) * D);
        const uint8_t* m = mask + n * K;
        const int64_t c = count_valid(m, K);
        for (int64_t k = 0; k < K; ++k) {
            if (!m[k]) continue;
            const T* __restrict src = x + (n * K + k) * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) o[d] += src[d];
        }
        if (c > 1) {
            const T div = static_cast<T>(c);
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) o[d] /= div;
        }
    }
}

template <typename T>
void bwd_impl(const T* grad, const uint8_t* mask, int64_t N, int64_t K, int64_t D, T* dx,
              int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (N * K * D >= kParallelMin)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t* m = mask + n * K;
        const int64_t c = count_valid(m, K);
        const T div = static_cast<T>(c > 1 ? c : 1);
        const T* __restrict g = grad + n * D;
        for (int64_t k = 0; k < K; ++k) {
            T* __restrict dst = dx + (n * K + k) * D;
            if (!m[k]) {
                std::memset(dst, 0, sizeof(T) * D);
                continue;
            }
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) dst[d] = g[d] / div;
        }
    }
}

}  // namespace

void masked_mean_fwd(const float* x, const uint8_t* mask, int64_t N, int64_t K, int64_t D,
                     float* out, int nthreads) {
    fwd_impl(x, mask, N, K, D, out, nthreads);
}
void masked_mean_fwd(const double* x, const uint8_t* mask, int64_t N, int64_t K, int64_t D,
                     double* out, int nthreads) {
    fwd_impl(x, mask, N, K, D, out, nthreads);
}
void masked_mean_bwd(const float* grad, const uint8_t* mask, int64_t N, int64_t K, int64_t D,
                     float* dx, int nthreads) {
    bwd_impl(grad, mask, N, K, D, dx, nthreads);
}
void masked_mean_bwd(const double* grad, const uint8_t* mask, int64_t N, int64_t K, int64_t D,
                     double* dx, int nthreads) {
    bwd_impl(grad, mask, N, K, D, dx, nthreads);
}

}  // namespace fastattn
