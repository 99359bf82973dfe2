// Python bindings for fastdf._C. Kernels take raw pointers, sizes, strides and a stream
// handle (an integer from torch.cuda.current_stream().cuda_stream); fastdf/_native.py and
// the ops modules turn tensors into these arguments.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <tuple>
#include <vector>

#include "cascade.h"
#include "common.h"

namespace py = pybind11;
using fastdf::DType;
using fastdf::RowView;

namespace {

// (pointer, strides) as sent from Python; strides are padded to five entries with zeros.
using PyView = std::tuple<uintptr_t, std::vector<int64_t>>;

RowView row_view(const PyView& view, const char* name) {
  const auto& strides = std::get<1>(view);
  if (strides.size() > 5) throw std::invalid_argument(std::string("fastdf._C: too many strides for ") + name);
  RowView out{std::get<0>(view), {0, 0, 0, 0, 0}};
  for (size_t i = 0; i < strides.size(); ++i) out.stride[i] = strides[i];
  return out;
}

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdf CUDA kernels (no torch ABI dependency; called through fastdf.ops)";
  m.attr("cuda_runtime_version") = CUDART_VERSION;
  m.def("device_count", &device_count, "Number of CUDA devices the static runtime sees (0 without a driver).");

  m.def(
      "merge_attention_states",
      [](PyView o_a, PyView lse_a, PyView o_b, PyView lse_b, PyView o, PyView lse,
         std::vector<int64_t> size, int dtype, uintptr_t stream, int device) {
        if (size.size() != 5) throw std::invalid_argument("fastdf._C: merge_attention_states: size needs 5 entries");
        fastdf::require_device(device);
        fastdf::merge_attention_states(row_view(o_a, "o_a"), row_view(lse_a, "lse_a"), row_view(o_b, "o_b"),
                                       row_view(lse_b, "lse_b"), row_view(o, "o"), row_view(lse, "lse"),
                                       size.data(), static_cast<DType>(dtype), as_stream(stream));
      },
      py::arg("o_a"), py::arg("lse_a"), py::arg("o_b"), py::arg("lse_b"), py::arg("o"), py::arg("lse"),
      py::arg("size"), py::arg("dtype"), py::arg("stream"), py::arg("device"),
      "Merge two attention states by log-sum-exp (fp32 lse views; o views of one dtype).");
}
