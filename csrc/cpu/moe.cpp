// fastdf._cpu: pieces of moe_experts' eager CPU backward: the routed rows of the upstream
// gradient (gathered, weighted, and dotted with h2 in one pass), and the SwiGLU gradient.
//
// With h1 = [gate | up] (the grouped GEMM's output, [S, 2I]), a = silu(gate) up, and dd the
// gradient of a, the gradient of h1 is dh1 = [dd up silu'(gate) | dd silu(gate)], where
// s = sigmoid(gate), silu = gate s, silu' = s (1 + gate (1 - s)): torch's silu_backward
// formula. In torch that is three passes over [S, I] arrays (dd * up, silu_backward,
// dd * silu(gate)) and a temporary; here one pass reads dd, gate and up once and writes
// dh1 (measured inside the backward: ~0.8 ms of an ~8 ms E8 top-2 backward, the arrays
// 1 MiB each and cold after the GEMMs). Not torch's bits (its exp is Sleef's, this
// Cephes' within 1 ulp of libm), so the backward is held to the reference by the rule.
#include "common.h"

#include <cstdint>
#include <stdexcept>

namespace py = pybind11;

namespace {

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")

// Rows [lo, hi) of dh1 from dd [S, I] and h1 [S, 2I] (all contiguous).
void swiglu_backward_rows(const float* dd, const float* h1, float* dh1, int64_t I, int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
        const float* d = dd + r * I;
        const float* g = h1 + r * 2 * I;
        const float* u = g + I;
        float* dg = dh1 + r * 2 * I;
        float* du = dg + I;
        for (int64_t c = 0; c < I; c += 16) {
            const __mmask16 m = lanes(I - c);
            const v16 dv = load_n(d + c, m), gv = load_n(g + c, m), uv = load_n(u + c, m);
            // 1 / (1 + e^-g) as torch writes it: e^-g = inf (g < -88.7) gives s = 0, and a
            // g of -inf then gives 0 * -inf = NaN in dgate, as silu_backward does
            const v16 s = 1.0f / (1.0f + vexp(-gv));
            store_n(dg + c, dv * uv * (s * (1.0f + gv * (1.0f - s))), m);
            store_n(du + c, dv * (gv * s), m);
        }
    }
}

// Routed rows [lo, hi): gw[r] = grad[tok[r]] w[r] and, where dw is given, dw[r] = grad[tok[r]] .
// h2[r] (the routing weight's gradient; 16 lanes, then a tree). In torch: the gather, a
// broadcast product and a vecdot (whose product is a temporary): three passes over [S, H].
void routed_grad_rows(const float* grad, const int64_t* tok, const float* w, const float* h2, float* gw, float* dw,
                      int64_t H, int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
        const float* g = grad + tok[r] * H;
        const float* h = h2 ? h2 + r * H : nullptr;
        float* o = gw + r * H;
        const v16 wr = splat(w[r]);
        v16 acc = {};
        for (int64_t c = 0; c < H; c += 16) {
            const __mmask16 m = lanes(H - c);
            const v16 gv = load_n(g + c, m);
            store_n(o + c, gv * wr, m);
            if (h) acc += gv * load_n(h + c, m);
        }
        if (dw) dw[r] = hsum(acc);
    }
}

#pragma GCC pop_options

}  // namespace

void add_moe(py::module_& m) {
    m.def(
        "swiglu_backward",
        [](uintptr_t dd, uintptr_t h1, uintptr_t dh1, int64_t S, int64_t I, int threads) {
            if (S < 0 || I <= 0) throw std::invalid_argument("fastdf._cpu.swiglu_backward: S >= 0 and I > 0");
            const auto* d = reinterpret_cast<const float*>(dd);
            const auto* h = reinterpret_cast<const float*>(h1);
            auto* o = reinterpret_cast<float*>(dh1);
            py::gil_scoped_release release;
            rows_parallel(S, I, threads, [&](int64_t lo, int64_t hi) { swiglu_backward_rows(d, h, o, I, lo, hi); });
        },
        "moe_experts' SwiGLU gradient: dh1 = [dd up silu'(gate) | dd silu(gate)] for contiguous fp32 dd [S, I], "
        "h1 = [gate | up] [S, 2I] and dh1 [S, 2I].");
    m.def(
        "routed_grad",
        [](uintptr_t grad, uintptr_t tok, uintptr_t w, uintptr_t h2, uintptr_t gw, uintptr_t dw, int64_t S, int64_t H,
           int threads) {
            if (S < 0 || H <= 0) throw std::invalid_argument("fastdf._cpu.routed_grad: S >= 0 and H > 0");
            if (dw && !h2) throw std::invalid_argument("fastdf._cpu.routed_grad: dw needs h2");
            const auto* g = reinterpret_cast<const float*>(grad);
            const auto* t = reinterpret_cast<const int64_t*>(tok);
            const auto* wr = reinterpret_cast<const float*>(w);
            const auto* h = reinterpret_cast<const float*>(h2);
            auto* o = reinterpret_cast<float*>(gw);
            auto* d = reinterpret_cast<float*>(dw);
            py::gil_scoped_release release;
            rows_parallel(S, H, threads,
                          [&](int64_t lo, int64_t hi) { routed_grad_rows(g, t, wr, h, o, d, H, lo, hi); });
        },
        "moe_experts' routed upstream gradient: gw[r] = grad[tok[r]] w[r] and (dw, h2 nonzero) dw[r] = grad[tok[r]] "
        ". h2[r], for contiguous fp32 grad [T, H], h2 and gw [S, H], w and dw [S], int64 tok [S] (rows of grad: the "
        "caller's range check).");
}
