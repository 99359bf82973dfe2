#include "bind.h"
#include "moe.h"

namespace {

template <typename T> T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

}  // namespace

FASTDF_BIND(bind_moe) {
  namespace py = pybind11;
  m.attr("moe_route_chunk") = fastdf::kRouteChunk;
  m.def(
      "moe_route",
      [](uintptr_t ids, bool ids_int32, int64_t n, int E, uintptr_t order, uintptr_t inverse, uintptr_t offs,
         uintptr_t workspace, uintptr_t stream, int device) {
        fastdf::require_device(device);
        fastdf::moe_route(ptr<const void>(ids), ids_int32, n, E, ptr<int32_t>(order), ptr<int32_t>(inverse),
                          ptr<int32_t>(offs), ptr<int32_t>(workspace), fastdf::as_stream(stream));
      },
      py::arg("ids"), py::arg("ids_int32"), py::arg("n"), py::arg("num_experts"), py::arg("order"),
      py::arg("inverse"), py::arg("offs"), py::arg("workspace"), py::arg("stream"), py::arg("device"),
      "Stable counting sort of (token, slot) pairs by expert -> order, inverse, offs (int32).");
  m.def(
      "moe_gather",
      [](uintptr_t x, int64_t sx0, int64_t sx1, uintptr_t rows, int64_t S, int64_t H, uintptr_t out, int64_t so0,
         int64_t so1, int elem_size, uintptr_t stream, int device) {
        fastdf::require_device(device);
        fastdf::moe_gather(ptr<const void>(x), sx0, sx1, ptr<const int32_t>(rows), S, H, ptr<void>(out), so0, so1,
                           elem_size, fastdf::as_stream(stream));
      },
      py::arg("x"), py::arg("sx0"), py::arg("sx1"), py::arg("rows"), py::arg("S"), py::arg("H"), py::arg("out"),
      py::arg("so0"), py::arg("so1"), py::arg("elem_size"), py::arg("stream"), py::arg("device"),
      "out[s] = x[rows[s]] (int32 rows).");
  m.def(
      "moe_combine",
      [](uintptr_t y, int64_t sy0, int64_t sy1, uintptr_t inverse, int64_t T, int K, int64_t H, uintptr_t w,
         uintptr_t out, int64_t so0, int64_t so1, int dtype, uintptr_t stream, int device) {
        fastdf::require_device(device);
        fastdf::moe_combine(ptr<const void>(y), sy0, sy1, ptr<const int32_t>(inverse), T, K, H, ptr<const float>(w),
                            ptr<void>(out), so0, so1, static_cast<fastdf::DType>(dtype), fastdf::as_stream(stream));
      },
      py::arg("y"), py::arg("sy0"), py::arg("sy1"), py::arg("inverse"), py::arg("T"), py::arg("K"), py::arg("H"),
      py::arg("weights"), py::arg("out"), py::arg("so0"), py::arg("so1"), py::arg("dtype"), py::arg("stream"),
      py::arg("device"), "out[t] = sum_k w[t,k] y[inverse[t,k]] in fp32, slot order (weights fp32 or 0).");
}
