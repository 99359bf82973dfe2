// fastdf._C: the module itself. Op families add their functions from their own
// *_bind.cpp files through FASTDF_BIND (bind.h); kernels take raw pointers, sizes,
// strides and a stream handle (torch.cuda.current_stream().cuda_stream), built from
// tensors by fastdf/_native.py and the ops modules.
#include "bind.h"

namespace {

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
  for (auto binder : fastdf::binders()) binder(m);
}
