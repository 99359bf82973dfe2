// fastdf._cpu: per-frame AdaLN (adaln_modulate) and gated residuals, forward and backward,
// for contiguous fp32 tensors.
//
// Why an own kernel: eager PyTorch runs modulate as LayerNorm plus two broadcast passes, and
// its backward as ~5 passes over [B, T, C] (the norm's backward, dy * (1 + scale), dy * n
// and two frame sums); each pass re-reads rows that no longer sit in cache. Here every row
// is read once per direction and worked on while it is in L1: the forward computes the
// statistics and writes y in one visit, the backward accumulates the frame sums and writes
// dx in one visit. Frame sums (d shift, d scale, d gate) and the affine gradients (sums over
// every row) round once per 8 rows into fp64 (frame_sums), with cuts fixed by the shape: the
// bits do not depend on the thread count.
//
// Layout: x, y, grad, dx [B, T, C]; tables [B, F, C] with T % F == 0, token t in frame
// t / (T / F); weight, bias [C] or absent (null); mean, rstd [B, T] fp32.

#include "common.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t CHUNK = 64;          // rows per frame-sum chunk

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")

struct Shape {
    int64_t B, T, F, C;
    int64_t S() const { return T / F; }
};

// A [B, F, C] input table with strides (sb, sf, 1): chunk(k, dim=-1) views of one
// modulation tensor are the common case.
struct Table {
    const float* p;
    int64_t sb, sf;
};

// Walks flat token rows r = b T + t in order, tracking the frame (no division a row: with
// C = 128, a row is ~8 vector steps, and two 64-bit divisions were a visible share).
struct Cursor {
    int64_t T, S, t, k, b, f;
    Cursor(const Shape& s, int64_t r)
        : T(s.T), S(s.S()), t(r % s.T), k(r % s.T % s.S()), b(r / s.T), f(r % s.T / s.S()) {}
    const float* row(const Table& tb) const { return tb.p + b * tb.sb + f * tb.sf; }
    void next() {
        if (++k == S) {
            k = 0;
            ++f;
        }
        if (++t == T) {
            t = 0;
            f = 0;
            ++b;
        }
    }
};

// ---------------------------------------------------------------- forward

struct ModulateFwd {
    const float* x;
    Table shift, scale;
    const float *w, *b;
    float *y, *mean, *rstd;
    Shape s;
    bool rms;
    float eps;
};

void modulate_rows(const ModulateFwd& a, int64_t lo, int64_t hi) {
    const int64_t C = a.s.C;
    for (Cursor at(a.s, lo); lo < hi; ++lo, at.next()) {
        const int64_t r = lo;
        const float* x = a.x + r * C;
        const float *sh = at.row(a.shift), *sc = at.row(a.scale);
        float* y = a.y + r * C;
        float mean = 0.0f;
        if (!a.rms) {  // two passes over the row (it is in L1): the reference's mean, then variance
            v16 s0 = {}, s1 = {};
            int64_t c = 0;
            for (; c + 32 <= C; c += 32) {
                s0 += load(x + c);
                s1 += load(x + c + 16);
            }
            for (; c < C; c += 16) s0 += load_n(x + c, lanes(C - c));
            mean = hsum(s0 + s1) / static_cast<float>(C);
        }
        const v16 vm = splat(mean);
        v16 q0 = {}, q1 = {};
        int64_t c = 0;
        for (; c + 32 <= C; c += 32) {
            const v16 d0 = load(x + c) - vm, d1 = load(x + c + 16) - vm;
            q0 += d0 * d0;
            q1 += d1 * d1;
        }
        for (; c < C; c += 16) {
            const __mmask16 m = lanes(C - c);
            const v16 d = keep(load_n(x + c, m) - vm, m);
            q0 += d * d;
        }
        const float rstd = 1.0f / std::sqrt(hsum(q0 + q1) / static_cast<float>(C) + a.eps);
        const v16 vr = splat(rstd);
        for (c = 0; c < C; c += 16) {
            const __mmask16 m = lanes(C - c);
            v16 n = (load_n(x + c, m) - vm) * vr;
            if (a.w) n *= load_n(a.w + c, m);
            if (a.b) n += load_n(a.b + c, m);
            store_n(y + c, n * (1.0f + load_n(sc + c, m)) + load_n(sh + c, m), m);
        }
        if (a.mean) a.mean[r] = mean;
        if (a.rstd) a.rstd[r] = rstd;
    }
}

void gated_rows(const float* x, const float* y, const Table& gate, float* out, const Shape& s, int64_t lo,
                int64_t hi) {
    const int64_t C = s.C;
    for (Cursor at(s, lo); lo < hi; ++lo, at.next()) {
        const int64_t r = lo;
        const float* g = at.row(gate);
        const int64_t o = r * C;
        for (int64_t c = 0; c < C; c += 16) {
            const __mmask16 m = lanes(C - c);
            store_n(out + o + c, load_n(x + o + c, m) + load_n(g + c, m) * load_n(y + o + c, m), m);
        }
    }
}

// ---------------------------------------------------------------- backward

struct ModulateBwd {
    const float *g, *x;
    Table scale;
    const float *w, *b, *mean, *rstd;
    float* dx;  // may be null (x needs no gradient)
    Shape s;
    bool rms;
};

// One row of modulate's backward. With xh = (x - mean) rstd, n = xh w + b, dn = g (1 + scale):
// d shift += g, d scale += g n, d w += dn xh, d b += dn, and with dxh = dn w,
// dx = rstd (dxh - mean(dxh) - xh mean(dxh xh)) (no mean(dxh) term for RMSNorm).
// dsh / dsc / dw / db: the running sums (null when not wanted); with Assign (one token per
// frame) dsh / dsc are the row's own outputs, written instead of added to.
template <bool Assign>
INLINE void modulate_backward_row(const ModulateBwd& a, int64_t r, const float* sc, float* dsh, float* dsc, float* dw,
                                  float* db) {
    const int64_t C = a.s.C;
    const float *g = a.g + r * C, *x = a.x + r * C;
    const v16 vm = splat(a.mean[r]), vr = splat(a.rstd[r]);
    v16 s1 = {}, s2 = {};
    for (int64_t c = 0; c < C; c += 16) {
        const __mmask16 m = lanes(C - c);
        const v16 gv = load_n(g + c, m);  // 0 in masked lanes: every product below is 0 there
        const v16 xh = (load_n(x + c, m) - vm) * vr;
        v16 dn = gv * (1.0f + load_n(sc + c, m));
        if (dsh) store_n(dsh + c, Assign ? gv : load_n(dsh + c, m) + gv, m);
        if (dsc) {
            v16 n = xh;
            if (a.w) n *= load_n(a.w + c, m);
            if (a.b) n += load_n(a.b + c, m);
            store_n(dsc + c, Assign ? gv * n : load_n(dsc + c, m) + gv * n, m);
        }
        if (dw) store_n(dw + c, load_n(dw + c, m) + dn * xh, m);
        if (db) store_n(db + c, load_n(db + c, m) + dn, m);
        if (a.w) dn *= load_n(a.w + c, m);
        s1 += dn;
        s2 += dn * xh;
    }
    if (!a.dx) return;
    const float inv_c = 1.0f / static_cast<float>(C);
    const v16 m1 = splat(a.rms ? 0.0f : hsum(s1) * inv_c), m2 = splat(hsum(s2) * inv_c);
    float* dx = a.dx + r * C;
    for (int64_t c = 0; c < C; c += 16) {
        const __mmask16 m = lanes(C - c);
        const v16 xh = (load_n(x + c, m) - vm) * vr;
        v16 dxh = load_n(g + c, m) * (1.0f + load_n(sc + c, m));
        if (a.w) dxh *= load_n(a.w + c, m);
        store_n(dx + c, vr * (dxh - m1 - xh * m2), m);
    }
}

// Rows [lo, hi); with Assign the table pointers are row lo's outputs and advance by C a row.
template <bool Assign>
void modulate_backward_rows(const ModulateBwd& a, int64_t lo, int64_t hi, float* dsh, float* dsc, float* dw,
                            float* db) {
    const int64_t step = Assign ? a.s.C : 0;
    Cursor at(a.s, lo);
    for (int64_t r = lo; r < hi; ++r, at.next(), dsh = dsh ? dsh + step : dsh, dsc = dsc ? dsc + step : dsc)
        modulate_backward_row<Assign>(a, r, at.row(a.scale), dsh, dsc, dw, db);
}

template <bool Assign>
INLINE void gated_backward_row(const float* g, const float* y, const float* gt, float* dy, const Shape& s,
                               int64_t r, float* dgate) {
    const int64_t C = s.C, o = r * C;
    for (int64_t c = 0; c < C; c += 16) {
        const __mmask16 m = lanes(C - c);
        const v16 gv = load_n(g + o + c, m);
        if (dy) store_n(dy + o + c, gv * load_n(gt + c, m), m);
        if (dgate) {
            const v16 p = gv * load_n(y + o + c, m);
            store_n(dgate + c, Assign ? p : load_n(dgate + c, m) + p, m);
        }
    }
}

template <bool Assign>
void gated_backward_rows(const float* g, const float* y, const Table& gate, float* dy, const Shape& s, int64_t lo,
                         int64_t hi, float* dgate) {
    const int64_t step = Assign ? s.C : 0;
    Cursor at(s, lo);
    for (int64_t r = lo; r < hi; ++r, at.next(), dgate = dgate ? dgate + step : dgate)
        gated_backward_row<Assign>(g, y, at.row(gate), dy, s, r, dgate);
}

// dst += src (fp64), src = 0: a group's fp32 sums into its chunk's.
void fold(float* src, double* dst, int64_t n) {
    for (int64_t j = 0; j < n; ++j) {
        dst[j] += static_cast<double>(src[j]);
        src[j] = 0.0f;
    }
}

#pragma GCC pop_options

// Frame sums with row work: every frame's S rows are cut into chunks of <= CHUNK rows (the
// unit of work), each chunk into groups of <= GROUP rows. rows(lo, hi, sums, aff) adds a
// group's rows into fp32 sums (the `tables` wanted, each [C] or null, and `affine` [C]
// vectors at aff); after each group they are added into the chunk's fp64 sums. A chunk's
// table sums go straight to the output when its frame has one chunk, else to fp64 partials
// added in order after; its affine sums go to the fp64 total of its slot (chunk % SLOTS),
// slots being added in order at the end. Fixed cuts: the bits do not depend on the thread
// count, and the sums round once per GROUP rows instead of once per row. One token per frame
// and no affine sums: rows(std::true_type, ...) writes each row's table rows itself.
template <class Rows>
void frame_sums(const Shape& s, int tables, float* const* out, int affine, float* const* affine_out, int threads,
                Rows rows) {
    constexpr int64_t SLOTS = 16, GROUP = 8;
    const int64_t S = s.S(), C = s.C, frames = s.B * s.F, width = (tables + affine) * C;
    if (S == 1 && !affine) {
        rows_parallel(s.B * s.T, s.C, threads, [&](int64_t lo, int64_t hi) {
            float* own[4] = {};
            for (int i = 0; i < tables; ++i) own[i] = out[i] ? out[i] + lo * C : nullptr;
            rows(std::true_type{}, lo, hi, own, nullptr);
        });
        return;
    }
    const int64_t per_frame = (S + CHUNK - 1) / CHUNK, chunks = frames * per_frame;
    std::vector<double> partial(per_frame > 1 ? chunks * tables * C : 0);
    std::vector<double> totals(affine ? SLOTS * affine * C : 0, 0.0);
    const int parts = static_cast<int>(std::min<int64_t>(parts_for(s.B * s.T * C, threads), chunks));
    // Chunks of one slot run on one thread (contiguous ranges of slots), so no two threads
    // add to one slot's total.
    const int64_t team = affine ? std::min<int64_t>(parts, SLOTS) : parts;
#pragma omp parallel num_threads(static_cast<int>(team)) if (team > 1)
    {
        std::vector<float> group(width, 0.0f);
        std::vector<double> acc(width);
        float* sums[4] = {};
        for (int i = 0; i < tables; ++i) sums[i] = out[i] ? group.data() + i * C : nullptr;
        float* aff = affine ? group.data() + tables * C : nullptr;
        const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
        for (int64_t k = 0; k < chunks; ++k) {
            if ((affine ? (k % SLOTS) * n / SLOTS : k * n / chunks) != t) continue;
            const int64_t bf = k / per_frame, part = k % per_frame;
            const int64_t first = bf / s.F * s.T + bf % s.F * S + part * CHUNK;
            const int64_t last = first + std::min(CHUNK, S - part * CHUNK);
            std::fill(acc.begin(), acc.end(), 0.0);
            for (int64_t lo = first; lo < last; lo += GROUP) {
                rows(std::false_type{}, lo, std::min(lo + GROUP, last), sums, aff);
                fold(group.data(), acc.data(), width);
            }
            for (int i = 0; i < tables; ++i) {
                if (!out[i]) continue;
                const double* src = acc.data() + i * C;
                if (per_frame == 1)
                    for (int64_t j = 0; j < C; ++j) out[i][bf * C + j] = static_cast<float>(src[j]);
                else
                    std::copy(src, src + C, partial.data() + (k * tables + i) * C);
            }
            if (affine) {
                double* tot = totals.data() + (k % SLOTS) * affine * C;
                for (int64_t j = 0; j < affine * C; ++j) tot[j] += acc[tables * C + j];
            }
        }
    }
    if (per_frame > 1) {
#pragma omp parallel for schedule(static) num_threads(parts) if (parts > 1)
        for (int64_t bf = 0; bf < frames; ++bf)
            for (int i = 0; i < tables; ++i) {
                if (!out[i]) continue;
                for (int64_t j = 0; j < C; ++j) {
                    double v = 0.0;
                    for (int64_t p = 0; p < per_frame; ++p) v += partial[((bf * per_frame + p) * tables + i) * C + j];
                    out[i][bf * C + j] = static_cast<float>(v);
                }
            }
    }
    for (int i = 0; i < affine; ++i) {
        if (!affine_out[i]) continue;
        for (int64_t j = 0; j < C; ++j) {
            double v = 0.0;
            for (int64_t k = 0; k < SLOTS; ++k) v += totals[(k * affine + i) * C + j];
            affine_out[i][j] = static_cast<float>(v);
        }
    }
}

void check(const char* name, int64_t B, int64_t T, int64_t F, int64_t C) {
    const std::string who = std::string("fastdf._cpu.") + name;
    if (!has_avx512()) throw std::runtime_error(who + ": needs a CPU with AVX-512 (F, BW, DQ, VL)");
    if (B < 1 || T < 1 || C < 1 || F < 1 || T % F != 0)
        throw std::invalid_argument(who + ": needs B, T, C >= 1 and T a multiple of F >= 1");
}

template <class T>
T* ptr(uintptr_t p) {
    return reinterpret_cast<T*>(p);
}

// A table argument from Python: (address, batch stride, frame stride), in elements.
Table table(py::tuple t) {
    if (t.size() != 3) throw std::invalid_argument("fastdf._cpu: a table is (address, batch stride, frame stride)");
    return Table{ptr<const float>(t[0].cast<uintptr_t>()), t[1].cast<int64_t>(), t[2].cast<int64_t>()};
}

}  // namespace

void add_adaln(py::module_& m) {
    m.def(
        "modulate_forward",
        [](uintptr_t x, py::tuple shift, py::tuple scale, uintptr_t w, uintptr_t b, uintptr_t y, uintptr_t mean,
           uintptr_t rstd, int64_t B, int64_t T, int64_t F, int64_t C, bool rms, float eps, int threads) {
            check("modulate_forward", B, T, F, C);
            const ModulateFwd a{ptr<const float>(x), table(shift), table(scale), ptr<const float>(w),
                                ptr<const float>(b), ptr<float>(y), ptr<float>(mean), ptr<float>(rstd),
                                Shape{B, T, F, C}, rms, eps};
            py::gil_scoped_release release;
            rows_parallel(a.s.B * a.s.T, a.s.C, threads, [&](int64_t lo, int64_t hi) { modulate_rows(a, lo, hi); });
        },
        "adaln_modulate's forward: y = N(x) (1 + scale) + shift per frame, and mean / rstd (either may be 0: "
        "not written). x, y, weight, bias (0 when absent) contiguous fp32; shift / scale fp32 tables given as "
        "(address, batch stride, frame stride).");
    m.def(
        "modulate_backward",
        [](uintptr_t g, uintptr_t x, py::tuple scale, uintptr_t w, uintptr_t b, uintptr_t mean, uintptr_t rstd,
           uintptr_t dx, uintptr_t dshift, uintptr_t dscale, uintptr_t dw, uintptr_t db, int64_t B, int64_t T,
           int64_t F, int64_t C, bool rms, int threads) {
            check("modulate_backward", B, T, F, C);
            if ((dw && !w) || (db && !b))
                throw std::invalid_argument("fastdf._cpu.modulate_backward: an affine gradient without its tensor");
            const ModulateBwd a{ptr<const float>(g), ptr<const float>(x), table(scale), ptr<const float>(w),
                                ptr<const float>(b), ptr<const float>(mean), ptr<const float>(rstd), ptr<float>(dx),
                                Shape{B, T, F, C}, rms};
            float* tables[2] = {ptr<float>(dshift), ptr<float>(dscale)};
            float* affine[2] = {ptr<float>(dw), ptr<float>(db)};
            const int n_affine = (dw || db) ? 2 : 0;
            py::gil_scoped_release release;
            frame_sums(a.s, 2, tables, n_affine, affine, threads,
                       [&](auto assign, int64_t lo, int64_t hi, float* const* sums, float* aff) {
                           modulate_backward_rows<decltype(assign)::value>(
                               a, lo, hi, sums[0], sums[1], aff && affine[0] ? aff : nullptr,
                               aff && affine[1] ? aff + C : nullptr);
                       });
        },
        "adaln_modulate's backward from the forward's mean / rstd: writes dx, d shift, d scale (contiguous "
        "[B, F, C]), d weight, d bias (each may be 0: not wanted). Contiguous fp32; scale a table tuple.");
    m.def(
        "gated_forward",
        [](uintptr_t x, uintptr_t y, py::tuple gate, uintptr_t out, int64_t B, int64_t T, int64_t F, int64_t C,
           int threads) {
            check("gated_forward", B, T, F, C);
            const Shape s{B, T, F, C};
            const Table gt = table(gate);
            py::gil_scoped_release release;
            rows_parallel(s.B * s.T, s.C, threads, [&](int64_t lo, int64_t hi) {
                gated_rows(ptr<const float>(x), ptr<const float>(y), gt, ptr<float>(out), s, lo, hi);
            });
        },
        "gated_residual's forward: out = x + gate y per frame. x, y, out contiguous fp32; gate a table tuple.");
    m.def(
        "gated_backward",
        [](uintptr_t g, uintptr_t y, py::tuple gate, uintptr_t dy, uintptr_t dgate, int64_t B, int64_t T,
           int64_t F, int64_t C, int threads) {
            check("gated_backward", B, T, F, C);
            const Shape s{B, T, F, C};
            const Table gt = table(gate);
            float* tables[1] = {ptr<float>(dgate)};
            py::gil_scoped_release release;
            frame_sums(s, 1, tables, 0, nullptr, threads, [&](auto assign, int64_t lo, int64_t hi, float* const* sums,
                                                              float*) {
                gated_backward_rows<decltype(assign)::value>(ptr<const float>(g), ptr<const float>(y), gt, ptr<float>(dy), s, lo, hi, sums[0]);
            });
        },
        "gated_residual's backward: d y = grad gate, d gate = the frame sums of grad y (contiguous [B, F, C]); "
        "either may be 0 (not wanted). Contiguous fp32; gate a table tuple.");
}
