// Raw-pointer entry points of the fused MIMN kernels (DESIGN.md §5, docs/kernel_api.md "MIMN").
// bindings.cpp checks dtypes and shapes; these functions trust them. Templates are
// instantiated for float and double in mimn.cpp.
#pragma once

#include <cstdint>
#include <memory>

namespace fastattn {

// Sizes of one MIMN call. P = 4D + 2 head outputs; miu_k = 0 disables the MIU.
struct MimnDims {
    int64_t B = 0, T = 0, Dx = 0, D = 0, m = 0, Hc = 0, Hs = 0;
    bool has_mur = false;
    int64_t miu_k = 0;
};

// The twelve parameter arrays in the order of docs/kernel_api.md (torch module layouts).
// Absent modules (no MUR, no MIU) may hold null or empty pointers: they are not read.
template <typename T>
struct MimnWeights {
    const T *ctrl_w_ih, *ctrl_w_hh, *ctrl_b_ih, *ctrl_b_hh, *heads_w, *heads_b, *mur_w, *mur_b,
        *miu_w_ih, *miu_w_hh, *miu_b_ih, *miu_b_hh;
};

// Parameter gradients, same order. miu_gather_gru_bwd: partial sums (B, *param.shape),
// the sums of its row tiles (of min(16, B) rows) in the first slots, one per tile, zeros in
// the rest; the caller sums over the first axis. mimn_scan_bwd: the totals (*param.shape),
// its tiles' partial sums added in tile order. Absent parameters are untouched.
template <typename T>
struct MimnWeightGrads {
    T *ctrl_w_ih, *ctrl_w_hh, *ctrl_b_ih, *ctrl_b_hh, *heads_w, *heads_b, *mur_w, *mur_b,
        *miu_w_ih, *miu_w_hh, *miu_b_ih, *miu_b_hh;
};

// A batch of MIMN states h (B, Hc), r (B, D), M (B, m, D), g (B, m), S (B, m, Hs); for
// checkpoints every array has an extra chunk axis after B. U is T or const T.
template <typename U>
struct MimnStates {
    U *h, *r, *M, *g, *S;
};

// Steps 3-6 for one step: M (B, m, D), g (B, m), head (B, P) -> read (B, D), M_out, g_out, wr.
template <typename T>
void ntm_read_write_fwd(const MimnDims& d, const T* M, const T* g, const T* head,
                        const T* mur_w, const T* mur_b, T* read, T* M_out, T* g_out, T* wr,
                        int nthreads);
// Its backward; d_wr may be null (no gradient on the read weights). Writes dM, dg, dhead and
// (with MUR) the per-row dmur_w_rows (B, m, m), dmur_b_rows (B, m).
template <typename T>
void ntm_read_write_bwd(const MimnDims& d, const T* d_read, const T* d_M_out, const T* d_g_out,
                        const T* d_wr, const T* M, const T* g, const T* head, const T* mur_w,
                        const T* mur_b, T* dM, T* dg, T* dhead, T* dmur_w_rows,
                        T* dmur_b_rows, int nthreads);

// Step 7 for one step: M (B, m, D) after the write, x (B, Dx), S (B, m, Hs), wr (B, m).
template <typename T>
void miu_gather_gru_fwd(const MimnDims& d, const T* M, const T* x, const T* S, const T* wr,
                        const T* w_ih, const T* w_hh, const T* b_ih, const T* b_hh, T* S_out,
                        int nthreads);
template <typename T>
void miu_gather_gru_bwd(const MimnDims& d, const T* d_S_out, const T* M, const T* x,
                        const T* S, const T* wr, const T* w_ih, const T* w_hh, const T* b_ih,
                        const T* b_hh, T* dM, T* dx, T* dS, T* dw_ih_rows, T* dw_hh_rows,
                        T* db_ih_rows, T* db_hh_rows, int nthreads);

// Steps 1-7 over all T steps. x (B, T, Dx), lengths (B,) in [0, T]. Writes reads (B, T, D),
// the final state and the checkpoints (the state at the start of every chunk, NC chunks).
// tapes: null, or (B, T, mimn_tape_floats(d)) for every valid step's intermediates, which
// the backward then reads instead of recomputing them (padded steps are not written).
template <typename T>
void mimn_scan_fwd(const MimnDims& d, const T* x, const int64_t* lengths,
                   const MimnWeights<T>& w, MimnStates<const T> state0, int64_t chunk,
                   T* reads, MimnStates<T> final_state, MimnStates<T> ck, T* tapes,
                   int nthreads);
// Floats per step of the forward's stored tapes.
int64_t mimn_tape_floats(const MimnDims& d);
// Backpropagation through time by chunked recomputation from the checkpoints (with the
// forward's tapes, non-null: only the memory's write is recomputed). d_reads may be null
// (no gradient on the reads); dw receives the totals.
template <typename T>
void mimn_scan_bwd(const MimnDims& d, const T* d_reads, MimnStates<const T> d_final,
                   const T* x, const int64_t* lengths, const MimnWeights<T>& w, int64_t chunk,
                   MimnStates<const T> ck, const T* tapes, T* dx, MimnStates<T> d_state0,
                   const MimnWeightGrads<T>& dw_rows, int nthreads);

// The serving update: the twelve parameters copied and packed once (for ops.mimn.bind_step),
// then step() runs one valid MIMN step for each of B rows: x (B, Dx), state s (B, ...) ->
// reads (B, D), out (B, ...) (out must not alias s). d.B and d.T are not used.
template <typename T>
class MimnStepper {
   public:
    MimnStepper(const MimnDims& d, const MimnWeights<T>& w);
    ~MimnStepper();
    MimnStepper(const MimnStepper&) = delete;
    MimnStepper& operator=(const MimnStepper&) = delete;
    const MimnDims& dims() const { return d_; }
    void step(int64_t B, const T* x, MimnStates<const T> s, T* reads, MimnStates<T> out,
              int nthreads) const;

   private:
    struct Impl;
    MimnDims d_;
    std::unique_ptr<Impl> impl_;
};

}  // namespace fastattn
