#include "bind.h"
#include "sampling.h"

FASTDF_BIND(bind_sampling) {
  namespace py = pybind11;
  m.def(
      "sample_from_logits",
      [](uintptr_t logits, int64_t rows, int64_t vocab, int64_t row_stride, int64_t col_stride, int dtype,
         uintptr_t uniforms, uintptr_t indices, int64_t n_out, uintptr_t temperature, uintptr_t top_k,
         uintptr_t top_p, uintptr_t min_p, float temperature_value, int64_t top_k_value, float top_p_value,
         float min_p_value, uintptr_t out, uintptr_t status, int candidate_cap, uintptr_t stream, int device) {
        fastdf::require_device(device);
        const fastdf::SampleKnobs knobs{
            reinterpret_cast<const float*>(temperature), reinterpret_cast<const int64_t*>(top_k),
            reinterpret_cast<const float*>(top_p), reinterpret_cast<const float*>(min_p),
            temperature_value, top_k_value, top_p_value, min_p_value};
        fastdf::sample_from_logits(logits, rows, vocab, row_stride, col_stride, static_cast<fastdf::DType>(dtype),
                                   reinterpret_cast<const float*>(uniforms), reinterpret_cast<const int64_t*>(indices),
                                   n_out, knobs, reinterpret_cast<int64_t*>(out), reinterpret_cast<int32_t*>(status),
                                   candidate_cap, fastdf::as_stream(stream));
      },
      py::arg("logits"), py::arg("rows"), py::arg("vocab"), py::arg("row_stride"), py::arg("col_stride"),
      py::arg("dtype"), py::arg("uniforms"), py::arg("indices"), py::arg("n_out"), py::arg("temperature"),
      py::arg("top_k"), py::arg("top_p"), py::arg("min_p"), py::arg("temperature_value"), py::arg("top_k_value"),
      py::arg("top_p_value"), py::arg("min_p_value"), py::arg("out"), py::arg("status"), py::arg("candidate_cap"),
      py::arg("stream"), py::arg("device"),
      "Sample one token per output row (pointers as integers; 0 for an absent per-row knob or indices).");
}
