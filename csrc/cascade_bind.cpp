#include "bind.h"
#include "cascade.h"

namespace {

fastdf::RowView row_view(const fastdf::PyView& view, const char* name) {
  const auto& strides = std::get<1>(view);
  if (strides.size() > 5) throw std::invalid_argument(std::string("fastdf._C: too many strides for ") + name);
  fastdf::RowView out{std::get<0>(view), {0, 0, 0, 0, 0}};
  for (size_t i = 0; i < strides.size(); ++i) out.stride[i] = strides[i];
  return out;
}

}  // namespace

FASTDF_BIND(bind_cascade) {
  namespace py = pybind11;
  m.def(
      "merge_attention_states",
      [](fastdf::PyView o_a, fastdf::PyView lse_a, fastdf::PyView o_b, fastdf::PyView lse_b, fastdf::PyView o,
         fastdf::PyView lse, std::vector<int64_t> size, int dtype, uintptr_t stream, int device) {
        if (size.size() != 5) throw std::invalid_argument("fastdf._C: merge_attention_states: size needs 5 entries");
        fastdf::require_device(device);
        fastdf::merge_attention_states(row_view(o_a, "o_a"), row_view(lse_a, "lse_a"), row_view(o_b, "o_b"),
                                       row_view(lse_b, "lse_b"), row_view(o, "o"), row_view(lse, "lse"),
                                       size.data(), static_cast<fastdf::DType>(dtype), fastdf::as_stream(stream));
      },
      py::arg("o_a"), py::arg("lse_a"), py::arg("o_b"), py::arg("lse_b"), py::arg("o"), py::arg("lse"),
      py::arg("size"), py::arg("dtype"), py::arg("stream"), py::arg("device"),
      "Merge two attention states by log-sum-exp (fp32 lse views; o views of one dtype).");
}
