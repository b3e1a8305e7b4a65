// fastattn._C: pybind11 bindings of the CPU kernels (calling convention: docs/kernel_api.md).
//
// Arguments are numpy arrays (zero-copy views of torch tensors). Nothing is converted or
// copied: a wrong dtype, rank or layout raises ValueError (std::invalid_argument), because
// outputs are written in place and a converted copy would silently drop the result.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cpu_features.h"
#include "kernels.h"

namespace py = pybind11;

namespace {

// The ISA path each kernel family ran, counted per call at the dispatch (reported by
// cpu_features()["ran"]): a test capped with FASTATTN_CPU_ISA checks which code ran, not only
// that the cap was read. Calls hold the GIL here (before releasing it), so no lock is needed.
enum class Family { simhash, hamming, attention, count };
const char* const kFamilyNames[] = {"simhash_sign", "hamming", "attention"};
std::vector<std::pair<std::string, int64_t>> g_ran[static_cast<int>(Family::count)];

void note_ran(Family f) {
    const std::string path = f == Family::simhash   ? fastattn::simhash_impl()
                           : f == Family::hamming   ? fastattn::hamming_impl()
                                                    : fastattn::attention_impl();
    auto& seen = g_ran[static_cast<int>(f)];
    for (auto& kv : seen)
        if (kv.first == path) {
            ++kv.second;
            return;
        }
    seen.emplace_back(path, 1);
}

enum class Kind { i64, i32, u8, f32, f64 };

const char* kind_name(Kind k) {
    switch (k) {
        case Kind::i64: return "int64";
        case Kind::i32: return "int32";
        case Kind::u8: return "uint8";
        case Kind::f32: return "float32";
        case Kind::f64: return "float64";
    }
    return "?";
}

bool has_kind(const py::array& a, Kind k) {
    const char c = a.dtype().kind();
    const auto size = a.dtype().itemsize();
    switch (k) {
        case Kind::i64: return c == 'i' && size == 8;
        case Kind::i32: return c == 'i' && size == 4;
        case Kind::u8: return c == 'u' && size == 1;
        case Kind::f32: return c == 'f' && size == 4;
        case Kind::f64: return c == 'f' && size == 8;
    }
    return false;
}

[[noreturn]] void fail(const char* fn, const std::string& msg) {
    throw std::invalid_argument(std::string(fn) + ": " + msg);
}

std::string shape_of(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + (a.ndim() == 1 ? ",)" : ")");
}

// Checks dtype, rank, C-contiguity (and writability for outputs); returns the shape.
std::vector<int64_t> check(const py::array& a, const char* fn, const char* name, Kind kind,
                           int ndim, bool output = false) {
    if (!has_kind(a, kind))
        fail(fn, std::string(name) + " must be " + kind_name(kind) + ", got " +
                     std::string(py::str(a.dtype())));
    if (a.ndim() != ndim)
        fail(fn, std::string(name) + " must have " + std::to_string(ndim) + " dims, got shape " +
                     shape_of(a));
    if (!(a.flags() & py::array::c_style))
        fail(fn, std::string(name) + " must be C-contiguous");
    if (output && !a.writeable()) fail(fn, std::string(name) + " must be writeable");
    return std::vector<int64_t>(a.shape(), a.shape() + ndim);
}

void expect(bool ok, const char* fn, const std::string& msg) {
    if (!ok) fail(fn, msg);
}

int check_threads(int nthreads, const char* fn) {
    expect(nthreads >= 1, fn, "nthreads must be >= 1, got " + std::to_string(nthreads));
    return nthreads;
}

template <typename T>
T* ptr(py::array& a) {
    return static_cast<T*>(a.mutable_data());
}
template <typename T>
const T* cptr(const py::array& a) {
    return static_cast<const T*>(a.data());
}

void simhash_sign(const py::array& x, const py::array& planes, py::array& out, int nthreads) {
    const char* fn = "simhash_sign";
    check_threads(nthreads, fn);
    const bool f64 = has_kind(x, Kind::f64);
    const Kind kind = f64 ? Kind::f64 : Kind::f32;
    const auto xs = check(x, fn, "x", kind, 2);
    const auto ps = check(planes, fn, "planes (same dtype as x)", kind, 2);
    const auto os = check(out, fn, "out", Kind::i64, 2, true);
    expect(ps[0] == xs[1], fn, "planes " + shape_of(planes) + " must be (D, NB) with D = " +
                                   std::to_string(xs[1]) + " from x " + shape_of(x));
    const int64_t W = (ps[1] + 63) / 64;
    expect(os[0] == xs[0] && os[1] == W, fn,
           "out must be (N, W) = (" + std::to_string(xs[0]) + ", " + std::to_string(W) +
               "), got " + shape_of(out));
    note_ran(Family::simhash);
    py::gil_scoped_release release;
    if (f64) {
        fastattn::simhash_sign(cptr<double>(x), cptr<double>(planes), xs[0], xs[1], ps[1],
                               ptr<int64_t>(out), nthreads);
    } else {
        fastattn::simhash_sign(cptr<float>(x), cptr<float>(planes), xs[0], xs[1], ps[1],
                               ptr<int64_t>(out), nthreads);
    }
}

// The gathered form: out (M, W) = signatures of x[rows] for a table x (N, D), rows (M,).
void simhash_sign_rows(const py::array& x, const py::array& planes, const py::array& rows,
                       py::array& out, int nthreads) {
    const char* fn = "simhash_sign_rows";
    check_threads(nthreads, fn);
    const bool f64 = has_kind(x, Kind::f64);
    const Kind kind = f64 ? Kind::f64 : Kind::f32;
    const auto xs = check(x, fn, "x", kind, 2);
    const auto ps = check(planes, fn, "planes (same dtype as x)", kind, 2);
    const auto rs = check(rows, fn, "rows", Kind::i64, 1);
    const auto os = check(out, fn, "out", Kind::i64, 2, true);
    expect(ps[0] == xs[1], fn, "planes " + shape_of(planes) + " must be (D, NB) with D = " +
                                   std::to_string(xs[1]) + " from x " + shape_of(x));
    const int64_t W = (ps[1] + 63) / 64;
    expect(os[0] == rs[0] && os[1] == W, fn,
           "out must be (M, W) = (" + std::to_string(rs[0]) + ", " + std::to_string(W) +
               "), got " + shape_of(out));
    note_ran(Family::simhash);
    py::gil_scoped_release release;
    if (f64) {
        fastattn::simhash_sign_rows(cptr<double>(x), xs[0], cptr<int64_t>(rows),
                                    cptr<double>(planes), rs[0], xs[1], ps[1],
                                    ptr<int64_t>(out), nthreads);
    } else {
        fastattn::simhash_sign_rows(cptr<float>(x), xs[0], cptr<int64_t>(rows),
                                    cptr<float>(planes), rs[0], xs[1], ps[1], ptr<int64_t>(out),
                                    nthreads);
    }
}

void hamming_distance(const py::array& q, const py::array& k, const py::array& qi,
                      const py::array& ki, py::array& out, int nthreads) {
    const char* fn = "hamming_distance";
    check_threads(nthreads, fn);
    const auto qs = check(q, fn, "q", Kind::i64, 2);
    const auto ks = check(k, fn, "k", Kind::i64, 3);
    const auto qis = check(qi, fn, "qi", Kind::i64, 1);
    const auto kis = check(ki, fn, "ki", Kind::i64, 1);
    const auto os = check(out, fn, "out", Kind::i32, 2, true);
    expect(qs[1] == ks[2], fn, "q " + shape_of(q) + " and k " + shape_of(k) +
                                   " must have the same number of words W");
    expect(qis[0] == kis[0], fn, "qi and ki must have the same length");
    expect(os[0] == qis[0] && os[1] == ks[1], fn,
           "out must be (N, L) = (" + std::to_string(qis[0]) + ", " + std::to_string(ks[1]) +
               "), got " + shape_of(out));
    note_ran(Family::hamming);
    py::gil_scoped_release release;
    fastattn::hamming_distance(cptr<int64_t>(q), cptr<int64_t>(k), cptr<int64_t>(qi),
                               cptr<int64_t>(ki), qs[0], ks[0], qis[0], ks[1], qs[1],
                               ptr<int32_t>(out), nthreads);
}

// Checks shared by hamming_topk and hamming_topk_rows, with the shapes already read: the
// keys' word count kw, U histories of L positions, lengths (U,), hist_index (B,) and the
// (B, topk) outputs.
void check_topk_args(const char* fn, const py::array& q, const py::array& k, int64_t kw,
                     int64_t U, int64_t L, int64_t topk, const std::vector<int64_t>& ls,
                     const std::vector<int64_t>& hs, const std::vector<int64_t>& ds,
                     const std::vector<int64_t>& is, const py::array& out_dist,
                     const py::array& out_idx) {
    const int64_t B = q.shape(0), W = q.shape(1);
    expect(kw == W, fn, "q " + shape_of(q) + " and k " + shape_of(k) +
                            " must have the same number of words W");
    expect(ls[0] == U, fn, "lengths must be (U,) = (" + std::to_string(U) + ",)");
    expect(hs[0] == B, fn, "hist_index must be (B,) = (" + std::to_string(B) + ",)");
    expect(topk >= 0, fn, "topk must be >= 0, got " + std::to_string(topk));
    expect(L < (int64_t(1) << 31), fn, "history length L must be < 2**31");
    const std::string want = "(" + std::to_string(B) + ", " + std::to_string(topk) + ")";
    expect(ds[0] == B && ds[1] == topk, fn, "out_dist must be " + want + ", got " + shape_of(out_dist));
    expect(is[0] == B && is[1] == topk, fn, "out_idx must be " + want + ", got " + shape_of(out_idx));
}

void hamming_topk(const py::array& q, const py::array& k, const py::array& lengths,
                  const py::array& hist_index, int64_t topk, py::array& out_dist,
                  py::array& out_idx, int nthreads) {
    const char* fn = "hamming_topk";
    check_threads(nthreads, fn);
    const auto qs = check(q, fn, "q", Kind::i64, 2);
    const auto ks = check(k, fn, "k", Kind::i64, 3);
    const auto ls = check(lengths, fn, "lengths", Kind::i64, 1);
    const auto hs = check(hist_index, fn, "hist_index", Kind::i64, 1);
    const auto ds = check(out_dist, fn, "out_dist", Kind::i32, 2, true);
    const auto is = check(out_idx, fn, "out_idx", Kind::i64, 2, true);
    const int64_t B = qs[0], W = qs[1], U = ks[0], L = ks[1];
    check_topk_args(fn, q, k, ks[2], U, L, topk, ls, hs, ds, is, out_dist, out_idx);
    note_ran(Family::hamming);
    py::gil_scoped_release release;
    fastattn::hamming_topk(cptr<int64_t>(q), cptr<int64_t>(k), cptr<int64_t>(lengths),
                           cptr<int64_t>(hist_index), B, U, L, W, topk, ptr<int32_t>(out_dist),
                           ptr<int64_t>(out_idx), nthreads);
}

void hamming_topk_rows(const py::array& q, const py::array& k, const py::array& rows,
                       const py::array& lengths, const py::array& hist_index, int64_t topk,
                       py::array& out_dist, py::array& out_idx, int nthreads) {
    const char* fn = "hamming_topk_rows";
    check_threads(nthreads, fn);
    const auto qs = check(q, fn, "q", Kind::i64, 2);
    const auto ks = check(k, fn, "k", Kind::i64, 2);
    const auto rs = check(rows, fn, "rows", Kind::i64, 2);
    const auto ls = check(lengths, fn, "lengths", Kind::i64, 1);
    const auto hs = check(hist_index, fn, "hist_index", Kind::i64, 1);
    const auto ds = check(out_dist, fn, "out_dist", Kind::i32, 2, true);
    const auto is = check(out_idx, fn, "out_idx", Kind::i64, 2, true);
    const int64_t B = qs[0], W = qs[1], N = ks[0], U = rs[0], L = rs[1];
    check_topk_args(fn, q, k, ks[1], U, L, topk, ls, hs, ds, is, out_dist, out_idx);
    note_ran(Family::hamming);
    py::gil_scoped_release release;
    fastattn::hamming_topk_rows(cptr<int64_t>(q), cptr<int64_t>(k), cptr<int64_t>(rows),
                                cptr<int64_t>(lengths), cptr<int64_t>(hist_index), B, N, U, L, W,
                                topk, ptr<int32_t>(out_dist), ptr<int64_t>(out_idx), nthreads);
}

py::array_t<int64_t> unique_rows(const py::array& ids, const py::array& lengths,
                                 py::array& hist_rows, int nthreads) {
    const char* fn = "unique_rows";
    check_threads(nthreads, fn);
    const auto is = check(ids, fn, "ids", Kind::i64, 2);
    const auto ls = check(lengths, fn, "lengths", Kind::i64, 1);
    const auto hs = check(hist_rows, fn, "hist_rows", Kind::i64, 2, true);
    const int64_t U = is[0], L = is[1];
    expect(ls[0] == U, fn, "lengths must be (U,) = (" + std::to_string(U) + ",)");
    expect(hs[0] == U && hs[1] == L, fn, "hist_rows must be (U, L) = " + shape_of(ids) +
                                             ", got " + shape_of(hist_rows));
    std::vector<int64_t> unique_ids;
    {
        py::gil_scoped_release release;
        unique_ids = fastattn::unique_rows(cptr<int64_t>(ids), cptr<int64_t>(lengths), U, L,
                                           ptr<int64_t>(hist_rows), nthreads);
    }
    // The array takes over the vector's buffer (no copy); the capsule frees it.
    auto* owned = new std::vector<int64_t>(std::move(unique_ids));
    py::capsule free_when_done(owned, [](void* p) { delete static_cast<std::vector<int64_t>*>(p); });
    return py::array_t<int64_t>(static_cast<py::ssize_t>(owned->size()), owned->data(), free_when_done);
}

void last_matches(const py::array& values, const py::array& lengths, const py::array& target,
                  const py::array& hist_index, py::array& out, int nthreads) {
    const char* fn = "last_matches";
    check_threads(nthreads, fn);
    const auto vs = check(values, fn, "values", Kind::i64, 2);
    const auto ls = check(lengths, fn, "lengths", Kind::i64, 1);
    const auto ts = check(target, fn, "target", Kind::i64, 1);
    const auto hs = check(hist_index, fn, "hist_index", Kind::i64, 1);
    const auto os = check(out, fn, "out", Kind::i64, 2, true);
    expect(ls[0] == vs[0], fn, "lengths must be (U,) with U = values.shape[0]");
    expect(hs[0] == ts[0] && os[0] == ts[0], fn,
           "target, hist_index and out must have B = target.shape[0] rows");
    py::gil_scoped_release release;
    fastattn::last_matches(cptr<int64_t>(values), cptr<int64_t>(lengths), cptr<int64_t>(target),
                           cptr<int64_t>(hist_index), vs[0], vs[1], ts[0], os[1],
                           ptr<int64_t>(out), nthreads);
}

void gather_rows(const py::array& values, const py::array& idx, const py::array& hist_index,
                 py::array& out, int nthreads) {
    const char* fn = "gather_rows";
    check_threads(nthreads, fn);
    const auto vs = check(values, fn, "values", Kind::u8, 3);
    const auto is = check(idx, fn, "idx", Kind::i64, 2);
    const auto hs = check(hist_index, fn, "hist_index", Kind::i64, 1);
    const auto os = check(out, fn, "out", Kind::u8, 3, true);
    expect(hs[0] == is[0], fn, "hist_index must be (B,) with B = idx.shape[0]");
    expect(os[0] == is[0] && os[1] == is[1] && os[2] == vs[2], fn,
           "out must be (B, K, R) = (" + std::to_string(is[0]) + ", " + std::to_string(is[1]) +
               ", " + std::to_string(vs[2]) + "), got " + shape_of(out));
    py::gil_scoped_release release;
    fastattn::gather_rows(cptr<uint8_t>(values), cptr<int64_t>(idx), cptr<int64_t>(hist_index),
                          vs[0], vs[1], vs[2], is[0], is[1], ptr<uint8_t>(out), nthreads);
}

void scatter_add_rows(const py::array& grad, const py::array& idx, const py::array& hist_index,
                      py::array& out, int nthreads) {
    const char* fn = "scatter_add_rows";
    check_threads(nthreads, fn);
    const bool f64 = has_kind(grad, Kind::f64);
    const Kind kind = f64 ? Kind::f64 : Kind::f32;
    const auto gs = check(grad, fn, "grad", kind, 3);
    const auto is = check(idx, fn, "idx", Kind::i64, 2);
    const auto hs = check(hist_index, fn, "hist_index", Kind::i64, 1);
    const auto os = check(out, fn, "out (same dtype as grad)", kind, 3, true);
    expect(is[0] == gs[0] && is[1] == gs[1], fn, "idx must be (B, K) = grad.shape[:2]");
    expect(hs[0] == gs[0], fn, "hist_index must be (B,) with B = grad.shape[0]");
    expect(os[2] == gs[2], fn, "out must be (U, L, Dv) with Dv = grad.shape[2]");
    py::gil_scoped_release release;
    if (f64) {
        fastattn::scatter_add_rows(cptr<double>(grad), cptr<int64_t>(idx), cptr<int64_t>(hist_index),
                                   gs[0], gs[1], gs[2], os[0], os[1], ptr<double>(out), nthreads);
    } else {
        fastattn::scatter_add_rows(cptr<float>(grad), cptr<int64_t>(idx), cptr<int64_t>(hist_index),
                                   gs[0], gs[1], gs[2], os[0], os[1], ptr<float>(out), nthreads);
    }
}

// Dimensions of a topk_attention call, checked once for forward and backward.
struct AttnDims {
    bool f64;
    int64_t B, H, Dh, Dv, U, L, K;
};

AttnDims check_attention(const char* fn, const py::array& q, const py::array& keys,
                         const py::array& values, const py::array& idx,
                         const py::array& hist_index) {
    AttnDims d{};
    d.f64 = has_kind(q, Kind::f64);
    const Kind kind = d.f64 ? Kind::f64 : Kind::f32;
    const auto qs = check(q, fn, "q", kind, 3);
    const auto ks = check(keys, fn, "keys (same dtype as q)", kind, 4);
    const auto vs = check(values, fn, "values (same dtype as q)", kind, 4);
    const auto is = check(idx, fn, "idx", Kind::i64, 2);
    const auto hs = check(hist_index, fn, "hist_index", Kind::i64, 1);
    d.B = qs[0], d.H = qs[1], d.Dh = qs[2], d.U = ks[0], d.L = ks[1], d.K = is[1], d.Dv = vs[3];
    expect(ks[2] == d.H && ks[3] == d.Dh, fn,
           "keys " + shape_of(keys) + " must be (U, L, H, Dh) with H, Dh from q " + shape_of(q));
    expect(vs[0] == d.U && vs[1] == d.L && vs[2] == d.H, fn,
           "values " + shape_of(values) + " must be (U, L, H, Dv) with U, L, H from keys " +
               shape_of(keys));
    expect(is[0] == d.B, fn, "idx must be (B, K) with B = q.shape[0], got " + shape_of(idx));
    expect(hs[0] == d.B, fn, "hist_index must be (B,) with B = q.shape[0]");
    return d;
}

std::string dims(std::initializer_list<int64_t> s) {
    std::string r = "(";
    for (auto it = s.begin(); it != s.end(); ++it) r += (it == s.begin() ? "" : ", ") + std::to_string(*it);
    return r + ")";
}

void check_shape(const std::vector<int64_t>& got, std::initializer_list<int64_t> want,
                 const char* fn, const char* name, const py::array& a) {
    expect(std::equal(got.begin(), got.end(), want.begin(), want.end()), fn,
           std::string(name) + " must be " + dims(want) + ", got " + shape_of(a));
}

void topk_attention_fwd(const py::array& q, const py::array& keys, const py::array& values,
                        const py::array& idx, const py::array& hist_index, double scale,
                        py::array& out, py::array& lse, int nthreads) {
    const char* fn = "topk_attention_fwd";
    check_threads(nthreads, fn);
    const AttnDims d = check_attention(fn, q, keys, values, idx, hist_index);
    const Kind kind = d.f64 ? Kind::f64 : Kind::f32;
    check_shape(check(out, fn, "out (same dtype as q)", kind, 3, true), {d.B, d.H, d.Dv}, fn, "out", out);
    check_shape(check(lse, fn, "lse (same dtype as q)", kind, 2, true), {d.B, d.H}, fn, "lse", lse);
    note_ran(Family::attention);
    py::gil_scoped_release release;
    if (d.f64) {
        fastattn::topk_attention_fwd(cptr<double>(q), cptr<double>(keys), cptr<double>(values),
                                     cptr<int64_t>(idx), cptr<int64_t>(hist_index), d.B, d.H,
                                     d.Dh, d.Dv, d.U, d.L, d.K, scale, ptr<double>(out),
                                     ptr<double>(lse), nthreads);
    } else {
        fastattn::topk_attention_fwd(cptr<float>(q), cptr<float>(keys), cptr<float>(values),
                                     cptr<int64_t>(idx), cptr<int64_t>(hist_index), d.B, d.H,
                                     d.Dh, d.Dv, d.U, d.L, d.K, scale, ptr<float>(out),
                                     ptr<float>(lse), nthreads);
    }
}

void topk_attention_bwd(const py::array& grad_out, const py::array& q, const py::array& keys,
                        const py::array& values, const py::array& idx,
                        const py::array& hist_index, const py::array& out, const py::array& lse,
                        double scale, py::array& dq, py::array& dk_slots, py::array& dv_slots,
                        int nthreads) {
    const char* fn = "topk_attention_bwd";
    check_threads(nthreads, fn);
    const AttnDims d = check_attention(fn, q, keys, values, idx, hist_index);
    const Kind kind = d.f64 ? Kind::f64 : Kind::f32;
    check_shape(check(grad_out, fn, "grad_out (same dtype as q)", kind, 3), {d.B, d.H, d.Dv}, fn,
                "grad_out", grad_out);
    check_shape(check(out, fn, "out (same dtype as q)", kind, 3), {d.B, d.H, d.Dv}, fn, "out", out);
    check_shape(check(lse, fn, "lse (same dtype as q)", kind, 2), {d.B, d.H}, fn, "lse", lse);
    check_shape(check(dq, fn, "dq (same dtype as q)", kind, 3, true), {d.B, d.H, d.Dh}, fn, "dq", dq);
    check_shape(check(dk_slots, fn, "dk_slots (same dtype as q)", kind, 4, true),
                {d.B, d.K, d.H, d.Dh}, fn, "dk_slots", dk_slots);
    check_shape(check(dv_slots, fn, "dv_slots (same dtype as q)", kind, 4, true),
                {d.B, d.K, d.H, d.Dv}, fn, "dv_slots", dv_slots);
    note_ran(Family::attention);
    py::gil_scoped_release release;
    if (d.f64) {
        fastattn::topk_attention_bwd(cptr<double>(grad_out), cptr<double>(q), cptr<double>(keys),
                                     cptr<double>(values), cptr<int64_t>(idx),
                                     cptr<int64_t>(hist_index), cptr<double>(out),
                                     cptr<double>(lse), d.B, d.H, d.Dh, d.Dv, d.U, d.L, d.K,
                                     scale, ptr<double>(dq), ptr<double>(dk_slots),
                                     ptr<double>(dv_slots), nthreads);
    } else {
        fastattn::topk_attention_bwd(cptr<float>(grad_out), cptr<float>(q), cptr<float>(keys),
                                     cptr<float>(values), cptr<int64_t>(idx),
                                     cptr<int64_t>(hist_index), cptr<float>(out),
                                     cptr<float>(lse), d.B, d.H, d.Dh, d.Dv, d.U, d.L, d.K,
                                     scale, ptr<float>(dq), ptr<float>(dk_slots),
                                     ptr<float>(dv_slots), nthreads);
    }
}

// ----------------------------------------------------------------------------- MIMN
// docs/kernel_api.md "MIMN". Every float array of one call has the dtype of the first input;
// the twelve parameter arrays are checked against the sizes read off x / M / S / heads_w
// (the MUR and MIU ones only when present: otherwise they are not read).

using Shape = std::vector<int64_t>;

void need(const py::array& a, const char* fn, const char* name, Kind kind, const Shape& want,
          bool output = false) {
    const auto s = check(a, fn, name, kind, static_cast<int>(want.size()), output);
    if (s != want) {
        std::string w = "(";
        for (size_t i = 0; i < want.size(); ++i) w += (i ? ", " : "") + std::to_string(want[i]);
        fail(fn, std::string(name) + " must be " + w + (want.size() == 1 ? ",)" : ")") +
                     ", got " + shape_of(a));
    }
}
Shape rows(int64_t B, Shape s) {
    s.insert(s.begin(), B);
    return s;
}

using MimnParamArrays = std::array<const py::array*, 12>;
const char* const kMimnParam[12] = {"ctrl_w_ih", "ctrl_w_hh", "ctrl_b_ih", "ctrl_b_hh",
                                    "heads_w",   "heads_b",   "mur_w",     "mur_b",
                                    "miu_w_ih",  "miu_w_hh",  "miu_b_ih",  "miu_b_hh"};

bool mimn_param_present(int i, const fastattn::MimnDims& d) {
    return i < 6 || (i < 8 ? d.has_mur : d.miu_k >= 1);
}
Shape mimn_param_shape(int i, const fastattn::MimnDims& d) {
    const int64_t Hc = d.Hc, Hs = d.Hs, P = 4 * d.D + 2;
    const Shape s[12] = {{3 * Hc, d.Dx + d.D}, {3 * Hc, Hc}, {3 * Hc}, {3 * Hc}, {P, Hc}, {P},
                         {d.m, d.m},           {d.m},        {3 * Hs, d.D + d.Dx},
                         {3 * Hs, Hs},         {3 * Hs},     {3 * Hs}};
    return s[i];
}
// Parameters (grads 0), their gradients (*shape) (grads 1, outputs) or their per-row
// gradients (B, *shape) (grads 2, outputs).
void check_mimn_params(const MimnParamArrays& p, const fastattn::MimnDims& d, const char* fn,
                       Kind kind, int grads) {
    for (int i = 0; i < 12; ++i) {
        if (!mimn_param_present(i, d)) continue;
        const std::string name = std::string(grads ? "d" : "") + kMimnParam[i] +
                                 (grads == 2 ? "_rows" : "");
        need(*p[i], fn, name.c_str(), kind,
             grads == 2 ? rows(d.B, mimn_param_shape(i, d)) : mimn_param_shape(i, d), grads > 0);
    }
}
template <typename T>
const T* opt_cptr(const py::array& a, bool present) {
    return present ? cptr<T>(a) : nullptr;
}
template <typename T>
fastattn::MimnWeights<T> mimn_weights(const MimnParamArrays& p, const fastattn::MimnDims& d) {
    const T* q[12];
    for (int i = 0; i < 12; ++i) q[i] = opt_cptr<T>(*p[i], mimn_param_present(i, d));
    return {q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7], q[8], q[9], q[10], q[11]};
}
template <typename T>
fastattn::MimnWeightGrads<T> mimn_weight_grads(const MimnParamArrays& p,
                                               const fastattn::MimnDims& d) {
    T* q[12];
    for (int i = 0; i < 12; ++i)
        q[i] = mimn_param_present(i, d) ? static_cast<T*>(const_cast<py::array*>(p[i])->mutable_data())
                                        : nullptr;
    return {q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7], q[8], q[9], q[10], q[11]};
}

using StateArrays = std::array<const py::array*, 5>;  // h, r, M, g, S
const char* const kStateName[5] = {"h", "r", "M", "g", "S"};
// States (B, ...) or, with nc >= 0, checkpoints (B, nc, ...).
void check_states(const StateArrays& s, const fastattn::MimnDims& d, const char* fn, Kind kind,
                  const char* prefix, bool output, int64_t nc = -1) {
    const Shape shapes[5] = {{d.Hc}, {d.D}, {d.m, d.D}, {d.m}, {d.m, d.Hs}};
    for (int i = 0; i < 5; ++i) {
        Shape want = shapes[i];
        if (nc >= 0) want.insert(want.begin(), nc);
        want.insert(want.begin(), d.B);
        need(*s[i], fn, (std::string(prefix) + kStateName[i]).c_str(), kind, want, output);
    }
}
template <typename U>
fastattn::MimnStates<U> states_of(const StateArrays& s) {
    U* q[5];
    for (int i = 0; i < 5; ++i) q[i] = static_cast<U*>(const_cast<py::array*>(s[i])->mutable_data());
    return {q[0], q[1], q[2], q[3], q[4]};
}

Kind float_kind(const py::array& a) { return has_kind(a, Kind::f64) ? Kind::f64 : Kind::f32; }

// Sizes of a scan: x (B, T, Dx), ctrl_w_hh (3Hc, Hc), heads_w (P = 4D + 2, Hc), M0 (B, m, D),
// S0 (B, m, Hs).
fastattn::MimnDims scan_dims(const char* fn, Kind kind, const py::array& x,
                             const py::array& ctrl_w_hh, const py::array& heads_w,
                             const py::array& M0, const py::array& S0, bool has_mur,
                             int64_t miu_k) {
    fastattn::MimnDims d;
    const auto xs = check(x, fn, "x", kind, 3);
    const auto cs = check(ctrl_w_hh, fn, "ctrl_w_hh", kind, 2);
    const auto hs = check(heads_w, fn, "heads_w", kind, 2);
    const auto ms = check(M0, fn, "M0", kind, 3);
    const auto ss = check(S0, fn, "S0", kind, 3);
    d.B = xs[0], d.T = xs[1], d.Dx = xs[2], d.Hc = cs[1], d.D = ms[2], d.m = ms[1], d.Hs = ss[2];
    d.has_mur = has_mur, d.miu_k = miu_k;
    expect(hs[0] == 4 * d.D + 2, fn, "heads_w must have 4D + 2 = " + std::to_string(4 * d.D + 2) +
                                         " rows (D from M0), got " + shape_of(heads_w));
    expect(miu_k >= 0, fn, "miu_k must be >= 0");
    return d;
}

// The forward's stored tapes: empty (0,) for none, else (B, T, mimn_tape_floats).
bool has_tapes(const py::array& tapes, const fastattn::MimnDims& d, const char* fn, Kind kind,
               bool output) {
    if (tapes.ndim() == 1 && tapes.shape(0) == 0) return false;
    need(tapes, fn, "tapes", kind, {d.B, d.T, fastattn::mimn_tape_floats(d)}, output);
    return true;
}

void mimn_scan_fwd(const py::array& x, const py::array& lengths, const py::array& ctrl_w_ih,
                   const py::array& ctrl_w_hh, const py::array& ctrl_b_ih,
                   const py::array& ctrl_b_hh, const py::array& heads_w,
                   const py::array& heads_b, const py::array& mur_w, const py::array& mur_b,
                   const py::array& miu_w_ih, const py::array& miu_w_hh,
                   const py::array& miu_b_ih, const py::array& miu_b_hh, bool has_mur,
                   int64_t miu_k, const py::array& h0, const py::array& r0,
                   const py::array& M0, const py::array& g0, const py::array& S0, int64_t chunk,
                   py::array& reads, py::array& h, py::array& r, py::array& M, py::array& g,
                   py::array& S, py::array& ck_h, py::array& ck_r, py::array& ck_M,
                   py::array& ck_g, py::array& ck_S, py::array& tapes, int nthreads) {
    const char* fn = "mimn_scan_fwd";
    check_threads(nthreads, fn);
    const Kind kind = float_kind(x);
    const auto d = scan_dims(fn, kind, x, ctrl_w_hh, heads_w, M0, S0, has_mur, miu_k);
    expect(chunk >= 1, fn, "chunk must be >= 1");
    const int64_t NC = (d.T + chunk - 1) / chunk;
    need(lengths, fn, "lengths", Kind::i64, {d.B});
    const MimnParamArrays p{&ctrl_w_ih, &ctrl_w_hh, &ctrl_b_ih, &ctrl_b_hh, &heads_w, &heads_b,
                            &mur_w,     &mur_b,     &miu_w_ih,  &miu_w_hh,  &miu_b_ih, &miu_b_hh};
    check_mimn_params(p, d, fn, kind, 0);
    const StateArrays s0{&h0, &r0, &M0, &g0, &S0}, s1{&h, &r, &M, &g, &S},
        ck{&ck_h, &ck_r, &ck_M, &ck_g, &ck_S};
    check_states(s0, d, fn, kind, "", false);
    check_states(s1, d, fn, kind, "", true);
    check_states(ck, d, fn, kind, "ck_", true, NC);
    need(reads, fn, "reads", kind, {d.B, d.T, d.D}, true);
    const bool keep = has_tapes(tapes, d, fn, kind, true);
    py::gil_scoped_release release;
    if (kind == Kind::f64) {
        fastattn::mimn_scan_fwd<double>(d, cptr<double>(x), cptr<int64_t>(lengths),
                                        mimn_weights<double>(p, d), states_of<const double>(s0),
                                        chunk, ptr<double>(reads), states_of<double>(s1),
                                        states_of<double>(ck),
                                        keep ? ptr<double>(tapes) : nullptr, nthreads);
    } else {
        fastattn::mimn_scan_fwd<float>(d, cptr<float>(x), cptr<int64_t>(lengths),
                                       mimn_weights<float>(p, d), states_of<const float>(s0),
                                       chunk, ptr<float>(reads), states_of<float>(s1),
                                       states_of<float>(ck),
                                       keep ? ptr<float>(tapes) : nullptr, nthreads);
    }
}

// ops.mimn.bind_step's C++ stepper: the parameters checked, copied and packed once; step()
// checks its arrays (cheap) and runs one step for every row of x.
class MimnStepperPy {
   public:
    MimnStepperPy(const py::array& ctrl_w_ih, const py::array& ctrl_w_hh,
                  const py::array& ctrl_b_ih, const py::array& ctrl_b_hh,
                  const py::array& heads_w, const py::array& heads_b, const py::array& mur_w,
                  const py::array& mur_b, const py::array& miu_w_ih, const py::array& miu_w_hh,
                  const py::array& miu_b_ih, const py::array& miu_b_hh, bool has_mur,
                  int64_t miu_k, int64_t x_dim, int64_t mem_dim, int64_t slots,
                  int64_t ctrl_dim, int64_t miu_dim) {
        const char* fn = "MimnStepper";
        kind_ = float_kind(ctrl_w_ih);
        expect(x_dim >= 0 && mem_dim >= 1 && slots >= 1 && ctrl_dim >= 1 && miu_dim >= 0 &&
                   miu_k >= 0 && miu_k <= slots,
               fn, "sizes must be positive and miu_k in [0, slots]");
        d_.Dx = x_dim, d_.D = mem_dim, d_.m = slots, d_.Hc = ctrl_dim, d_.Hs = miu_dim;
        d_.has_mur = has_mur, d_.miu_k = miu_k;
        const MimnParamArrays p{&ctrl_w_ih, &ctrl_w_hh, &ctrl_b_ih, &ctrl_b_hh, &heads_w,
                                &heads_b,   &mur_w,     &mur_b,     &miu_w_ih,  &miu_w_hh,
                                &miu_b_ih,  &miu_b_hh};
        check_mimn_params(p, d_, fn, kind_, 0);
        if (kind_ == Kind::f64)
            f64_ = std::make_unique<fastattn::MimnStepper<double>>(d_, mimn_weights<double>(p, d_));
        else
            f32_ = std::make_unique<fastattn::MimnStepper<float>>(d_, mimn_weights<float>(p, d_));
    }
    void step(const py::array& x, const py::array& h, const py::array& r, const py::array& M,
              const py::array& g, const py::array& S, py::array& reads, py::array& h_out,
              py::array& r_out, py::array& M_out, py::array& g_out, py::array& S_out,
              int nthreads) const {
        const char* fn = "MimnStepper.step";
        check_threads(nthreads, fn);
        fastattn::MimnDims d = d_;
        d.B = check(x, fn, "x", kind_, 2)[0];
        need(x, fn, "x", kind_, {d.B, d.Dx});
        const StateArrays s0{&h, &r, &M, &g, &S}, s1{&h_out, &r_out, &M_out, &g_out, &S_out};
        check_states(s0, d, fn, kind_, "", false);
        check_states(s1, d, fn, kind_, "", true);
        need(reads, fn, "reads", kind_, {d.B, d.D}, true);
        py::gil_scoped_release release;
        if (f64_)
            f64_->step(d.B, cptr<double>(x), states_of<const double>(s0), ptr<double>(reads),
                       states_of<double>(s1), nthreads);
        else
            f32_->step(d.B, cptr<float>(x), states_of<const float>(s0), ptr<float>(reads),
                       states_of<float>(s1), nthreads);
    }

   private:
    Kind kind_ = Kind::f32;
    fastattn::MimnDims d_;
    std::unique_ptr<fastattn::MimnStepper<float>> f32_;
    std::unique_ptr<fastattn::MimnStepper<double>> f64_;
};

void mimn_scan_bwd(const py::array& d_reads, const py::array& d_h, const py::array& d_r,
                   const py::array& d_M, const py::array& d_g, const py::array& d_S,
                   const py::array& x, const py::array& lengths, const py::array& ctrl_w_ih,
                   const py::array& ctrl_w_hh, const py::array& ctrl_b_ih,
                   const py::array& ctrl_b_hh, const py::array& heads_w,
                   const py::array& heads_b, const py::array& mur_w, const py::array& mur_b,
                   const py::array& miu_w_ih, const py::array& miu_w_hh,
                   const py::array& miu_b_ih, const py::array& miu_b_hh, bool has_mur,
                   int64_t miu_k, int64_t chunk, const py::array& ck_h, const py::array& ck_r,
                   const py::array& ck_M, const py::array& ck_g, const py::array& ck_S,
                   const py::array& tapes, py::array& dx, py::array& dh0, py::array& dr0,
                   py::array& dM0, py::array& dg0, py::array& dS0, py::array& dctrl_w_ih,
                   py::array& dctrl_w_hh, py::array& dctrl_b_ih, py::array& dctrl_b_hh,
                   py::array& dheads_w, py::array& dheads_b, py::array& dmur_w,
                   py::array& dmur_b, py::array& dmiu_w_ih, py::array& dmiu_w_hh,
                   py::array& dmiu_b_ih, py::array& dmiu_b_hh, int nthreads) {
    const char* fn = "mimn_scan_bwd";
    check_threads(nthreads, fn);
    const Kind kind = float_kind(x);
    const auto d = scan_dims(fn, kind, x, ctrl_w_hh, heads_w, d_M, d_S, has_mur, miu_k);
    expect(chunk >= 1, fn, "chunk must be >= 1");
    const int64_t NC = (d.T + chunk - 1) / chunk;
    need(lengths, fn, "lengths", Kind::i64, {d.B});
    // d_reads: (B, T, D), or empty (0,) for no gradient on the reads
    const bool has_d_reads = !(d_reads.ndim() == 1 && d_reads.shape(0) == 0);
    if (has_d_reads) need(d_reads, fn, "d_reads", kind, {d.B, d.T, d.D});
    else need(d_reads, fn, "d_reads", kind, {0});
    need(dx, fn, "dx", kind, {d.B, d.T, d.Dx}, true);
    const MimnParamArrays p{&ctrl_w_ih, &ctrl_w_hh, &ctrl_b_ih, &ctrl_b_hh, &heads_w, &heads_b,
                            &mur_w,     &mur_b,     &miu_w_ih,  &miu_w_hh,  &miu_b_ih, &miu_b_hh};
    const MimnParamArrays dp{&dctrl_w_ih, &dctrl_w_hh, &dctrl_b_ih, &dctrl_b_hh,
                             &dheads_w,   &dheads_b,   &dmur_w,     &dmur_b,
                             &dmiu_w_ih,  &dmiu_w_hh,  &dmiu_b_ih,  &dmiu_b_hh};
    check_mimn_params(p, d, fn, kind, 0);
    check_mimn_params(dp, d, fn, kind, 1);
    const StateArrays dfin{&d_h, &d_r, &d_M, &d_g, &d_S}, ck{&ck_h, &ck_r, &ck_M, &ck_g, &ck_S},
        ds0{&dh0, &dr0, &dM0, &dg0, &dS0};
    check_states(dfin, d, fn, kind, "d_", false);
    check_states(ck, d, fn, kind, "ck_", false, NC);
    check_states(ds0, d, fn, kind, "d", true);
    const bool kept = has_tapes(tapes, d, fn, kind, false);
    py::gil_scoped_release release;
    if (kind == Kind::f64) {
        fastattn::mimn_scan_bwd<double>(d, has_d_reads ? cptr<double>(d_reads) : nullptr,
                                        states_of<const double>(dfin),
                                        cptr<double>(x), cptr<int64_t>(lengths),
                                        mimn_weights<double>(p, d), chunk,
                                        states_of<const double>(ck),
                                        kept ? cptr<double>(tapes) : nullptr, ptr<double>(dx),
                                        states_of<double>(ds0), mimn_weight_grads<double>(dp, d),
                                        nthreads);
    } else {
        fastattn::mimn_scan_bwd<float>(d, has_d_reads ? cptr<float>(d_reads) : nullptr,
                                       states_of<const float>(dfin),
                                       cptr<float>(x), cptr<int64_t>(lengths),
                                       mimn_weights<float>(p, d), chunk,
                                       states_of<const float>(ck),
                                       kept ? cptr<float>(tapes) : nullptr, ptr<float>(dx),
                                       states_of<float>(ds0), mimn_weight_grads<float>(dp, d),
                                       nthreads);
    }
}

// Sizes of the one-step ops from M (B, m, D) and, for the NTM, head (B, 4D + 2).
fastattn::MimnDims step_dims(const char* fn, Kind kind, const py::array& M) {
    const auto ms = check(M, fn, "M", kind, 3);
    fastattn::MimnDims d;
    d.B = ms[0], d.m = ms[1], d.D = ms[2];
    return d;
}

void ntm_read_write_fwd(const py::array& M, const py::array& g, const py::array& head,
                        const py::array& mur_w, const py::array& mur_b, bool has_mur,
                        py::array& read, py::array& M_out, py::array& g_out, py::array& wr,
                        int nthreads) {
    const char* fn = "ntm_read_write_fwd";
    check_threads(nthreads, fn);
    const Kind kind = float_kind(M);
    auto d = step_dims(fn, kind, M);
    d.has_mur = has_mur;
    need(g, fn, "g", kind, {d.B, d.m});
    need(head, fn, "head", kind, {d.B, 4 * d.D + 2});
    if (has_mur) {
        need(mur_w, fn, "mur_w", kind, {d.m, d.m});
        need(mur_b, fn, "mur_b", kind, {d.m});
    }
    need(read, fn, "read", kind, {d.B, d.D}, true);
    need(M_out, fn, "M_out", kind, {d.B, d.m, d.D}, true);
    need(g_out, fn, "g_out", kind, {d.B, d.m}, true);
    need(wr, fn, "wr", kind, {d.B, d.m}, true);
    py::gil_scoped_release release;
    if (kind == Kind::f64) {
        fastattn::ntm_read_write_fwd<double>(
            d, cptr<double>(M), cptr<double>(g), cptr<double>(head), opt_cptr<double>(mur_w, has_mur),
            opt_cptr<double>(mur_b, has_mur), ptr<double>(read), ptr<double>(M_out),
            ptr<double>(g_out), ptr<double>(wr), nthreads);
    } else {
        fastattn::ntm_read_write_fwd<float>(
            d, cptr<float>(M), cptr<float>(g), cptr<float>(head), opt_cptr<float>(mur_w, has_mur),
            opt_cptr<float>(mur_b, has_mur), ptr<float>(read), ptr<float>(M_out),
            ptr<float>(g_out), ptr<float>(wr), nthreads);
    }
}

void ntm_read_write_bwd(const py::array& d_read, const py::array& d_M_out,
                        const py::array& d_g_out, const py::array& d_wr, const py::array& M,
                        const py::array& g, const py::array& head, const py::array& mur_w,
                        const py::array& mur_b, bool has_mur, py::array& dM, py::array& dg,
                        py::array& dhead, py::array& dmur_w_rows, py::array& dmur_b_rows,
                        int nthreads) {
    const char* fn = "ntm_read_write_bwd";
    check_threads(nthreads, fn);
    const Kind kind = float_kind(M);
    auto d = step_dims(fn, kind, M);
    d.has_mur = has_mur;
    const int64_t P = 4 * d.D + 2;
    need(d_read, fn, "d_read", kind, {d.B, d.D});
    need(d_M_out, fn, "d_M_out", kind, {d.B, d.m, d.D});
    need(d_g_out, fn, "d_g_out", kind, {d.B, d.m});
    need(d_wr, fn, "d_wr", kind, {d.B, d.m});
    need(g, fn, "g", kind, {d.B, d.m});
    need(head, fn, "head", kind, {d.B, P});
    need(dM, fn, "dM", kind, {d.B, d.m, d.D}, true);
    need(dg, fn, "dg", kind, {d.B, d.m}, true);
    need(dhead, fn, "dhead", kind, {d.B, P}, true);
    if (has_mur) {
        need(mur_w, fn, "mur_w", kind, {d.m, d.m});
        need(mur_b, fn, "mur_b", kind, {d.m});
        need(dmur_w_rows, fn, "dmur_w_rows", kind, {d.B, d.m, d.m}, true);
        need(dmur_b_rows, fn, "dmur_b_rows", kind, {d.B, d.m}, true);
    }
    py::gil_scoped_release release;
    if (kind == Kind::f64) {
        fastattn::ntm_read_write_bwd<double>(
            d, cptr<double>(d_read), cptr<double>(d_M_out), cptr<double>(d_g_out),
            cptr<double>(d_wr), cptr<double>(M), cptr<double>(g), cptr<double>(head),
            opt_cptr<double>(mur_w, has_mur), opt_cptr<double>(mur_b, has_mur), ptr<double>(dM),
            ptr<double>(dg), ptr<double>(dhead), has_mur ? ptr<double>(dmur_w_rows) : nullptr,
            has_mur ? ptr<double>(dmur_b_rows) : nullptr, nthreads);
    } else {
        fastattn::ntm_read_write_bwd<float>(
            d, cptr<float>(d_read), cptr<float>(d_M_out), cptr<float>(d_g_out),
            cptr<float>(d_wr), cptr<float>(M), cptr<float>(g), cptr<float>(head),
            opt_cptr<float>(mur_w, has_mur), opt_cptr<float>(mur_b, has_mur), ptr<float>(dM),
            ptr<float>(dg), ptr<float>(dhead), has_mur ? ptr<float>(dmur_w_rows) : nullptr,
            has_mur ? ptr<float>(dmur_b_rows) : nullptr, nthreads);
    }
}

// M (B, m, D), x (B, Dx), S (B, m, Hs), wr (B, m); the GRU arrays when miu_k >= 1.
fastattn::MimnDims miu_dims(const char* fn, Kind kind, const py::array& M, const py::array& x,
                            const py::array& S, const py::array& wr, int64_t miu_k,
                            const MimnParamArrays& p) {
    auto d = step_dims(fn, kind, M);
    const auto xs = check(x, fn, "x", kind, 2);
    const auto ss = check(S, fn, "S", kind, 3);
    d.Dx = xs[1], d.Hs = ss[2], d.miu_k = miu_k;
    expect(miu_k >= 0, fn, "miu_k must be >= 0");
    need(x, fn, "x", kind, {d.B, d.Dx});
    need(S, fn, "S", kind, {d.B, d.m, d.Hs});
    need(wr, fn, "wr", kind, {d.B, d.m});
    for (int i = 8; i < 12; ++i)
        if (miu_k >= 1) need(*p[i], fn, kMimnParam[i], kind, mimn_param_shape(i, d));
    return d;
}

void miu_gather_gru_fwd(const py::array& M, const py::array& x, const py::array& S,
                        const py::array& wr, int64_t miu_k, const py::array& w_ih,
                        const py::array& w_hh, const py::array& b_ih, const py::array& b_hh,
                        py::array& S_out, int nthreads) {
    const char* fn = "miu_gather_gru_fwd";
    check_threads(nthreads, fn);
    const Kind kind = float_kind(M);
    MimnParamArrays p{};
    p[8] = &w_ih, p[9] = &w_hh, p[10] = &b_ih, p[11] = &b_hh;
    const auto d = miu_dims(fn, kind, M, x, S, wr, miu_k, p);
    need(S_out, fn, "S_out", kind, {d.B, d.m, d.Hs}, true);
    const bool on = miu_k >= 1;
    py::gil_scoped_release release;
    if (kind == Kind::f64) {
        fastattn::miu_gather_gru_fwd<double>(
            d, cptr<double>(M), cptr<double>(x), cptr<double>(S), cptr<double>(wr),
            opt_cptr<double>(w_ih, on), opt_cptr<double>(w_hh, on), opt_cptr<double>(b_ih, on),
            opt_cptr<double>(b_hh, on), ptr<double>(S_out), nthreads);
    } else {
        fastattn::miu_gather_gru_fwd<float>(
            d, cptr<float>(M), cptr<float>(x), cptr<float>(S), cptr<float>(wr),
            opt_cptr<float>(w_ih, on), opt_cptr<float>(w_hh, on), opt_cptr<float>(b_ih, on),
            opt_cptr<float>(b_hh, on), ptr<float>(S_out), nthreads);
    }
}

void miu_gather_gru_bwd(const py::array& d_S_out, const py::array& M, const py::array& x,
                        const py::array& S, const py::array& wr, int64_t miu_k,
                        const py::array& w_ih, const py::array& w_hh, const py::array& b_ih,
                        const py::array& b_hh, py::array& dM, py::array& dx, py::array& dS,
                        py::array& dw_ih_rows, py::array& dw_hh_rows, py::array& db_ih_rows,
                        py::array& db_hh_rows, int nthreads) {
    const char* fn = "miu_gather_gru_bwd";
    check_threads(nthreads, fn);
    const Kind kind = float_kind(M);
    MimnParamArrays p{};
    p[8] = &w_ih, p[9] = &w_hh, p[10] = &b_ih, p[11] = &b_hh;
    const auto d = miu_dims(fn, kind, M, x, S, wr, miu_k, p);
    need(d_S_out, fn, "d_S_out", kind, {d.B, d.m, d.Hs});
    need(dM, fn, "dM", kind, {d.B, d.m, d.D}, true);
    need(dx, fn, "dx", kind, {d.B, d.Dx}, true);
    need(dS, fn, "dS", kind, {d.B, d.m, d.Hs}, true);
    const bool on = miu_k >= 1;
    if (on) {
        const py::array* g[4] = {&dw_ih_rows, &dw_hh_rows, &db_ih_rows, &db_hh_rows};
        const char* names[4] = {"dw_ih_rows", "dw_hh_rows", "db_ih_rows", "db_hh_rows"};
        for (int i = 0; i < 4; ++i) need(*g[i], fn, names[i], kind, rows(d.B, mimn_param_shape(8 + i, d)), true);
    }
    py::gil_scoped_release release;
    if (kind == Kind::f64) {
        fastattn::miu_gather_gru_bwd<double>(
            d, cptr<double>(d_S_out), cptr<double>(M), cptr<double>(x), cptr<double>(S),
            cptr<double>(wr), opt_cptr<double>(w_ih, on), opt_cptr<double>(w_hh, on),
            opt_cptr<double>(b_ih, on), opt_cptr<double>(b_hh, on), ptr<double>(dM),
            ptr<double>(dx), ptr<double>(dS), on ? ptr<double>(dw_ih_rows) : nullptr,
            on ? ptr<double>(dw_hh_rows) : nullptr, on ? ptr<double>(db_ih_rows) : nullptr,
            on ? ptr<double>(db_hh_rows) : nullptr, nthreads);
    } else {
        fastattn::miu_gather_gru_bwd<float>(
            d, cptr<float>(d_S_out), cptr<float>(M), cptr<float>(x), cptr<float>(S),
            cptr<float>(wr), opt_cptr<float>(w_ih, on), opt_cptr<float>(w_hh, on),
            opt_cptr<float>(b_ih, on), opt_cptr<float>(b_hh, on), ptr<float>(dM),
            ptr<float>(dx), ptr<float>(dS), on ? ptr<float>(dw_ih_rows) : nullptr,
            on ? ptr<float>(dw_hh_rows) : nullptr, on ? ptr<float>(db_ih_rows) : nullptr,
            on ? ptr<float>(db_hh_rows) : nullptr, nthreads);
    }
}

uint64_t popcount_limit(const py::array& keys, const py::array& q, const std::string& isa,
                        int nthreads) {
    const char* fn = "popcount_limit";
    check_threads(nthreads, fn);
    const auto ks = check(keys, fn, "keys", Kind::i64, 2);
    const auto qs = check(q, fn, "q", Kind::i64, 2);
    expect(ks[1] == 4 && qs[1] == 4, fn, "keys (n, 4) and q (nq, 4) hold 256-bit signatures, got " +
                                             shape_of(keys) + " and " + shape_of(q));
    expect(ks[0] % 8 == 0 && qs[0] % 4 == 0, fn, "n must be a multiple of 8 and nq of 4, got " +
                                                    shape_of(keys) + " and " + shape_of(q));
    const std::string name = isa;
    py::gil_scoped_release release;
    return fastattn::popcount_limit(cptr<int64_t>(keys), ks[0], cptr<int64_t>(q), qs[0], name,
                                    nthreads);
}

// ----------------------------------------------------------------------------- gru_scan
// docs/kernel_api.md "gru_scan": xp (B, T, 3H), w_hh (3H, H), b_hh (3H,), h0 (B, H) and all
// outputs share the dtype of xp (float32/float64); lengths (B,) int64.
int64_t gru_dims(const char* fn, Kind kind, const py::array& xp, const py::array& w_hh,
                 int64_t* B, int64_t* T) {
    const auto xs = check(xp, fn, "xp", kind, 3);
    const auto ws = check(w_hh, fn, "w_hh", kind, 2);
    const int64_t H = ws[1];
    expect(ws[0] == 3 * H, fn, "w_hh must be (3H, H), got " + shape_of(w_hh));
    expect(xs[2] == 3 * H, fn, "xp must be (B, T, 3H) with 3H = " + std::to_string(3 * H) +
                                   " (H from w_hh), got " + shape_of(xp));
    *B = xs[0], *T = xs[1];
    return H;
}

void gru_scan_fwd(const py::array& xp, const py::array& lengths, const py::array& w_hh,
                  const py::array& b_hh, const py::array& h0, py::array& out, int nthreads) {
    const char* fn = "gru_scan_fwd";
    check_threads(nthreads, fn);
    const Kind kind = float_kind(xp);
    int64_t B, T;
    const int64_t H = gru_dims(fn, kind, xp, w_hh, &B, &T);
    need(lengths, fn, "lengths", Kind::i64, {B});
    need(b_hh, fn, "b_hh", kind, {3 * H});
    need(h0, fn, "h0", kind, {B, H});
    need(out, fn, "out", kind, {B, T, H}, true);
    py::gil_scoped_release release;
    if (kind == Kind::f64)
        fastattn::gru_scan_fwd<double>(cptr<double>(xp), cptr<int64_t>(lengths),
                                       cptr<double>(w_hh), cptr<double>(b_hh), cptr<double>(h0),
                                       B, T, H, ptr<double>(out), nthreads);
    else
        fastattn::gru_scan_fwd<float>(cptr<float>(xp), cptr<int64_t>(lengths), cptr<float>(w_hh),
                                      cptr<float>(b_hh), cptr<float>(h0), B, T, H,
                                      ptr<float>(out), nthreads);
}

void gru_scan_bwd(const py::array& d_out, const py::array& xp, const py::array& out,
                  const py::array& lengths, const py::array& w_hh, const py::array& b_hh,
                  const py::array& h0, py::array& dxp, py::array& dhp, py::array& dh0,
                  int nthreads) {
    const char* fn = "gru_scan_bwd";
    check_threads(nthreads, fn);
    const Kind kind = float_kind(xp);
    int64_t B, T;
    const int64_t H = gru_dims(fn, kind, xp, w_hh, &B, &T);
    need(d_out, fn, "d_out", kind, {B, T, H});
    need(out, fn, "out", kind, {B, T, H});
    need(lengths, fn, "lengths", Kind::i64, {B});
    need(b_hh, fn, "b_hh", kind, {3 * H});
    need(h0, fn, "h0", kind, {B, H});
    need(dxp, fn, "dxp", kind, {B, T, 3 * H}, true);
    need(dhp, fn, "dhp", kind, {B, T, 3 * H}, true);
    need(dh0, fn, "dh0", kind, {B, H}, true);
    py::gil_scoped_release release;
    if (kind == Kind::f64)
        fastattn::gru_scan_bwd<double>(cptr<double>(d_out), cptr<double>(xp), cptr<double>(out),
                                       cptr<int64_t>(lengths), cptr<double>(w_hh),
                                       cptr<double>(b_hh), cptr<double>(h0), B, T, H,
                                       ptr<double>(dxp), ptr<double>(dhp), ptr<double>(dh0),
                                       nthreads);
    else
        fastattn::gru_scan_bwd<float>(cptr<float>(d_out), cptr<float>(xp), cptr<float>(out),
                                      cptr<int64_t>(lengths), cptr<float>(w_hh),
                                      cptr<float>(b_hh), cptr<float>(h0), B, T, H,
                                      ptr<float>(dxp), ptr<float>(dhp), ptr<float>(dh0),
                                      nthreads);
}

py::dict cpu_features() {
    const fastattn::CpuFeatures& f = fastattn::cpu_features();
    py::dict d;
    d["popcnt"] = f.popcnt;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["avx512f"] = f.avx512f;
    d["avx512bw"] = f.avx512bw;
    d["avx512vl"] = f.avx512vl;
    d["avx512_vpopcntdq"] = f.avx512vpopcntdq;
    d["bmi2"] = f.bmi2;
    d["avx512_vbmi2"] = f.avx512vbmi2;
    d["avx512_bf16"] = f.avx512bf16;
    d["amx_bf16"] = f.amx_bf16;
    d["isa_cap"] = f.isa_cap.empty() ? py::object(py::none()) : py::object(py::str(f.isa_cap));
    d["simhash_sign"] = fastattn::simhash_impl();
    d["hamming"] = fastattn::hamming_impl();
    d["attention"] = fastattn::attention_impl();
    d["gru_scan"] = fastattn::gru_impl();
    py::dict ran;
    for (int f = 0; f < static_cast<int>(Family::count); ++f) {
        py::dict paths;
        for (const auto& kv : g_ran[f]) paths[py::str(kv.first)] = kv.second;
        ran[kFamilyNames[f]] = paths;
    }
    d["ran"] = ran;
    return d;
}

// Masked mean pooling (BAHE): x (N, K, D) f32/f64, mask (N, K) uint8 -> out (N, D).
void masked_mean_fwd(const py::array& x, const py::array& mask, py::array& out, int nthreads) {
    const char* fn = "masked_mean_fwd";
    check_threads(nthreads, fn);
    const bool f64 = has_kind(x, Kind::f64);
    const Kind kind = f64 ? Kind::f64 : Kind::f32;
    const auto xs = check(x, fn, "x", kind, 3);
    const auto ms = check(mask, fn, "mask", Kind::u8, 2);
    const auto os = check(out, fn, "out (same dtype as x)", kind, 2, true);
    expect(ms[0] == xs[0] && ms[1] == xs[1], fn, "mask must be (N, K) = x.shape[:2], got " +
                                                     shape_of(mask));
    expect(os[0] == xs[0] && os[1] == xs[2], fn, "out must be (N, D), got " + shape_of(out));
    py::gil_scoped_release release;
    if (f64) {
        fastattn::masked_mean_fwd(cptr<double>(x), cptr<uint8_t>(mask), xs[0], xs[1], xs[2],
                                  ptr<double>(out), nthreads);
    } else {
        fastattn::masked_mean_fwd(cptr<float>(x), cptr<uint8_t>(mask), xs[0], xs[1], xs[2],
                                  ptr<float>(out), nthreads);
    }
}

// Its backward: grad (N, D), mask (N, K) uint8 -> dx (N, K, D).
void masked_mean_bwd(const py::array& grad, const py::array& mask, py::array& dx, int nthreads) {
    const char* fn = "masked_mean_bwd";
    check_threads(nthreads, fn);
    const bool f64 = has_kind(grad, Kind::f64);
    const Kind kind = f64 ? Kind::f64 : Kind::f32;
    const auto gs = check(grad, fn, "grad", kind, 2);
    const auto ms = check(mask, fn, "mask", Kind::u8, 2);
    const auto ds = check(dx, fn, "dx (same dtype as grad)", kind, 3, true);
    expect(ms[0] == gs[0], fn, "mask must be (N, K) with N = grad.shape[0]");
    expect(ds[0] == gs[0] && ds[1] == ms[1] && ds[2] == gs[1], fn,
           "dx must be (N, K, D), got " + shape_of(dx));
    py::gil_scoped_release release;
    if (f64) {
        fastattn::masked_mean_bwd(cptr<double>(grad), cptr<uint8_t>(mask), ds[0], ds[1], ds[2],
                                  ptr<double>(dx), nthreads);
    } else {
        fastattn::masked_mean_bwd(cptr<float>(grad), cptr<uint8_t>(mask), ds[0], ds[1], ds[2],
                                  ptr<float>(dx), nthreads);
    }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    // An unknown FASTATTN_CPU_ISA refuses the module (fastattn reports the reason as the cpp
    // backend's, and forcing backend="cpp" raises it) rather than silently meaning no cap.
    if (!fastattn::cpu_features().isa_cap_valid) {
        std::string levels;
        for (int i = 0; fastattn::isa_levels()[i] != nullptr; ++i)
            levels += std::string(i ? ", " : "") + fastattn::isa_levels()[i];
        throw py::value_error("FASTATTN_CPU_ISA=" + fastattn::cpu_features().isa_cap +
                              " is not a known ISA level; use one of " + levels +
                              " (or leave it unset: no cap)");
    }
    m.doc() = "fastattn C++ CPU kernels (see docs/kernel_api.md). Outputs are written in place.";
    m.def("simhash_sign", &simhash_sign, py::arg("x").noconvert(), py::arg("planes").noconvert(), py::arg("out").noconvert(),
          py::arg("nthreads"),
          "x (N, D) f32/f64, planes (D, NB) same dtype -> out (N, ceil(NB/64)) int64 sign bits.");
    m.def("simhash_sign_rows", &simhash_sign_rows, py::arg("x").noconvert(), py::arg("planes").noconvert(), py::arg("rows").noconvert(), py::arg("out").noconvert(),
          py::arg("nthreads"),
          "x (N, D) f32/f64 table, planes (D, NB), rows (M,) int64 in [0, N) -> out (M, ceil(NB/64)):\n"
          "the signatures of x[rows], read in place.");
    m.def("hamming_distance", &hamming_distance, py::arg("q").noconvert(), py::arg("k").noconvert(), py::arg("qi").noconvert(),
          py::arg("ki").noconvert(), py::arg("out").noconvert(), py::arg("nthreads"),
          "out[n, l] = popcount(q[qi[n]] ^ k[ki[n], l]); q (Nq, W), k (Nk, L, W), out (N, L) int32.");
    m.def("hamming_topk", &hamming_topk, py::arg("q").noconvert(), py::arg("k").noconvert(), py::arg("lengths").noconvert(),
          py::arg("hist_index").noconvert(), py::arg("topk"), py::arg("out_dist").noconvert(), py::arg("out_idx").noconvert(),
          py::arg("nthreads"),
          "Top-k smallest Hamming distances per query, ordered by (distance, position).");
    m.def("hamming_topk_rows", &hamming_topk_rows, py::arg("q").noconvert(), py::arg("k").noconvert(),
          py::arg("rows").noconvert(), py::arg("lengths").noconvert(), py::arg("hist_index").noconvert(),
          py::arg("topk"), py::arg("out_dist").noconvert(), py::arg("out_idx").noconvert(), py::arg("nthreads"),
          "hamming_topk over indexed histories: position l of history u has signature k[rows[u, l]].");
    m.def("unique_rows", &unique_rows, py::arg("ids").noconvert(), py::arg("lengths").noconvert(),
          py::arg("hist_rows").noconvert(), py::arg("nthreads"),
          "Distinct ids of the valid positions in first-occurrence order (returned, int64) and "
          "hist_rows[u, l] = index of ids[u, l] among them, -1 past the length (written in place).");
    m.def("last_matches", &last_matches, py::arg("values").noconvert(), py::arg("lengths").noconvert(),
          py::arg("target").noconvert(), py::arg("hist_index").noconvert(), py::arg("out").noconvert(),
          py::arg("nthreads"), "SIM-hard category search: the n most recent positions holding target[b]");
    m.def("gather_rows", &gather_rows, py::arg("values").noconvert(), py::arg("idx").noconvert(), py::arg("hist_index").noconvert(),
          py::arg("out").noconvert(), py::arg("nthreads"),
          "out[b, j] = values[hist_index[b], idx[b, j]] (raw bytes); idx = -1 gives zeros.");
    m.def("scatter_add_rows", &scatter_add_rows, py::arg("grad").noconvert(), py::arg("idx").noconvert(),
          py::arg("hist_index").noconvert(), py::arg("out").noconvert(), py::arg("nthreads"),
          "out[hist_index[b], idx[b, j]] += grad[b, j] for idx >= 0; deterministic.");
    m.def("masked_mean_fwd", &masked_mean_fwd, py::arg("x").noconvert(), py::arg("mask").noconvert(),
          py::arg("out").noconvert(), py::arg("nthreads"),
          "out[n] = mean of x[n, k] over mask[n, k] != 0 (zeros if none); x (N, K, D) f32/f64.");
    m.def("masked_mean_bwd", &masked_mean_bwd, py::arg("grad").noconvert(), py::arg("mask").noconvert(),
          py::arg("dx").noconvert(), py::arg("nthreads"),
          "dx[n, k] = grad[n] / max(count[n], 1) where mask[n, k] != 0, zeros elsewhere.");
    m.def("topk_attention_fwd", &topk_attention_fwd, py::arg("q").noconvert(), py::arg("keys").noconvert(),
          py::arg("values").noconvert(), py::arg("idx").noconvert(), py::arg("hist_index").noconvert(),
          py::arg("scale"), py::arg("out").noconvert(), py::arg("lse").noconvert(), py::arg("nthreads"),
          "Softmax attention of q (B, H, Dh) over rows idx (B, K) of its history -> out, lse.");
    m.def("topk_attention_bwd", &topk_attention_bwd, py::arg("grad_out").noconvert(), py::arg("q").noconvert(),
          py::arg("keys").noconvert(), py::arg("values").noconvert(), py::arg("idx").noconvert(),
          py::arg("hist_index").noconvert(), py::arg("out").noconvert(), py::arg("lse").noconvert(),
          py::arg("scale"), py::arg("dq").noconvert(), py::arg("dk_slots").noconvert(),
          py::arg("dv_slots").noconvert(), py::arg("nthreads"),
          "Backward of topk_attention_fwd -> dq (B, H, Dh), dk_slots (B, K, H, Dh), dv_slots (B, K, H, Dv).");
    // MIMN (docs/kernel_api.md "MIMN"); parameter gradients are partial sums (per row or
    // per row tile), summed over the first axis by the op layer.
    m.def("ntm_read_write_fwd", &ntm_read_write_fwd,
          py::arg("M").noconvert(), py::arg("g").noconvert(), py::arg("head").noconvert(),
          py::arg("mur_w").noconvert(), py::arg("mur_b").noconvert(), py::arg("has_mur"),
          py::arg("read").noconvert(), py::arg("M_out").noconvert(), py::arg("g_out").noconvert(),
          py::arg("wr").noconvert(), py::arg("nthreads"),
          "MIMN steps 3-6 for one step; outputs written in place.");
    m.def("ntm_read_write_bwd", &ntm_read_write_bwd,
          py::arg("d_read").noconvert(), py::arg("d_M_out").noconvert(),
          py::arg("d_g_out").noconvert(), py::arg("d_wr").noconvert(), py::arg("M").noconvert(),
          py::arg("g").noconvert(), py::arg("head").noconvert(), py::arg("mur_w").noconvert(),
          py::arg("mur_b").noconvert(), py::arg("has_mur"), py::arg("dM").noconvert(),
          py::arg("dg").noconvert(), py::arg("dhead").noconvert(),
          py::arg("dmur_w_rows").noconvert(), py::arg("dmur_b_rows").noconvert(),
          py::arg("nthreads"),
          "Backward of ntm_read_write_fwd; per-row MUR gradients.");
    m.def("miu_gather_gru_fwd", &miu_gather_gru_fwd,
          py::arg("M").noconvert(), py::arg("x").noconvert(), py::arg("S").noconvert(),
          py::arg("wr").noconvert(), py::arg("miu_k"), py::arg("w_ih").noconvert(),
          py::arg("w_hh").noconvert(), py::arg("b_ih").noconvert(), py::arg("b_hh").noconvert(),
          py::arg("S_out").noconvert(), py::arg("nthreads"),
          "MIMN step 7 (top-miu_k channels by wr get the MIU GRU); in place.");
    m.def("miu_gather_gru_bwd", &miu_gather_gru_bwd,
          py::arg("d_S_out").noconvert(), py::arg("M").noconvert(), py::arg("x").noconvert(),
          py::arg("S").noconvert(), py::arg("wr").noconvert(), py::arg("miu_k"),
          py::arg("w_ih").noconvert(), py::arg("w_hh").noconvert(), py::arg("b_ih").noconvert(),
          py::arg("b_hh").noconvert(), py::arg("dM").noconvert(), py::arg("dx").noconvert(),
          py::arg("dS").noconvert(), py::arg("dw_ih_rows").noconvert(),
          py::arg("dw_hh_rows").noconvert(), py::arg("db_ih_rows").noconvert(),
          py::arg("db_hh_rows").noconvert(), py::arg("nthreads"),
          "Backward of miu_gather_gru_fwd; per-row GRU gradients, none to wr.");
    m.def("mimn_scan_fwd", &mimn_scan_fwd,
          py::arg("x").noconvert(), py::arg("lengths").noconvert(),
          py::arg("ctrl_w_ih").noconvert(), py::arg("ctrl_w_hh").noconvert(),
          py::arg("ctrl_b_ih").noconvert(), py::arg("ctrl_b_hh").noconvert(),
          py::arg("heads_w").noconvert(), py::arg("heads_b").noconvert(),
          py::arg("mur_w").noconvert(), py::arg("mur_b").noconvert(),
          py::arg("miu_w_ih").noconvert(), py::arg("miu_w_hh").noconvert(),
          py::arg("miu_b_ih").noconvert(), py::arg("miu_b_hh").noconvert(), py::arg("has_mur"),
          py::arg("miu_k"), py::arg("h0").noconvert(), py::arg("r0").noconvert(),
          py::arg("M0").noconvert(), py::arg("g0").noconvert(), py::arg("S0").noconvert(),
          py::arg("chunk"), py::arg("reads").noconvert(), py::arg("h").noconvert(),
          py::arg("r").noconvert(), py::arg("M").noconvert(), py::arg("g").noconvert(),
          py::arg("S").noconvert(), py::arg("ck_h").noconvert(), py::arg("ck_r").noconvert(),
          py::arg("ck_M").noconvert(), py::arg("ck_g").noconvert(), py::arg("ck_S").noconvert(),
          py::arg("tapes").noconvert(), py::arg("nthreads"),
          "MIMN steps 1-7 over all T steps; reads, final state, chunk checkpoints and (unless "
          "tapes is empty) every valid step's tape in place.");
    m.def("mimn_tape_floats",
          [](int64_t x_dim, int64_t mem_dim, int64_t slots, int64_t ctrl_dim, int64_t miu_dim,
             int64_t miu_k) {
              fastattn::MimnDims d;
              d.Dx = x_dim, d.D = mem_dim, d.m = slots, d.Hc = ctrl_dim, d.Hs = miu_dim;
              d.miu_k = miu_k;
              return fastattn::mimn_tape_floats(d);
          },
          py::arg("x_dim"), py::arg("mem_dim"), py::arg("slots"), py::arg("ctrl_dim"),
          py::arg("miu_dim"), py::arg("miu_k"),
          "Floats per step of mimn_scan_fwd's stored tapes (the last axis of `tapes`).");
    m.def("mimn_scan_bwd", &mimn_scan_bwd,
          py::arg("d_reads").noconvert(), py::arg("d_h").noconvert(), py::arg("d_r").noconvert(),
          py::arg("d_M").noconvert(), py::arg("d_g").noconvert(), py::arg("d_S").noconvert(),
          py::arg("x").noconvert(), py::arg("lengths").noconvert(),
          py::arg("ctrl_w_ih").noconvert(), py::arg("ctrl_w_hh").noconvert(),
          py::arg("ctrl_b_ih").noconvert(), py::arg("ctrl_b_hh").noconvert(),
          py::arg("heads_w").noconvert(), py::arg("heads_b").noconvert(),
          py::arg("mur_w").noconvert(), py::arg("mur_b").noconvert(),
          py::arg("miu_w_ih").noconvert(), py::arg("miu_w_hh").noconvert(),
          py::arg("miu_b_ih").noconvert(), py::arg("miu_b_hh").noconvert(), py::arg("has_mur"),
          py::arg("miu_k"), py::arg("chunk"), py::arg("ck_h").noconvert(),
          py::arg("ck_r").noconvert(), py::arg("ck_M").noconvert(), py::arg("ck_g").noconvert(),
          py::arg("ck_S").noconvert(), py::arg("tapes").noconvert(), py::arg("dx").noconvert(),
          py::arg("dh0").noconvert(),
          py::arg("dr0").noconvert(), py::arg("dM0").noconvert(), py::arg("dg0").noconvert(),
          py::arg("dS0").noconvert(), py::arg("dctrl_w_ih").noconvert(),
          py::arg("dctrl_w_hh").noconvert(), py::arg("dctrl_b_ih").noconvert(),
          py::arg("dctrl_b_hh").noconvert(), py::arg("dheads_w").noconvert(),
          py::arg("dheads_b").noconvert(), py::arg("dmur_w").noconvert(),
          py::arg("dmur_b").noconvert(), py::arg("dmiu_w_ih").noconvert(),
          py::arg("dmiu_w_hh").noconvert(), py::arg("dmiu_b_ih").noconvert(),
          py::arg("dmiu_b_hh").noconvert(), py::arg("nthreads"),
          "BPTT of mimn_scan_fwd by chunked recomputation (from its tapes, unless empty); "
          "parameter-gradient totals.");
    py::class_<MimnStepperPy>(m, "MimnStepper",
                              "MIMN parameters packed once; step() = one step for every row.")
        .def(py::init<const py::array&, const py::array&, const py::array&, const py::array&,
                      const py::array&, const py::array&, const py::array&, const py::array&,
                      const py::array&, const py::array&, const py::array&, const py::array&,
                      bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>())
        .def("step", &MimnStepperPy::step, py::arg("x"), py::arg("h"), py::arg("r"),
             py::arg("M"), py::arg("g"), py::arg("S"), py::arg("reads").noconvert(),
             py::arg("h_out").noconvert(), py::arg("r_out").noconvert(),
             py::arg("M_out").noconvert(), py::arg("g_out").noconvert(),
             py::arg("S_out").noconvert(), py::arg("nthreads"));
    m.def("popcount_limit", &popcount_limit, py::arg("keys").noconvert(), py::arg("q").noconvert(),
          py::arg("isa"), py::arg("nthreads"),
          "Machine-limit micro-kernel: XOR+popcount of q (nq, 4) against keys (n, 4) (tile "
          "layout) with a running minimum; returns the sum of the minima.");
    m.def("popcount_limit_isas", &fastattn::popcount_limit_isas,
          "The ISAs popcount_limit runs on this CPU, fastest first.");
    m.def("gru_scan_fwd", &gru_scan_fwd, py::arg("xp").noconvert(),
          py::arg("lengths").noconvert(), py::arg("w_hh").noconvert(),
          py::arg("b_hh").noconvert(), py::arg("h0").noconvert(), py::arg("out").noconvert(),
          py::arg("nthreads"), "GRU recurrence over xp = x W_ih^T + b_ih; every state in place.");
    m.def("gru_scan_bwd", &gru_scan_bwd, py::arg("d_out").noconvert(),
          py::arg("xp").noconvert(), py::arg("out").noconvert(), py::arg("lengths").noconvert(),
          py::arg("w_hh").noconvert(), py::arg("b_hh").noconvert(), py::arg("h0").noconvert(),
          py::arg("dxp").noconvert(), py::arg("dhp").noconvert(), py::arg("dh0").noconvert(),
          py::arg("nthreads"),
          "Backward of gru_scan_fwd (gates recomputed from out): d(xp), d(W_hh h + b_hh), dh0.");
    m.def("cpu_features", &cpu_features,
          "CPU features the run-time dispatch sees, the code path each kernel family runs, and "
          "under \"ran\" how many calls of each family ran each path.");
}
