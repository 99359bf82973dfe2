// Self-registering pybind11 bindings: each op family's *_bind.cpp adds its functions with
//   FASTDF_BIND(name) { m.def(...); }
// and bindings.cpp runs every registered binder when fastdf._C loads, so adding a family
// never touches a shared file. Host-only C++ (compiled by nvcc's host compiler).
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"

namespace fastdf {

using Binder = void (*)(pybind11::module_&);

inline std::vector<Binder>& binders() {
  static std::vector<Binder> all;  // function-local: safe whatever the static-init order
  return all;
}

struct RegisterBinder {
  explicit RegisterBinder(Binder binder) { binders().push_back(binder); }
};

// (pointer, strides) as sent from Python; strides are padded to five entries with zeros.
using PyView = std::tuple<uintptr_t, std::vector<int64_t>>;

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

}  // namespace fastdf

#define FASTDF_BIND(name)                                                  \
  static void name(pybind11::module_& m);                                 \
  static ::fastdf::RegisterBinder name##_registered(&name);               \
  static void name(pybind11::module_& m)
