// Kernels that break the rules on purpose: test_emulator.py checks that the harness
// reports each one (a harness whose checks cannot fire proves nothing).
#include <cuda_runtime.h>

#include <cstdint>

namespace {

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void barrier_after_exit(int* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void shfl_names_absent_lane(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x < 31) v = __shfl_xor_sync(0xffffffffu, v, 1);  // lane 31 never arrives
  out[threadIdx.x] = v;
}

__global__ void shfl_mask_misses_self(int* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 0);  // lanes 16..31 not in mask
}

__global__ void out_of_bounds(const int* in, int* out, int n) {
  out[threadIdx.x] = in[n + static_cast<int>(threadIdx.x)];  // reads past the end
}

__global__ void reads_shared_uninitialised(int* out) {
  __shared__ int s[64];
  if (threadIdx.x == 0) s[0] = 7;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];  // only s[0] was written: the poison shows
}

__global__ void racy_count(int* out) {
  // A read-then-write that is only correct if no other warp runs in between: the random
  // thread order (a scheduling point at the barrier-free atomic) exposes it.
  __shared__ int counter;
  if (threadIdx.x == 0) counter = 0;
  __syncthreads();
  if ((threadIdx.x & 31) == 0) {
    const int seen = counter;
    atomicAdd(out + 1, 0);  // a scheduling point between the read and the write
    counter = seen + 1;
  }
  __syncthreads();
  if (threadIdx.x == 0) out[0] = counter;
}

__global__ void well_behaved(const int* in, int* out, int n) {
  extern __shared__ int buf[];
  const int lane = threadIdx.x & 31;
  int v = threadIdx.x < static_cast<unsigned>(n) ? in[threadIdx.x] : 0;
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) buf[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    int s = 0;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) s += buf[w];
    out[blockIdx.x] = s;
  }
  const unsigned b = __ballot_sync(0xffffffffu, lane & 1);
  if (threadIdx.x == 0) out[gridDim.x + blockIdx.x] = static_cast<int>(b);
}

__global__ void shared_overrun(int* out) {
  __shared__ int s[32];
  s[threadIdx.x] = 1;
  __syncthreads();
  const int* p = s;  // through a pointer: UBSan's bounds check does not see it, ASan must
  out[threadIdx.x] = p[threadIdx.x + 1];  // thread 31 reads past s: poison here, an ASan report there
}

__global__ void undefined_shift(const int* in, int* out, int n) {
  out[threadIdx.x] = in[0] << n;  // n = 40: undefined, UBSan reports it
}

}  // namespace

extern "C" int emu_selftest(int which, const int* in, int* out, int n) {
  switch (which) {
    case 0: well_behaved<<<2, 64, 2 * sizeof(int)>>>(in, out, n); break;
    case 1: divergent_barrier<<<1, 32>>>(out); break;
    case 2: barrier_after_exit<<<1, 32>>>(out); break;
    case 3: shfl_names_absent_lane<<<1, 32>>>(out); break;
    case 4: shfl_mask_misses_self<<<1, 32>>>(out); break;
    case 5: out_of_bounds<<<1, 32>>>(in, out, n); break;
    case 6: reads_shared_uninitialised<<<1, 64>>>(out); break;
    case 7: racy_count<<<1, 256>>>(out); break;
    case 8: well_behaved<<<1, 64, 1 << 20>>>(in, out, n); break;  // too much shared memory
    case 9: shared_overrun<<<1, 32>>>(out); break;
    case 10: undefined_shift<<<1, 32>>>(in, out, n); break;
    default: return -1;
  }
  return static_cast<int>(cudaGetLastError());
}

extern "C" const char* emu_selftest_message() { return cudaGetErrorString(cudaErrorLaunchFailure); }
