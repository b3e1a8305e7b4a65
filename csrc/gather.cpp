// Row gather (forward of topk_gather) and its deterministic scatter-add (backward).
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace fastattn {
namespace {

void check_indices(const int64_t* idx, const int64_t* hist_index, int64_t B, int64_t K,
                   int64_t U, int64_t L, const char* fn) {
    check_range(hist_index, B, 0, U, fn, "hist_index");
    check_range(idx, B * K, -1, L, fn, "idx");
}

// Each output element (u, l, c) belongs to exactly one task, which adds the rows that hit
// it in increasing (query, slot) order: the result is bitwise the same for every thread
// count, and no two threads write the same memory. Tasks are (history, slice of positions);
// histories are sliced only as much as needed to give every thread work (the indexed form
// is one history of N table rows, sliced into row ranges). The slots are first bucketed by
// task with a stable counting sort in (query, slot) order, so a task visits its own slots
// only (instead of scanning all B*K slots per task, a branch per slot that mispredicts).
template <typename T>
void scatter_add_impl(const T* grad, const int64_t* idx, const int64_t* hist_index, int64_t B,
                      int64_t K, int64_t Dv, int64_t U, int64_t L, T* out, int nthreads) {
    check_indices(idx, hist_index, B, K, U, L, "scatter_add_rows");
    if (B == 0 || K == 0 || Dv == 0 || L == 0) return;
    const HistoryGroups g = group_by_history(hist_index, B, U);
    // Slices of a power-of-two length, so that bucketing a slot is a shift, not a division.
    const int64_t want = std::min<int64_t>(L, std::max<int64_t>(1, (4 * nthreads + U - 1) / U));
    int shift = 0;
    while ((int64_t(1) << shift) * want < L) ++shift;
    const int64_t slices = ((L - 1) >> shift) + 1;
    const int64_t ntasks = U * slices;
    std::vector<int64_t> first(ntasks + 1, 0);  // bucket t: slots[first[t] .. first[t + 1])
    for (int64_t u = 0; u < U; ++u) {
        for (int64_t i = g.start[u]; i < g.start[u + 1]; ++i) {
            const int64_t* ib = idx + g.order[i] * K;
            for (int64_t j = 0; j < K; ++j)
                if (ib[j] >= 0) ++first[u * slices + (ib[j] >> shift) + 1];
        }
    }
    for (int64_t t = 0; t < ntasks; ++t) first[t + 1] += first[t];
    std::vector<int64_t> slots(first[ntasks]);
    {
        std::vector<int64_t> next(first.begin(), first.end() - 1);
        for (int64_t u = 0; u < U; ++u) {
            for (int64_t i = g.start[u]; i < g.start[u + 1]; ++i) {
                const int64_t r0 = g.order[i] * K;
                for (int64_t j = 0; j < K; ++j) {
                    const int64_t l = idx[r0 + j];
                    if (l >= 0) slots[next[u * slices + (l >> shift)]++] = r0 + j;
                }
            }
        }
    }
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t task = 0; task < ntasks; ++task) {
        const int64_t u = task / slices;
        for (int64_t s = first[task]; s < first[task + 1]; ++s) {
            const int64_t r = slots[s];
            T* __restrict dst = out + (u * L + idx[r]) * Dv;
            const T* __restrict src = grad + r * Dv;
#pragma omp simd
            for (int64_t c = 0; c < Dv; ++c) dst[c] += src[c];
        }
    }
}

}  // namespace

void gather_rows(const uint8_t* values, const int64_t* idx, const int64_t* hist_index,
                 int64_t U, int64_t L, int64_t R, int64_t B, int64_t K, uint8_t* out,
                 int nthreads) {
    check_indices(idx, hist_index, B, K, U, L, "gather_rows");
    if (R == 0) return;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < B * K; ++r) {
        const int64_t l = idx[r];
        uint8_t* dst = out + r * R;
        if (l < 0) {
            std::memset(dst, 0, R);
        } else {
            std::memcpy(dst, values + (hist_index[r / K] * L + l) * R, R);
        }
    }
}

void scatter_add_rows(const float* grad, const int64_t* idx, const int64_t* hist_index,
                      int64_t B, int64_t K, int64_t Dv, int64_t U, int64_t L, float* out,
                      int nthreads) {
    scatter_add_impl(grad, idx, hist_index, B, K, Dv, U, L, out, nthreads);
}

void scatter_add_rows(const double* grad, const int64_t* idx, const int64_t* hist_index,
                      int64_t B, int64_t K, int64_t Dv, int64_t U, int64_t L, double* out,
                      int nthreads) {
    scatter_add_impl(grad, idx, hist_index, B, K, Dv, U, L, out, nthreads);
}

// SIM-hard's category search: one scan from each query's most recent position back,
// stopping after n hits (a masked top-k over every position costs ~10x more).
void last_matches(const int64_t* values, const int64_t* lengths, const int64_t* target,
                  const int64_t* hist_index, int64_t U, int64_t L, int64_t B, int64_t n,
                  int64_t* out, int nthreads) {
    check_range(hist_index, B, 0, U, "last_matches", "hist_index");
    check_range(lengths, U, 0, L + 1, "last_matches", "lengths");
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < B; ++b) {
        const int64_t h = hist_index[b];
        const int64_t* row = values + h * L;
        const int64_t t = target[b];
        int64_t* o = out + b * n;
        int64_t j = 0;
        for (int64_t l = lengths[h] - 1; l >= 0 && j < n; --l)
            if (row[l] == t) o[j++] = l;
        for (; j < n; ++j) o[j] = -1;
    }
}

}  // namespace fastattn
