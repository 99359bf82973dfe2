// Shared by every csrc/ file. Host-visible declarations only: no torch headers, so the
// extension builds on a machine without a GPU and loads under any torch version.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>

namespace fastdf {

// Element types crossing the Python boundary, by code (fastdf/_native.py mirrors these).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastdf._C: ") + what + " failed: " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
}

// Every entry point calls this first, so a machine without a usable GPU gets one clear
// message instead of a failed launch.
inline void require_device(int device) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the sticky error so later queries are not poisoned
    throw std::runtime_error(
        std::string("fastdf._C: no usable CUDA device (cudaGetDeviceCount: ") +
        (err == cudaSuccess ? "0 devices" : cudaGetErrorString(err)) +
        "); the 'cuda' backend needs an NVIDIA GPU and driver. Use the 'triton' or 'torch' backend instead.");
  }
  if (device < 0 || device >= count) {
    throw std::runtime_error("fastdf._C: device index " + std::to_string(device) + " out of range (" +
                             std::to_string(count) + " devices)");
  }
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
}

inline void check_launch(const char* kernel) {
  check_cuda(cudaGetLastError(), kernel);
}

}  // namespace fastdf
