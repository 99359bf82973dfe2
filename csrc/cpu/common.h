// fastdf._cpu's shared pieces: the 16-lane vector types and helpers its kernels are written
// in, the CPU check, and the binding hooks of each op family's file (one module, one file
// per family: attention.cpp defines the module and calls the others' hooks).
//
// The vector code is compiled for x86-64-v4 (AVX-512 F/BW/DQ/VL) by a pragma, and called
// only where has_avx512() says the CPU has it (measured: the same code as x86-64-v3 ran ~14x
// slower, its 16-lane shuffles split; target_clones ~2x slower than a whole-section target).
#pragma once

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#define INLINE static inline __attribute__((always_inline))

INLINE bool has_avx512() {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}

// Hooks: each adds its family's functions to the module.
void add_adaln(pybind11::module_& m);
void add_moe(pybind11::module_& m);

// Row-parallel work: rows [0, rows) of `width` elements each, cut into static parts, one per
// thread, or one part below PARALLEL elements (a parallel region costs more than it saves).
constexpr int64_t PARALLEL = 1 << 16;
INLINE int parts_for(int64_t elements, int threads) { return elements >= PARALLEL ? std::max(1, threads) : 1; }

template <class Body>
void rows_parallel(int64_t rows, int64_t width, int threads, Body body) {
    const int parts = static_cast<int>(std::min<int64_t>(parts_for(rows * width, threads), rows));
#pragma omp parallel for schedule(static) num_threads(parts) if (parts > 1)
    for (int p = 0; p < parts; ++p) body(rows * p / parts, rows * (p + 1) / parts);
}

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")

#include <immintrin.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));

INLINE v16 splat(float x) { return (v16){} + x; }
INLINE v16 load(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }
INLINE void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
INLINE v16 from_bits(i16v b) { v16 v; std::memcpy(&v, &b, sizeof v); return v; }

// Lanes [0, n) of a row's last (n < 16) or any (n >= 16: all) 16-wide block; masked lanes
// read as 0 and are never written (the row's end may be the buffer's end).
INLINE __mmask16 lanes(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }
INLINE v16 load_n(const float* p, __mmask16 m) { return (v16)_mm512_maskz_loadu_ps(m, p); }
INLINE void store_n(float* p, v16 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, (__m512)v); }
INLINE v16 keep(v16 v, __mmask16 m) { return (v16)_mm512_maskz_mov_ps(m, (__m512)v); }

// Horizontal sum as a tree (lanes i and i + 8, then i + 4, ...): a fixed order, so the same
// bits every call; four dependent steps where lane by lane was 16 (latency-bound once or
// twice per row: on 16-key heads the row reductions were ~15% of the attention forward).
// Written with shuffles: GCC 12's _mm512_reduce_* warn about an undefined operand.
INLINE v16 fold(v16 v, i16v lanes) { return __builtin_shuffle(v, lanes); }
constexpr i16v FOLD8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
constexpr i16v FOLD4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
constexpr i16v FOLD2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
constexpr i16v FOLD1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};

INLINE float hsum(v16 v) {
    v = v + fold(v, FOLD8);
    v = v + fold(v, FOLD4);
    v = v + fold(v, FOLD2);
    return (v + fold(v, FOLD1))[0];
}

// Horizontal max of lanes that hold no NaN (as a tree).
INLINE v16 vmax(v16 a, v16 b) { return a > b ? a : b; }
INLINE float hmax(v16 v) {
    v = vmax(v, fold(v, FOLD8));
    v = vmax(v, fold(v, FOLD4));
    v = vmax(v, fold(v, FOLD2));
    return vmax(v, fold(v, FOLD1))[0];
}

// Every lane 0 (NaN lanes are not): the finite tests' "sum of x - x".
INLINE bool all_zero(v16 v) { return _mm512_cmp_ps_mask((__m512)v, _mm512_setzero_ps(), _CMP_EQ_OQ) == 0xFFFF; }

// e^x's core (Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial, within ~1
// ulp) for x in [-104, 88.73]: e^r as p, and n as nf; 2^n is the caller's (vscalefps, which
// rounds once into the subnormals and saturates to inf as libm does). The all-lanes maskz
// forms: the plain intrinsics pass GCC 12 an undefined operand, which it warns about.
INLINE v16 exp_reduced(v16 x, v16& nf) {
    const __m512 t = (__m512)(x * 1.44269504088896341f);
    nf = (v16)_mm512_maskz_roundscale_ps(0xFFFF, t, _MM_FROUND_TO_NEAREST_INT);
    v16 r = x - nf * 0.693359375f - nf * -2.12194440e-4f;
    v16 p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    return p * r * r + r + 1.0f;
}

// e^x on 16 lanes (was: a rounding by hand and two multiplies by normal halves of 2^n, ~10
// instructions more; the exponential was ~20% of the forward kernel on 288-key rows). NaN
// stays NaN; x < -104 gives 0, x > 88.73 inf.
INLINE v16 vexp(v16 x) {
    const float hi = 88.7228391f, lo = -104.0f;
    v16 xc = x > hi ? splat(hi) : x;
    xc = xc < lo ? splat(lo) : xc;
    v16 nf;
    const v16 p = exp_reduced(xc, nf);
    v16 out = (v16)_mm512_maskz_scalef_ps(0xFFFF, (__m512)p, (__m512)nf);
    out = x < lo ? splat(0.0f) : out;
    return x > hi ? splat(INFINITY) : out;
}

#pragma GCC pop_options
