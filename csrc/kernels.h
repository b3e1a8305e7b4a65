// Raw-pointer entry points of the CPU kernels. bindings.cpp checks dtypes, shapes and
// contiguity before calling them; the kernels check index values (they come from Python
// and would otherwise address memory out of bounds). All arrays are C-contiguous.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "mimn.h"  // MIMN kernels (ntm_read_write, miu_gather_gru, mimn_scan)

namespace fastattn {

// x (N, D), planes (D, NB) -> out (N, W) packed sign bits, W = ceil(NB / 64).
void simhash_sign(const float* x, const float* planes, int64_t N, int64_t D, int64_t NB,
                  int64_t* out, int nthreads);
void simhash_sign(const double* x, const double* planes, int64_t N, int64_t D, int64_t NB,
                  int64_t* out, int nthreads);
// The gathered form: out (M, W) = signatures of x[rows[i]], x (n_table, D) a table, rows (M,)
// in [0, n_table) (checked: std::out_of_range names the first bad entry).
void simhash_sign_rows(const float* x, int64_t n_table, const int64_t* rows, const float* planes,
                       int64_t M, int64_t D, int64_t NB, int64_t* out, int nthreads);
void simhash_sign_rows(const double* x, int64_t n_table, const int64_t* rows,
                       const double* planes, int64_t M, int64_t D, int64_t NB, int64_t* out,
                       int nthreads);
std::string simhash_impl();  // which ISA path simhash_sign runs

// out[n, l] = popcount(q[qi[n]] ^ k[ki[n], l]) summed over the W words; out (N, L).
void hamming_distance(const int64_t* q, const int64_t* k, const int64_t* qi, const int64_t* ki,
                      int64_t Nq, int64_t Nk, int64_t N, int64_t L, int64_t W, int32_t* out,
                      int nthreads);
// q (B, W), k (U, L, W) -> out_dist (B, topk), out_idx (B, topk): see DESIGN.md §4.
void hamming_topk(const int64_t* q, const int64_t* k, const int64_t* lengths,
                  const int64_t* hist_index, int64_t B, int64_t U, int64_t L, int64_t W,
                  int64_t topk, int32_t* out_dist, int64_t* out_idx, int nthreads);
// hamming_topk over indexed histories: position l of history u has the key k[rows[u, l]],
// k (N, W) a signature table, rows (U, L). Same output as hamming_topk on k[rows] (positions
// l, not table rows); rows at positions l >= lengths[u] are never read.
void hamming_topk_rows(const int64_t* q, const int64_t* k, const int64_t* rows,
                       const int64_t* lengths, const int64_t* hist_index, int64_t B, int64_t N,
                       int64_t U, int64_t L, int64_t W, int64_t topk, int32_t* out_dist,
                       int64_t* out_idx, int nthreads);
std::string hamming_impl();  // which ISA path the Hamming kernels run

// ids (U, L) -> the distinct ids of the valid positions in order of first occurrence
// (row-major), and hist_rows (U, L): the index of ids[u, l] among them, -1 past lengths[u].
std::vector<int64_t> unique_rows(const int64_t* ids, const int64_t* lengths, int64_t U,
                                 int64_t L, int64_t* hist_rows, int nthreads);

// values (U, L, R) bytes, idx (B, K) -> out (B, K, R); idx = -1 gives zero bytes.
// out (B, n): the n most recent positions l < lengths[h] (h = hist_index[b]) of history
// row h of values (U, L) holding target[b], most recent first, -1 after.
void last_matches(const int64_t* values, const int64_t* lengths, const int64_t* target,
                  const int64_t* hist_index, int64_t U, int64_t L, int64_t B, int64_t n,
                  int64_t* out, int nthreads);
void gather_rows(const uint8_t* values, const int64_t* idx, const int64_t* hist_index,
                 int64_t U, int64_t L, int64_t R, int64_t B, int64_t K, uint8_t* out,
                 int nthreads);
// out (U, L, Dv) += grad (B, K, Dv) scattered through idx; deterministic.
void scatter_add_rows(const float* grad, const int64_t* idx, const int64_t* hist_index,
                      int64_t B, int64_t K, int64_t Dv, int64_t U, int64_t L, float* out,
                      int nthreads);
void scatter_add_rows(const double* grad, const int64_t* idx, const int64_t* hist_index,
                      int64_t B, int64_t K, int64_t Dv, int64_t U, int64_t L, double* out,
                      int nthreads);

// Attention of q (B, H, Dh) over the rows idx (B, K) (-1 = empty) of its history
// hist_index[b] in keys (U, L, H, Dh) / values (U, L, H, Dv) -> out (B, H, Dv), lse (B, H).
void topk_attention_fwd(const float* q, const float* keys, const float* values,
                        const int64_t* idx, const int64_t* hist_index, int64_t B, int64_t H,
                        int64_t Dh, int64_t Dv, int64_t U, int64_t L, int64_t K, double scale,
                        float* out, float* lse, int nthreads);
void topk_attention_fwd(const double* q, const double* keys, const double* values,
                        const int64_t* idx, const int64_t* hist_index, int64_t B, int64_t H,
                        int64_t Dh, int64_t Dv, int64_t U, int64_t L, int64_t K, double scale,
                        double* out, double* lse, int nthreads);
// Its backward: dq (B, H, Dh) and one gradient per slot, dk_slots (B, K, H, Dh) and
// dv_slots (B, K, H, Dv) (zeros for empty slots).
void topk_attention_bwd(const float* grad_out, const float* q, const float* keys,
                        const float* values, const int64_t* idx, const int64_t* hist_index,
                        const float* out, const float* lse, int64_t B, int64_t H, int64_t Dh,
                        int64_t Dv, int64_t U, int64_t L, int64_t K, double scale, float* dq,
                        float* dk_slots, float* dv_slots, int nthreads);
void topk_attention_bwd(const double* grad_out, const double* q, const double* keys,
                        const double* values, const int64_t* idx, const int64_t* hist_index,
                        const double* out, const double* lse, int64_t B, int64_t H, int64_t Dh,
                        int64_t Dv, int64_t U, int64_t L, int64_t K, double scale, double* dq,
                        double* dk_slots, double* dv_slots, int nthreads);
std::string attention_impl();  // which ISA path the attention kernels run

// Machine-limit micro-kernel (limits.cpp): nq queries (nq, 4) against n keys in tile layout
// (n / 8 blocks of 4 x 8 words, word-major) with a running minimum only; returns the sum of
// the queries' minimum distances. nq % 4 == 0, n % 8 == 0; isa one of popcount_limit_isas().
uint64_t popcount_limit(const int64_t* keys, int64_t n, const int64_t* q, int64_t nq,
                        const std::string& isa, int nthreads);
std::vector<std::string> popcount_limit_isas();  // what this CPU runs, fastest first

// Fused varlen GRU scan, recurrence only (docs/kernel_api.md "gru_scan"). xp (B, T, 3H) is
// the input projection x W_ihᵀ + b_ih, gates (r, z, n); w_hh (3H, H), b_hh (3H,), h0 (B, H),
// lengths (B,) in [0, T] (checked: std::out_of_range) -> out (B, T, H), 0 past the length.
template <typename T>
void gru_scan_fwd(const T* xp, const int64_t* lengths, const T* w_hh, const T* b_hh, const T* h0,
                  int64_t B, int64_t T_, int64_t H, T* out, int nthreads);
// Its backward from d_out (B, T, H): dxp (B, T, 3H) = d(xp), dhp (B, T, 3H) = d(W_hh h + b_hh)
// per step (0 past the length), dh0 (B, H).
template <typename T>
void gru_scan_bwd(const T* d_out, const T* xp, const T* out, const int64_t* lengths,
                  const T* w_hh, const T* b_hh, const T* h0, int64_t B, int64_t T_, int64_t H,
                  T* dxp, T* dhp, T* dh0, int nthreads);
std::string gru_impl();  // which ISA path the GRU scan runs

// Masked mean pooling (BAHE): x (N, K, D), mask (N, K) uint8 (0/1) -> out (N, D), the mean of
// the valid tokens of each row (zeros for a row without any); masked tokens are not read.
void masked_mean_fwd(const float* x, const uint8_t* mask, int64_t N, int64_t K, int64_t D,
                     float* out, int nthreads);
void masked_mean_fwd(const double* x, const uint8_t* mask, int64_t N, int64_t K, int64_t D,
                     double* out, int nthreads);
// Its backward: dx (N, K, D) = grad[n] / max(count[n], 1) at valid tokens, zeros elsewhere.
void masked_mean_bwd(const float* grad, const uint8_t* mask, int64_t N, int64_t K, int64_t D,
                     float* dx, int nthreads);
void masked_mean_bwd(const double* grad, const uint8_t* mask, int64_t N, int64_t K, int64_t D,
                     double* dx, int nthreads);

}  // namespace fastattn
