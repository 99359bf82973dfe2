// fastdf._cpu: the CPU forward and backward of df_attention for short key ranges (fp32).
//
// Why an own kernel: on the CPU, fastdf's attention otherwise runs aten's flash kernel (the
// one SDPA runs) and then reads the whole output once to check it, because that kernel
// multiplies masked probabilities (0) with values it cannot see (0 x NaN = NaN) and
// accumulates unnormalised value sums that can overflow. This kernel never touches a key a
// row cannot see and sums normalised weights, so its result needs no check: a row is NaN
// exactly when it sees a non-finite input, as in the reference. It also skips aten's dense
// mask, and per-head overheads that dominate short sequences (16-token heads cost aten
// ~3.4 us each).
//
// Layout: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], out like q, any strides (in elements)
// except a contiguous last dim; lse [B, Hq, Tq]. Query head h reads K/V head h / (Hq / Hkv).
// ranges [Tq, 4] int32: the keys row i sees are [lo0, hi0) and [lo1, hi1), lo1 >= hi0
// (sink frames, then the window; the second range may be empty).
//
// Work: one (batch, kv head) per task, OpenMP over tasks (the process's libgomp: torch's
// wheel ships it under the soname this links to, so both share one thread pool); the
// forward also cuts a pair's rows when pairs are fewer than threads. Per task,
// K is transposed once into a [D, Tk] scratch (16x16 register transposes) so scores come
// from broadcast-FMAs over 16 keys at a time, 8 query rows per block (8 independent FMA
// chains); softmax per row in registers (scalar stores followed by vector loads stall store
// forwarding); P @ V for 4 rows per V row load (D <= 64), else per row with 1-8 accumulator
// sets (8 FMA chains in flight). The backward reuses those pieces (see attend_head_backward).
// No torch headers: pointers and sizes come from fastdf/ops/attention.py.

#include "common.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

// o rows r in [lo, hi) = lerp(o_b, o_a, w[r]) from the nearer end, as torch.lerp computes it.
#define FASTDF_BLEND_BODY                                                          \
    for (int64_t r = lo; r < hi; ++r) {                                            \
        const float wr = w[r];                                                     \
        const float* xa = oa + r * D;                                              \
        const float* xb = ob + r * D;                                              \
        float* y = o + r * D;                                                      \
        if (wr < 0.5f) {                                                           \
            for (int64_t j = 0; j < D; ++j) y[j] = xb[j] + wr * (xa[j] - xb[j]);   \
        } else {                                                                   \
            const float wc = 1.0f - wr;                                            \
            for (int64_t j = 0; j < D; ++j) y[j] = xa[j] - (xa[j] - xb[j]) * wc;   \
        }                                                                          \
    }

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")

constexpr int MAX_KEYS = 512;  // keys per head this kernel takes (the scratch per thread)
constexpr int MAX_DIM = 256;
constexpr int ROWS = 8;         // query rows per score block
// |lse| beyond which the backward recomputes a row's max and sum instead of exp(s - lse)
// (see attend_head_backward)
constexpr float SHARP_LSE = 16.0f;

// exp_reduced and vexp (e^x on 16 lanes): common.h.

// vexp for the softmax's x = s - max <= 0 (or -inf, or NaN), with vexp's bits there and
// ~25% fewer instructions (vexp's clamps and selects, four compare + blend pairs, are one
// compare mask here). Lanes x < -104 (masked keys: -inf) come out of scalef's zeroing mask
// as 0, vexp's value there, without computing 2^n: a scalef whose result is subnormal takes
// a microcode assist (~70 ns a vector here, 20x the whole exponential), which computing
// those lanes and selecting 0 afterwards had paid on every masked key. NaN passes the
// unordered compare and stays NaN. Not for x > 88.7 (vexp saturates to inf there).
// `subnormal` gathers the lanes whose result is subnormal (the forward's sharp rows).
INLINE v16 vexp_nonpositive(v16 x, __mmask16& subnormal) {
    const __mmask16 keep = _mm512_cmp_ps_mask((__m512)x, (__m512)splat(-104.0f), _CMP_NLT_UQ);
    v16 nf;
    const v16 p = exp_reduced(x, nf);
    const __mmask16 tiny = _mm512_mask_cmp_ps_mask(keep, (__m512)nf, (__m512)splat(-126.0f), _CMP_LT_OQ);
    if (__builtin_expect(tiny == 0, 1)) return (v16)_mm512_maskz_scalef_ps(keep, (__m512)p, (__m512)nf);
    subnormal |= tiny;
    // Subnormal results (x in (-104, -87.3): probabilities below 2^-126, rows whose scores
    // span more than ~87) without the assist: p 2^(n + 149) is a normal number (exact: a
    // power-of-two scaling), and its round-to-nearest-even integer k is the subnormal
    // k 2^-149 that scalef would round to, as a bit pattern (k = 2^23: the least normal).
    const __m512 up = _mm512_maskz_scalef_ps(tiny, (__m512)p, (__m512)(nf + 149.0f));
    const __m512i k = _mm512_maskz_cvt_roundps_epi32(tiny, up, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 normal = _mm512_maskz_scalef_ps(keep & ~tiny, (__m512)p, (__m512)nf);
    return (v16)_mm512_mask_mov_ps(normal, tiny, _mm512_castsi512_ps(k));
}

INLINE v16 vexp_nonpositive(v16 x) {
    __mmask16 subnormal = 0;
    return vexp_nonpositive(x, subnormal);
}

typedef int32_t m16 __attribute__((vector_size(64)));

// 16 x 16 transpose of r[0..16) in registers: four rounds of two-source permutes, each
// swapping the off-diagonal blocks of size 8, 4, 2, 1.
INLINE void transpose16(v16* r) {
#define FASTDF_ROUND(B, LO, HI)                                                  \
    for (int i = 0; i < 16; ++i)                                                 \
        if (!(i & B)) {                                                          \
            v16 a = r[i], c = r[i + B];                                          \
            r[i] = __builtin_shuffle(a, c, (m16)LO);                             \
            r[i + B] = __builtin_shuffle(a, c, (m16)HI);                         \
        }
    FASTDF_ROUND(8, ((m16){0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}),
                 ((m16){8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}))
    FASTDF_ROUND(4, ((m16){0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27}),
                 ((m16){4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31}))
    FASTDF_ROUND(2, ((m16){0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29}),
                 ((m16){2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31}))
    FASTDF_ROUND(1, ((m16){0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}),
                 ((m16){1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}))
#undef FASTDF_ROUND
}

const i16v IOTA = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// Lanes of keys c..c+15 that a row with ranges rg ([lo0, hi0) and [lo1, hi1)) sees.
INLINE i16v in_ranges(int c, const int32_t* rg) {
    const i16v jv = IOTA + c;
    return ((jv >= rg[0]) & (jv < rg[1])) | ((jv >= rg[2]) & (jv < rg[3]));
}

struct Args {
    const float *q, *k, *v;
    float *out, *lse;
    int B, Hq, Hkv, Tq, Tk, D;
    int64_t qs[3], ks[3], vs[3], os[3], ls[3];  // strides of (batch, head, token)
    const int32_t* ranges;
    float scale;
};

// out_row = sum over the row's ranges of w[j] * v[j], D = 16 * ND, with SETS interleaved
// accumulator sets (independent FMA chains), summed at the end.
template <int ND>
INLINE void weighted_rows(const float* w, const float* vb, int64_t vst, const int32_t* rg, float* orow) {
    constexpr int SETS = ND >= 8 ? 1 : 8 / ND;
    v16 acc[SETS][ND];
    for (int s = 0; s < SETS; ++s)
        for (int c = 0; c < ND; ++c) acc[s][c] = (v16){};
    for (int seg = 0; seg < 2; ++seg) {
        const int lo = rg[2 * seg], hi = rg[2 * seg + 1];
        int j = lo;
        for (; j + SETS <= hi; j += SETS)
            for (int s = 0; s < SETS; ++s) {
                const float* vr = vb + (j + s) * vst;
                for (int c = 0; c < ND; ++c) acc[s][c] += w[j + s] * load(vr + 16 * c);
            }
        for (; j < hi; ++j) {
            const float* vr = vb + j * vst;
            for (int c = 0; c < ND; ++c) acc[0][c] += w[j] * load(vr + 16 * c);
        }
    }
    for (int s = 1; s < SETS; ++s)
        for (int c = 0; c < ND; ++c) acc[0][c] += acc[s][c];
    for (int c = 0; c < ND; ++c) store(orow + 16 * c, acc[0][c]);
}

// P @ V for R rows at once (R x ND <= 16 accumulators): each V row is loaded once for the
// R rows. w: the first row's weights, the others at MAX_KEYS steps (one base register:
// constant offsets); rg: the first row's ranges, 4 ints a row. Per range, the keys all R
// rows see run blocked; each row's own remainder (the nested ranges of token-causal rows
// differ by a few keys) runs per row. Never a key a row cannot see: its weight is 0 but its
// value may be NaN.
template <int R, int ND>
INLINE void weighted_rows_n(const float (*w)[MAX_KEYS], const float* vb, int64_t vst, const int32_t* rg, float* ob,
                            int64_t ost) {
    v16 acc[R][ND];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < ND; ++c) acc[r][c] = (v16){};
    for (int seg = 0; seg < 2; ++seg) {
        int lo = 0, hi = 1 << 30;
        for (int r = 0; r < R; ++r) {
            lo = std::max(lo, rg[4 * r + 2 * seg]);
            hi = std::min(hi, rg[4 * r + 2 * seg + 1]);
        }
        if (lo >= hi) lo = hi = 1 << 30;  // nothing shared: every row on its own below
        for (int j = lo; j < hi; ++j) {
            const float* vr = vb + j * vst;
            v16 vv[ND];
            for (int c = 0; c < ND; ++c) vv[c] = load(vr + 16 * c);
            for (int r = 0; r < R; ++r)
                for (int c = 0; c < ND; ++c) acc[r][c] += w[r][j] * vv[c];
        }
        for (int r = 0; r < R; ++r) {
            const int rlo = rg[4 * r + 2 * seg], rhi = rg[4 * r + 2 * seg + 1];
            for (int j = rlo; j < rhi; ++j) {
                if (j == lo) {  // skip the shared part
                    j = hi - 1;
                    continue;
                }
                const float* vr = vb + j * vst;
                for (int c = 0; c < ND; ++c) acc[r][c] += w[r][j] * load(vr + 16 * c);
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < ND; ++c) store(ob + r * ost + 16 * c, acc[r][c]);
}

// P @ V for one row, D = 16 * nd (nd <= 8), dispatched to the unrolled body (inlined into
// each ISA clone of the caller).
INLINE void weighted_rows_any(int nd, const float* w, const float* vb, int64_t vst, const int32_t* rg,
                              float* orow) {
    switch (nd) {
        case 1: weighted_rows<1>(w, vb, vst, rg, orow); break;
        case 2: weighted_rows<2>(w, vb, vst, rg, orow); break;
        case 3: weighted_rows<3>(w, vb, vst, rg, orow); break;
        case 4: weighted_rows<4>(w, vb, vst, rg, orow); break;
        case 5: weighted_rows<5>(w, vb, vst, rg, orow); break;
        case 6: weighted_rows<6>(w, vb, vst, rg, orow); break;
        case 7: weighted_rows<7>(w, vb, vst, rg, orow); break;
        default: weighted_rows<8>(w, vb, vst, rg, orow); break;
    }
}

// dst [D, KP] = the transpose of T rows of D (row stride st), zero past T.
INLINE void transpose_keys(const float* src, int64_t st, int T, int D, int KP, float* dst) {
    for (int j0 = 0; j0 < KP; j0 += 16)
        for (int d0 = 0; d0 < D; d0 += 16) {
            v16 r[16];
            for (int j = 0; j < 16; ++j) r[j] = j0 + j < T ? load(src + (j0 + j) * st + d0) : (v16){};
            transpose16(r);
            for (int d = 0; d < 16; ++d) store(dst + (d0 + d) * KP + j0, r[d]);
        }
}

// dst rows j < T (row stride st) = column j of src [D, KP].
INLINE void untranspose_keys(const float* src, int KP, int T, int D, float* dst, int64_t st) {
    for (int j0 = 0; j0 < T; j0 += 16)
        for (int d0 = 0; d0 < D; d0 += 16) {
            v16 r[16];
            for (int d = 0; d < 16; ++d) r[d] = load(src + (d0 + d) * KP + j0);
            transpose16(r);
            for (int j = 0; j < 16 && j0 + j < T; ++j) store(dst + (j0 + j) * st + d0, r[j]);
        }
}

// rows[r] = row i0 + r of src (row stride st) for a block's rows r < ROWS (rows past nr
// repeat the last one).
INLINE void block_rows(const float* src, int64_t st, int i0, int nr, const float** rows) {
    for (int r = 0; r < ROWS; ++r) rows[r] = src + (i0 + std::min(r, nr - 1)) * st;
}

// s[r][c] = scale * sum_d x[r][d] * yT[d][c] for the block's ROWS rows and keys c below
// kend rounded up to 16 (yT [D, KP], zero past the keys). 8 rows x 32 keys a step: 16
// accumulators, and per d two vector loads and 8 broadcasts for 16 FMAs (with 16 keys a
// step, 9 loads for 8 FMAs). One product per call, so its 8 row pointers stay in registers
// (the backward's fused scores + dP loop had 16, which the compiler reloaded from the stack
// at every FMA: measured ~20% of the backward).
INLINE void products(const float* const* x, const float* yT, int KP, int D, int kend, float scale,
                     float (*s)[MAX_KEYS]) {
    int c = 0;
    for (; c + 32 <= kend || (c + 16 < kend && c + 32 <= KP); c += 32) {
        v16 a0[ROWS] = {}, a1[ROWS] = {};
        for (int d = 0; d < D; ++d) {
            const v16 y0 = load(yT + d * KP + c), y1 = load(yT + d * KP + c + 16);
            for (int r = 0; r < ROWS; ++r) {
                a0[r] += x[r][d] * y0;
                a1[r] += x[r][d] * y1;
            }
        }
        for (int r = 0; r < ROWS; ++r) {
            store(s[r] + c, a0[r] * scale);
            store(s[r] + c + 16, a1[r] * scale);
        }
    }
    for (; c < kend; c += 16) {
        v16 acc[ROWS] = {};
        for (int d = 0; d < D; ++d) {
            const v16 y = load(yT + d * KP + c);
            for (int r = 0; r < ROWS; ++r) acc[r] += x[r][d] * y;
        }
        for (int r = 0; r < ROWS; ++r) store(s[r] + c, acc[r] * scale);
    }
}

// acc[d][c] += sum_r x[r][d] * w[r][c] over the block's nr rows, keys c below kend (a
// multiple of 16), acc [D, KP]: 32 keys a step, the rows' weights in 16 registers over d.
INLINE void accumulate_transposed(const float* const* x, float (*w)[MAX_KEYS], int nr, int D, int kend, int KP,
                                  float* acc) {
    int c = 0;
    for (; c + 32 <= kend; c += 32) {
        v16 w0[ROWS], w1[ROWS];
        for (int r = 0; r < ROWS; ++r) {
            w0[r] = r < nr ? load(w[r] + c) : (v16){};
            w1[r] = r < nr ? load(w[r] + c + 16) : (v16){};
        }
        for (int d = 0; d < D; ++d) {
            v16 e0 = {}, e1 = {}, o0 = {}, o1 = {};
            for (int r = 0; r < ROWS; r += 2) {
                e0 += x[r][d] * w0[r];
                e1 += x[r][d] * w1[r];
                o0 += x[r + 1][d] * w0[r + 1];
                o1 += x[r + 1][d] * w1[r + 1];
            }
            float* row = acc + d * KP + c;
            store(row, load(row) + (e0 + o0));
            store(row + 16, load(row + 16) + (e1 + o1));
        }
    }
    for (; c < kend; c += 16) {
        v16 wv[ROWS];
        for (int r = 0; r < ROWS; ++r) wv[r] = r < nr ? load(w[r] + c) : (v16){};
        for (int d = 0; d < D; ++d) {  // four partial sums: short dependency chains
            v16 e[4] = {};
            for (int r = 0; r < ROWS; ++r) e[r % 4] += x[r][d] * wv[r];
            float* row = acc + d * KP + c;
            store(row, load(row) + ((e[0] + e[1]) + (e[2] + e[3])));
        }
    }
}

INLINE bool all_finite(const float* row, int ND) {
    v16 bad = {};
    for (int c = 0; c < ND; ++c) {
        const v16 o = load(row + 16 * c);
        bad += o - o;  // 0 where finite, NaN otherwise
    }
    return all_zero(bad);
}

// out rows r < nr (row stride ost) = w[r] @ the rows of vb over each row's ranges.
INLINE void weighted_block(float (*w)[MAX_KEYS], int nr, const int32_t* ranges, const float* vb, int64_t vst,
                           float* ob, int64_t ost, int ND) {
    int r0 = 0;
    if (ND <= 2)  // eight rows share each V row load: 8 x ND accumulators
        for (; r0 + 8 <= nr; r0 += 8) {
            if (ND == 1)
                weighted_rows_n<8, 1>(w + r0, vb, vst, ranges + 4 * r0, ob + r0 * ost, ost);
            else
                weighted_rows_n<8, 2>(w + r0, vb, vst, ranges + 4 * r0, ob + r0 * ost, ost);
        }
    if (ND <= 4)  // four rows share each V row load: 4 x ND accumulators
        for (; r0 + 4 <= nr; r0 += 4) {
            const int32_t* rg = ranges + 4 * r0;
            float* o = ob + r0 * ost;
            switch (ND) {
                case 1: weighted_rows_n<4, 1>(w + r0, vb, vst, rg, o, ost); break;
                case 2: weighted_rows_n<4, 2>(w + r0, vb, vst, rg, o, ost); break;
                case 3: weighted_rows_n<4, 3>(w + r0, vb, vst, rg, o, ost); break;
                default: weighted_rows_n<4, 4>(w + r0, vb, vst, rg, o, ost); break;
            }
        }
    for (int r = r0; r < nr; ++r)
        for (int c0 = 0; c0 < ND; c0 += 8)  // D > 128: in parts of at most 128
            weighted_rows_any(std::min(8, ND - c0), w[r], vb + 16 * c0, vst, ranges + 4 * r, ob + r * ost + 16 * c0);
}

// One (batch, kv head): every query head of its group. Returns whether every output and
// lse element is finite; updates *absmax with max |lse|.
// Rows [row_lo, row_hi) of every query head of the group (whole blocks of ROWS).
bool attend_head(const Args& a, int b, int hk, int row_lo, int row_hi, float* kT, float (*s)[MAX_KEYS],
                 float* absmax) {
    const int D = a.D, Tq = a.Tq, Tk = a.Tk, ND = D / 16;
    const int KP = (Tk + 15) / 16 * 16;
    const float* kb = a.k + b * a.ks[0] + hk * a.ks[1];
    const float* vb = a.v + b * a.vs[0] + hk * a.vs[1];
    const int64_t kst = a.ks[2], vst = a.vs[2];
    transpose_keys(kb, kst, Tk, D, KP, kT);
    bool finite = true;
    float amax = *absmax;
    const int group = a.Hq / a.Hkv;
    for (int hq = hk * group; hq < (hk + 1) * group; ++hq) {
        const float* qb = a.q + b * a.qs[0] + hq * a.qs[1];
        float* ob = a.out + b * a.os[0] + hq * a.os[1];
        float* lb = a.lse + b * a.ls[0] + hq * a.ls[1];
        for (int i0 = row_lo; i0 < row_hi; i0 += ROWS) {
            const int nr = std::min(ROWS, Tq - i0);
            int kend = 0;  // keys any row of the block sees end before kend
            for (int r = 0; r < nr; ++r) {
                const int32_t* rg = a.ranges + 4 * (i0 + r);
                kend = std::max(kend, rg[2] < rg[3] ? rg[3] : rg[1]);
            }
            const float* qr[ROWS];
            block_rows(qb, a.qs[2], i0, nr, qr);
            products(qr, kT, KP, D, kend, a.scale, s);
            float lse_rows[ROWS];
            for (int r = 0; r < nr; ++r) {
                const int32_t* rg = a.ranges + 4 * (i0 + r);
                float* sr = s[r];
                const int end = rg[2] < rg[3] ? rg[3] : rg[1];
                // keys outside the ranges: -inf (e^-inf = 0 exactly); a select, so a NaN
                // score of a key the row cannot see is dropped, not multiplied
                // (chunks inside one range need no select; chunks between the ranges are skipped:
                // nothing reads them)
                const v16 ninf = splat(-INFINITY);
                v16 mv = ninf;
                for (int c = 0; c < end; c += 16) {
                    if (c >= rg[1] && c + 16 <= rg[2]) continue;
                    v16 sv = load(sr + c);
                    if (!((c >= rg[0] && c + 16 <= rg[1]) || (c >= rg[2] && c + 16 <= rg[3]))) {
                        sv = in_ranges(c, rg) ? sv : ninf;
                        store(sr + c, sv);
                    }
                    mv = sv > mv ? sv : mv;
                }
                // a NaN score never wins the max (the select above keeps it out of mv); e^(NaN
                // - m) then makes the row NaN, as the reference's softmax does
                const float m = hmax(mv);
                v16 lsum = {};
                __mmask16 subnormal = 0;
                for (int c = 0; c < end; c += 16) {
                    if (c >= rg[1] && c + 16 <= rg[2]) continue;
                    const v16 p = vexp_nonpositive(load(sr + c) - m, subnormal);
                    store(sr + c, p);
                    lsum += p;
                }
                const float l = hsum(lsum);
                const float inv = 1.0f / l;
                if (__builtin_expect(subnormal == 0, 1)) {
                    for (int c = 0; c < end; c += 16)
                        if (!(c >= rg[1] && c + 16 <= rg[2])) store(sr + c, load(sr + c) * inv);
                } else {
                    // A sharp row (scores spanning > 87): weights below 2^-125 are dropped, not
                    // formed: a product with a subnormal result takes a ~20x microcode assist
                    // per vector, and so would each P @ V sum it starts. What they would add
                    // to out is below 2^-125 sum |v| (fp32's own sum loses it beside any
                    // normal weight); NaN lanes pass the unordered compare.
                    const v16 floor = splat(l * 0x1p-125f);
                    for (int c = 0; c < end; c += 16)
                        if (!(c >= rg[1] && c + 16 <= rg[2])) {
                            const v16 p = load(sr + c);
                            const __mmask16 big = _mm512_cmp_ps_mask((__m512)p, (__m512)floor, _CMP_NLT_UQ);
                            store(sr + c, (v16)_mm512_maskz_mul_ps(big, (__m512)p, (__m512)splat(inv)));
                        }
                }
                lse_rows[r] = m + std::log(l);
            }
            weighted_block(s, nr, a.ranges + 4 * i0, vb, vst, ob + i0 * a.os[2], a.os[2], ND);
            for (int r = 0; r < nr; ++r) {
                const int i = i0 + r;
                const float* orow = ob + i * a.os[2];
                lb[i * a.ls[2]] = lse_rows[r];
                finite = finite && all_finite(orow, ND) && std::isfinite(lse_rows[r]);
                amax = std::max(amax, std::fabs(lse_rows[r]));
            }
        }
    }
    *absmax = amax;
    return finite;
}

struct BwdArgs {
    const float *q, *k, *v, *out, *dout, *lse;
    float *dq, *dk, *dv;
    int B, Hq, Hkv, Tq, Tk, D;
    int64_t qs[3], ks[3], vs[3], os[3], gs[3], ls[3], dqs[3], dks[3], dvs[3];
    const int32_t* ranges;
    float scale;
};

// The backward of one (batch, kv head), every query head of its group: with P = e^(S - lse)
// on each row's ranges, dP = dO V^T, dS = P (dP - rowsum(dO * O)) * scale:
// dQ = dS K, dK = dS^T Q, dV = P^T dO. Scores and dP come 8 rows x 16 keys at a time from
// the transposed K and V; dQ rows like the forward's P @ V; dK^T and dV^T 16 keys at a time
// into fp32 [D, Tk] scratch, transposed back at the end (a pair a row cannot see has P =
// dS = 0 by a select, and finite Q and dO there: a non-finite dO shows in dQ, and the
// caller rejects results with non-finite elements). A row that sees
// one key has P = 1 and dS = 0 exactly, as the reference's softmax gives. Returns whether
// every gradient element is finite.
bool attend_head_backward(const BwdArgs& a, int b, int hk, float* kT, float* vT, float* dKT, float* dVT,
                          float (*S)[MAX_KEYS], float (*P)[MAX_KEYS]) {
    const int D = a.D, Tq = a.Tq, Tk = a.Tk, ND = D / 16;
    const int KP = (Tk + 15) / 16 * 16;
    const float* kb = a.k + b * a.ks[0] + hk * a.ks[1];
    const float* vb = a.v + b * a.vs[0] + hk * a.vs[1];
    transpose_keys(kb, a.ks[2], Tk, D, KP, kT);
    transpose_keys(vb, a.vs[2], Tk, D, KP, vT);
    std::memset(dKT, 0, sizeof(float) * D * KP);
    std::memset(dVT, 0, sizeof(float) * D * KP);
    bool finite = true;
    const int group = a.Hq / a.Hkv;
    for (int hq = hk * group; hq < (hk + 1) * group; ++hq) {
        const float* qb = a.q + b * a.qs[0] + hq * a.qs[1];
        const float* gb = a.dout + b * a.gs[0] + hq * a.gs[1];
        const float* ob = a.out + b * a.os[0] + hq * a.os[1];
        const float* lb = a.lse + b * a.ls[0] + hq * a.ls[1];
        float* dqb = a.dq + b * a.dqs[0] + hq * a.dqs[1];
        for (int i0 = 0; i0 < Tq; i0 += ROWS) {
            const int nr = std::min(ROWS, Tq - i0);
            const int32_t* rgs = a.ranges + 4 * i0;
            int kend = 0;
            for (int r = 0; r < nr; ++r) kend = std::max(kend, rgs[4 * r + 2] < rgs[4 * r + 3] ? rgs[4 * r + 3] : rgs[4 * r + 1]);
            kend = (kend + 15) / 16 * 16;
            const float *qr[ROWS], *gr[ROWS];
            block_rows(qb, a.qs[2], i0, nr, qr);
            block_rows(gb, a.gs[2], i0, nr, gr);
            products(qr, kT, KP, D, kend, a.scale, S);  // scores
            products(gr, vT, KP, D, kend, 1.0f, P);      // dP = dO V^T
            for (int r = 0; r < nr; ++r) {
                const int i = i0 + r;
                const int32_t* rg = rgs + 4 * r;
                const bool one = (rg[1] - rg[0]) + (rg[3] - rg[2]) == 1;
                const float* orow = ob + i * a.os[2];
                const float* grow = gb + i * a.gs[2];
                v16 dacc = {};
                for (int c = 0; c < ND; ++c) dacc += load(grow + 16 * c) * load(orow + 16 * c);
                // P = exp(S - lse) where |lse| <= SHARP_LSE. Beyond it lse's own rounding (ulp
                // ~|lse| 2^-24) would be P's relative error, so the row's max m and sum l are
                // recomputed from S, as the forward formed them: P = exp(S - m) / l. The bound is
                // low (benign rows have |lse| ~ log Tk) because at 100 the token-causal test
                // case's dK left the 2x rule. Rows beyond 100 had left this kernel for a stable
                // recompute 2-8x slower.
                const float delta = hsum(dacc);
                float norm = 0.0f;
                const float lse = lb[i * a.ls[2]];
                const bool sharp = std::isfinite(lse) && std::fabs(lse) > SHARP_LSE && !one;
                const v16 zero = {};
                if (sharp) {
                    v16 mv = splat(-INFINITY);
                    for (int c = 0; c < kend; c += 16) {
                        const v16 sv = load(S[r] + c);
                        mv = (in_ranges(c, rg) && sv > mv) ? sv : mv;  // a NaN score never wins
                    }
                    const float m = hmax(mv);
                    v16 ls = {};
                    for (int c = 0; c < kend; c += 16) {
                        const v16 e = vexp_nonpositive(load(S[r] + c) - m);
                        const v16 ev = in_ranges(c, rg) ? e : zero;
                        store(S[r] + c, ev);  // the scores are not needed past this
                        ls += ev;
                    }
                    norm = 1.0f / hsum(ls);
                }
                for (int c = 0; c < kend; c += 16) {
                    const i16v vis = in_ranges(c, rg);
                    // (a subnormal P is flushed to 0 right after: FTZ, see attention_backward)
                    const v16 p = sharp ? load(S[r] + c) * norm : vexp_nonpositive(load(S[r] + c) - lse);
                    const v16 ds = p * (load(P[r] + c) - delta) * a.scale;
                    store(P[r] + c, vis ? (one ? splat(1.0f) : p) : zero);
                    store(S[r] + c, one ? zero : (vis ? ds : zero));
                }
            }
            weighted_block(S, nr, rgs, kb, a.ks[2], dqb + i0 * a.dqs[2], a.dqs[2], ND);  // dQ = dS K
            for (int r = 0; r < nr; ++r) finite = finite && all_finite(dqb + (i0 + r) * a.dqs[2], ND);
            // dK^T += Q^T dS, dV^T += dO^T P, in the scores' layout (16 keys per vector)
            accumulate_transposed(qr, S, nr, D, kend, KP, dKT);
            accumulate_transposed(gr, P, nr, D, kend, KP, dVT);
        }
    }
    float* dkb = a.dk + b * a.dks[0] + hk * a.dks[1];
    float* dvb = a.dv + b * a.dvs[0] + hk * a.dvs[1];
    untranspose_keys(dKT, KP, Tk, D, dkb, a.dks[2]);
    untranspose_keys(dVT, KP, Tk, D, dvb, a.dvs[2]);
    for (int j = 0; j < Tk; ++j)
        finite = finite && all_finite(dkb + j * a.dks[2], ND) && all_finite(dvb + j * a.dvs[2], ND);
    return finite;
}

// log(x) on 16 lanes for normal x > 0 (Cephes logf: x = m 2^e, m in [sqrt(1/2), sqrt(2)),
// degree-8 polynomial in m - 1, within ~1 ulp).
INLINE v16 vlog(v16 x) {
    i16v bits;
    std::memcpy(&bits, &x, sizeof bits);
    i16v e = ((bits >> 23) & 0xff) - 126;
    v16 m = from_bits((bits & 0x007fffff) | 0x3f000000);  // [0.5, 1)
    const auto low = m < 0.707106781186547524f;
    e = low ? e - 1 : e;
    m = low ? m + m - 1.0f : m - 1.0f;
    const v16 z = m * m;
    v16 y = splat(7.0376836292e-2f);
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    const v16 ef = __builtin_convertvector(e, v16);
    y += ef * -2.12194440e-4f;
    y += -0.5f * z;
    return m + y + ef * 0.693359375f;
}

// The merge's per-row part for rows [0, n), 16 at a time (n a multiple of 16): lse =
// max + log1p(e^-|d|) and the weight sigmoid(d) of state a, d = la - lb finite.
// log1p(t) as log(u) t / (u - 1) with u = 1 + t (exact where u rounds to 1: then t).
void merge_weights(const float* la, const float* lb, float* lse, float* w, int64_t n) {
    for (int64_t r = 0; r < n; r += 16) {
        const v16 a = load(la + r), b = load(lb + r), d = a - b;
        const v16 t = vexp(-(d < 0.0f ? -d : d));
        const v16 u = 1.0f + t;
        const v16 l1p = u == 1.0f ? t : vlog(u) * (t / (u - 1.0f));
        store(lse + r, (a > b ? a : b) + l1p);
        store(w + r, 1.0f / (1.0f + vexp(-d)));
    }
}

// The same blend compiled for AVX-512 (the macro body of blend_rows, auto-vectorised).
void blend_rows_wide(const float* oa, const float* ob, const float* w, float* o, int64_t lo, int64_t hi, int64_t D) {
    FASTDF_BLEND_BODY
}
// Whether out[0, n_out) and lse[0, n_lse) are all finite, and max |lse| (the aten route's
// result check, _accepted in attention.py: one pass in one call instead of three torch
// reductions, ~6 us of dispatch on a small call).
std::pair<bool, float> finite_absmax(const float* out, int64_t n_out, const float* lse, int64_t n_lse) {
    v16 bad = {}, big = {};
    for (int64_t i = 0; i < n_out; i += 16) {
        const __mmask16 m = lanes(n_out - i);
        const v16 o = load_n(out + i, m);
        bad += o - o;  // 0 where finite, NaN otherwise
    }
    for (int64_t i = 0; i < n_lse; i += 16) {
        const __mmask16 m = lanes(n_lse - i);
        const v16 l = load_n(lse + i, m);
        bad += l - l;
        const v16 a = l < 0.0f ? -l : l;
        big = a > big ? a : big;
    }
    return {all_zero(bad), hmax(big)};  // big holds no NaN: the select above keeps it out
}

#pragma GCC pop_options

// merge_attention_states for fp32 rows with finite lse, in one pass and one call (a
// 256-row decode merge is ~30 us of dispatches in torch ops): lse = logaddexp(la, lb),
// o = lerp(o_b, o_a, w) with w = sigmoid(la - lb), the formula torch's lerp uses (from the
// nearer end). Returns false, having written nothing trustworthy, when some la - lb is not
// finite: the caller then runs the general path (empty and +inf states).
void blend_rows(const float* oa, const float* ob, const float* w, float* o, int64_t lo, int64_t hi, int64_t D) {
    FASTDF_BLEND_BODY
}

bool merge_rows(const float* oa, const float* ob, const float* la, const float* lb, float* o, float* lse,
                int64_t rows, int64_t D, int threads) {
    for (int64_t r = 0; r < rows; ++r)
        if (!std::isfinite(la[r] - lb[r])) return false;
    std::vector<float> w(rows);
    const bool wide = has_avx512();
    const int64_t vec = wide ? rows / 16 * 16 : 0;
    if (vec) merge_weights(la, lb, lse, w.data(), vec);
    for (int64_t r = vec; r < rows; ++r) {  // the rest, and every row without AVX-512
        const float a = la[r], b = lb[r], d = a - b;
        lse[r] = std::max(a, b) + std::log1p(std::exp(-std::fabs(d)));
        w[r] = 1.0f / (1.0f + std::exp(-d));
    }
    const int64_t work = rows * D;
    const int parts = work > (1 << 18) ? std::max(1, threads) : 1;
#pragma omp parallel for schedule(static) if (parts > 1) num_threads(parts)
    for (int p = 0; p < parts; ++p) {
        const int64_t lo = rows * p / parts, hi = rows * (p + 1) / parts;
        if (wide)
            blend_rows_wide(oa, ob, w.data(), o, lo, hi, D);
        else
            blend_rows(oa, ob, w.data(), o, lo, hi, D);
    }
    return true;
}

void check_sizes(const char* name, int B, int Hq, int Hkv, int Tq, int Tk, int D) {
    const std::string who = std::string("fastdf._cpu.") + name;
    if (!has_avx512()) throw std::runtime_error(who + ": needs a CPU with AVX-512 (F, BW, DQ, VL)");
    if (D % 16 != 0 || D < 16 || D > MAX_DIM)
        throw std::invalid_argument(who + ": D must be a multiple of 16 in [16, 256]");
    if (Tk < 1 || Tk > MAX_KEYS || Tq < 1 || Tq > Tk) throw std::invalid_argument(who + ": needs 1 <= Tq <= Tk <= 512");
    if (B < 1 || Hkv < 1 || Hq < 1 || Hq % Hkv != 0)
        throw std::invalid_argument(who + ": needs B >= 1 and Hq a multiple of Hkv >= 1");
}

py::tuple attention_forward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, int B, int Hq,
                            int Hkv, int Tq, int Tk, int D, py::tuple qs, py::tuple ks, py::tuple vs, py::tuple os,
                            py::tuple ls, uintptr_t ranges, float scale, int threads) {
    check_sizes("attention_forward", B, Hq, Hkv, Tq, Tk, D);
    Args a{reinterpret_cast<const float*>(q), reinterpret_cast<const float*>(k),
           reinterpret_cast<const float*>(v), reinterpret_cast<float*>(out), reinterpret_cast<float*>(lse),
           B, Hq, Hkv, Tq, Tk, D, {}, {}, {}, {}, {}, reinterpret_cast<const int32_t*>(ranges), scale};
    for (int i = 0; i < 3; ++i) {
        a.qs[i] = qs[i].cast<int64_t>();
        a.ks[i] = ks[i].cast<int64_t>();
        a.vs[i] = vs[i].cast<int64_t>();
        a.os[i] = os[i].cast<int64_t>();
        a.ls[i] = ls[i].cast<int64_t>();
    }
    // (batch, kv head) pairs, each cut into row ranges when there are fewer pairs than
    // threads (rows are independent: the same bits whatever the cut; each piece transposes
    // its K again, cheap next to its rows)
    const int pairs = B * Hkv, blocks = (Tq + ROWS - 1) / ROWS;
    const int splits = std::max(1, std::min(blocks, (threads + pairs - 1) / pairs));
    const int tasks = pairs * splits;
    threads = std::max(1, std::min(threads, tasks));
    std::vector<float> absmax(threads, 0.0f);
    std::vector<char> finite(threads, 1);
    {
        py::gil_scoped_release release;
#pragma omp parallel num_threads(threads)
        {
            const int t = omp_get_thread_num();
            const int KP = (a.Tk + 15) / 16 * 16;
            float* kT = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * a.D * KP));
            auto* s = static_cast<float(*)[MAX_KEYS]>(std::aligned_alloc(64, sizeof(float) * ROWS * MAX_KEYS));
            float am = 0.0f;
            bool fin = true;
#pragma omp for schedule(static)
            for (int task = 0; task < tasks; ++task) {
                const int pair = task / splits, part = task % splits;
                const int lo = blocks * part / splits * ROWS, hi = std::min(a.Tq, blocks * (part + 1) / splits * ROWS);
                fin = attend_head(a, pair / a.Hkv, pair % a.Hkv, lo, hi, kT, s, &am) && fin;
            }
            absmax[t] = am;
            finite[t] = fin;
            std::free(kT);
            std::free(s);
        }
    }
    float am = 0.0f;
    bool fin = true;
    for (int t = 0; t < threads; ++t) {
        am = std::max(am, absmax[t]);
        fin = fin && finite[t];
    }
    return py::make_tuple(fin, am);
}

bool attention_backward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t dout, uintptr_t lse,
                        uintptr_t dq, uintptr_t dk, uintptr_t dv, int B, int Hq, int Hkv, int Tq, int Tk, int D,
                        py::tuple strides, uintptr_t ranges, float scale, int threads) {
    check_sizes("attention_backward", B, Hq, Hkv, Tq, Tk, D);
    if (strides.size() != 9) throw std::invalid_argument("fastdf._cpu.attention_backward: 9 stride triples");
    BwdArgs a{reinterpret_cast<const float*>(q), reinterpret_cast<const float*>(k),
              reinterpret_cast<const float*>(v), reinterpret_cast<const float*>(out),
              reinterpret_cast<const float*>(dout), reinterpret_cast<const float*>(lse),
              reinterpret_cast<float*>(dq), reinterpret_cast<float*>(dk), reinterpret_cast<float*>(dv),
              B, Hq, Hkv, Tq, Tk, D, {}, {}, {}, {}, {}, {}, {}, {}, {}, reinterpret_cast<const int32_t*>(ranges),
              scale};
    int64_t* dst[9] = {a.qs, a.ks, a.vs, a.os, a.gs, a.ls, a.dqs, a.dks, a.dvs};
    for (int t = 0; t < 9; ++t) {
        py::tuple st = strides[t].cast<py::tuple>();
        for (int i = 0; i < 3; ++i) dst[t][i] = st[i].cast<int64_t>();
    }
    const int tasks = B * Hkv;
    threads = std::max(1, std::min(threads, tasks));
    std::vector<char> finite(threads, 1);
    {
        py::gil_scoped_release release;
#pragma omp parallel num_threads(threads)
        {
            const int t = omp_get_thread_num();
            const int KP = (a.Tk + 15) / 16 * 16;
            const size_t kd = sizeof(float) * a.D * KP, rows = sizeof(float) * ROWS * MAX_KEYS;
            float* kT = static_cast<float*>(std::aligned_alloc(64, kd));
            float* vT = static_cast<float*>(std::aligned_alloc(64, kd));
            float* dK = static_cast<float*>(std::aligned_alloc(64, kd));
            float* dV = static_cast<float*>(std::aligned_alloc(64, kd));
            auto* S = static_cast<float(*)[MAX_KEYS]>(std::aligned_alloc(64, rows));
            auto* P = static_cast<float(*)[MAX_KEYS]>(std::aligned_alloc(64, rows));
            bool fin = true;
            // Flush-to-zero and denormals-are-zero in this thread while it runs the backward:
            // sharp rows (scores spanning > 87) give subnormal probabilities, and every
            // product or sum with a subnormal result took a ~20x microcode assist (fwd+bwd of
            // such a 256-token head: 12 ms against SDPA's 2.8 ms). What is lost is below
            // 2^-126 in dS, dQ, dK, dV (plain fp32 autograd keeps those tiny values; the 2x
            // rule's floor is far above them). Restored before the thread leaves.
            const unsigned csr = __builtin_ia32_stmxcsr();  // the SSE builtins: this code is outside the AVX-512 section
            __builtin_ia32_ldmxcsr(csr | 0x8040);
#pragma omp for schedule(static)
            for (int task = 0; task < tasks; ++task)
                fin = attend_head_backward(a, task / a.Hkv, task % a.Hkv, kT, vT, dK, dV, S, P) && fin;
            __builtin_ia32_ldmxcsr(csr);
            finite[t] = fin;
            for (void* ptr : {static_cast<void*>(kT), static_cast<void*>(vT), static_cast<void*>(dK),
                              static_cast<void*>(dV), static_cast<void*>(S), static_cast<void*>(P)})
                std::free(ptr);
        }
    }
    for (int t = 0; t < threads; ++t)
        if (!finite[t]) return false;
    return true;
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
    m.doc() = "fastdf's CPU kernels (host C++, no torch headers)";
    m.attr("MAX_KEYS") = MAX_KEYS;
    m.attr("MAX_DIM") = MAX_DIM;
    m.def("attention_forward", &attention_forward,
          "df_attention's forward for Tk <= MAX_KEYS, fp32, D a multiple of 16 up to MAX_DIM: writes out and "
          "lse, returns (every element finite, max |lse|)");
    m.def("attention_backward", &attention_backward,
          "df_attention's backward for what attention_forward takes, given its out and lse: writes dq, dk, dv; "
          "returns whether every element is finite");
    m.def(
        "merge_states",
        [](uintptr_t oa, uintptr_t ob, uintptr_t la, uintptr_t lb, uintptr_t o, uintptr_t lse, int64_t rows,
           int64_t D, int threads) {
            py::gil_scoped_release release;
            return merge_rows(reinterpret_cast<const float*>(oa), reinterpret_cast<const float*>(ob),
                              reinterpret_cast<const float*>(la), reinterpret_cast<const float*>(lb),
                              reinterpret_cast<float*>(o), reinterpret_cast<float*>(lse), rows, D,
                              std::max(1, threads));
        },
        "merge_attention_states of contiguous fp32 [rows, D] states with finite lse: writes o and lse; "
        "false (nothing to use) where some lse_a - lse_b is not finite");
    m.def(
        "finite_absmax",
        [](uintptr_t out, int64_t n_out, uintptr_t lse, int64_t n_lse) {
            if (n_out < 0 || n_lse < 0) throw std::invalid_argument("fastdf._cpu.finite_absmax: negative length");
            const auto r = finite_absmax(reinterpret_cast<const float*>(out), n_out,
                                         reinterpret_cast<const float*>(lse), n_lse);
            return py::make_tuple(r.first, r.second);
        },
        "(every element of the fp32 spans out[0, n_out) and lse[0, n_lse) finite, max |lse|)");
    m.def("has_avx512", &has_avx512, "whether this CPU runs the kernels (AVX-512 F, BW, DQ, VL)");
    add_adaln(m);
    add_moe(m);
}
