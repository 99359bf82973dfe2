// fastdf._cpu: the SwiGLU gradient of moe_experts' eager CPU backward.
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

#include <omp.h>

#include <algorithm>
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
            // below ~64K elements one thread: a parallel region costs more than it saves
            const int parts = static_cast<int>(std::min<int64_t>(S * I >= (1 << 16) ? std::max(1, threads) : 1, S));
            py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(parts) if (parts > 1)
            for (int p = 0; p < parts; ++p) swiglu_backward_rows(d, h, o, I, S * p / parts, S * (p + 1) / parts);
        },
        "moe_experts' SwiGLU gradient: dh1 = [dd up silu'(gate) | dd silu(gate)] for contiguous fp32 dd [S, I], "
        "h1 = [gate | up] [S, 2I] and dh1 [S, 2I].");
}
